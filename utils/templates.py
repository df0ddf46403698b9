"""Prompt templates (`--version`), exactly as the released models were trained with.

`<EOI>` marks where the image goes; history is a list of (query, response) pairs.
"""
from __future__ import annotations

IMAGE_MARK = "<EOI>"


def base_prompt(query: str, history) -> str:
    return IMAGE_MARK + query


def chat_prompt(query: str, history) -> str:
    prompt = IMAGE_MARK + " [INST] "
    for q, a in history:
        prompt += q + " [/INST] " + a + " [INST] "
    return prompt + query + " [/INST] "


def chat_old_prompt(query: str, history) -> str:
    prompt = IMAGE_MARK + "Question: "
    for q, a in history:
        prompt += q + " Answer: " + a + "\nQuestion: "
    return prompt + query + " Answer:"


def vqa_prompt(query: str, history) -> str:
    return IMAGE_MARK + "Question: " + query + " Short answer:"


TEMPLATES = {"base": base_prompt, "chat": chat_prompt, "chat_old": chat_old_prompt, "vqa": vqa_prompt}
# What ends the prompt of each version: a response is what the model writes after it.
SEPARATORS = {"base": None, "chat": "[/INST]", "chat_old": " Answer:", "vqa": " Short answer:"}


def build_prompt(query: str, history=(), version: str = "chat") -> str:
    if version not in TEMPLATES:
        raise ValueError(f"unknown --version {version!r}; choose one of {', '.join(TEMPLATES)}")
    if version in ("base", "vqa") and history:
        history = ()        # these templates are single-turn, as in the original
    return TEMPLATES[version](query, list(history))
