"""Prompt templates (`--version`), exactly as the released models were trained with.

`<EOI>` marks where the image goes; history is a list of (query, response) pairs.
The SAT front end uses SAT's templates (`build_prompt`); the transformers front end uses the
original HF remote code's (`hf_prompt`), whose names and texts differ (see models/README.md).
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


HF_VERSIONS = ("base", "chat", "chat_old", "vqa")


def hf_prompt(query: str, history=(), version: str = "chat", cogagent: bool = False) -> str:
    """The prompt as the original HF remote code builds it: `<s>`, every image slot, then this
    text tokenized whole. Returned after an IMAGE_MARK, so that build_row() puts the image
    right after `<s>`; an `<EOI>` inside the text stays text.
    CogVLM-HF: base = the query; chat = `Question: {q} Answer:` (SAT's chat_old, which is
    accepted as its alias); vqa = `Question: {q} Short answer:`, history kept.
    CogAgent-HF: base = the query; chat = ` [INST] {q} [/INST] `; chat_old / vqa = SAT's texts
    with `<EOI>` as ordinary text."""
    if version not in HF_VERSIONS:
        raise ValueError(f"unknown --version {version!r}; choose one of {', '.join(HF_VERSIONS)}")
    history = list(history)
    if cogagent:
        text = build_prompt(query, history, version)
        return IMAGE_MARK + text if version in ("chat_old", "vqa") else text
    if version == "vqa":
        turns = "".join(f"Question: {q} Short answer: {a}\n" for q, a in history)
        return IMAGE_MARK + turns + f"Question: {query} Short answer:"
    return build_prompt(query, history, "chat_old" if version == "chat" else version)
