"""Conversation: prompt templates, the tokenizer, images, grounding boxes, task prompts, and the
chat functions built on them (`chat`, `stream_chat`, `batch_chat`)."""
from .conversation import (ImageCache, ImageContext, Row, batch_chat, build_hf_inputs, build_row, chat, collate,
                           left_pad, merge_inputs, prepare, prepare_batch, row_inputs, stream_chat, stream_text)
from .text_stream import TextStream

__all__ = ["ImageCache", "ImageContext", "Row", "TextStream", "batch_chat", "build_hf_inputs", "build_row", "chat",
           "collate", "left_pad", "merge_inputs", "prepare", "prepare_batch", "row_inputs", "stream_chat",
           "stream_text"]
