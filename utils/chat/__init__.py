"""Conversation: prompt templates, the tokenizer, images, grounding boxes, task prompts, and the
chat functions built on them (`chat`, `stream_chat`, `batch_chat`)."""
from .conversation import (ImageCache, ImageContext, Row, batch_chat, build_hf_inputs, build_row, chat, collate,
                           merge_inputs, prepare, prepare_batch, stream_chat, stream_text)

__all__ = ["ImageCache", "ImageContext", "Row", "batch_chat", "build_hf_inputs", "build_row", "chat", "collate",
           "merge_inputs", "prepare", "prepare_batch", "stream_chat", "stream_text"]
