"""CogVLM & CogAgent composite demo (Streamlit): CogVLM chat (with grounding), CogAgent chat,
CogAgent agent. See composite_demo/README.md; models come from composite_demo/registry.py.

  streamlit run composite_demo/main.py -- --cogvlm PATH --cogagent PATH
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory

import streamlit as st  # noqa: E402

from composite_demo.registry import MODES, parse  # noqa: E402
from models import LoadOptions  # noqa: E402
from models.generate import GenerationConfig, PromptTooLong  # noqa: E402
from utils.apps.args import GEN_DEFAULTS, UI_MAX_NEW_TOKENS, load_with_tokenizer, options_from_args  # noqa: E402
from utils.chat.grounding import draw_groundings, parse_agent_output, parse_groundings  # noqa: E402
from utils.chat.image import ImageError, load_image  # noqa: E402
from utils.chat.task_prompts import AGENT_TASK, GROUNDING_TEMPLATES, agent_query, fill  # noqa: E402

st.set_page_config(page_title="CogVLM & CogAgent", layout="wide")


@st.cache_resource(show_spinner="Loading the model (once per server)...")
def load(path: str, opts: LoadOptions, local_tokenizer: str):
    """(model, tokenizer, image cache) for one checkpoint, shared by every session."""
    from utils.chat import ImageCache
    model, tok = load_with_tokenizer(path, opts, local_tokenizer)
    return model, tok, ImageCache(model.config)


def sidebar():
    with st.sidebar:
        mode = st.radio("Mode", MODES, key="mode")
        st.subheader("Sampling")
        gen = GenerationConfig(
            temperature=st.slider("temperature", 0.0, 1.5, GEN_DEFAULTS.temperature, 0.05, key="temperature"),
            top_p=st.slider("top_p", 0.0, 1.0, GEN_DEFAULTS.top_p, 0.05, key="top_p"),
            top_k=st.slider("top_k (1 = greedy)", 1, 100, GEN_DEFAULTS.top_k, key="top_k"),
            max_new_tokens=st.slider("max new tokens", 1, 2048, UI_MAX_NEW_TOKENS, key="max_new_tokens"),
            max_length=1 << 30)        # no length setting here: the model's own maximum applies
        grounding, template = False, None
        if mode == "CogVLM chat":
            grounding = st.toggle("Grounding (answers with boxes)", key="grounding")
            if grounding:
                kind = st.selectbox("Grounding request", ["(type your own)", *GROUNDING_TEMPLATES], key="gkind")
                if kind != "(type your own)":
                    template = st.selectbox("Template", GROUNDING_TEMPLATES[kind], key="gtemplate")
                    st.caption("What you type fills {expr} / {box}; a template without them is sent as is.")
        elif mode == "CogAgent agent":
            template = st.selectbox("Task template", AGENT_TASK, key="atemplate")
            grounding = st.toggle("(with grounding)", value=True, key="agrounding")
            st.caption("Type the task; it is inserted in quotes.")
        c1, c2 = st.columns(2)
        retry = c1.button("Retry", key="retry", help="answer the last question again")
        clear = c2.button("Clear history", key="clear")
    return mode, gen, grounding, template, retry, clear


def build_query(mode, text, grounding, template):
    if mode == "CogAgent agent":
        return agent_query(text, grounding, template)
    if template:
        return fill(template, expr=text, box=text)
    return text


def show_extras(msg):
    if msg.get("drawn") is not None:
        st.image(msg["drawn"], caption="boxes in the answer", width=480)
    if msg.get("action"):
        st.json(msg["action"], expanded=True)
    if msg.get("not_action"):
        st.warning("This answer is not an action (no Plan, Next Action or Grounded Operation in it).")


def flags():
    """(the flags, their LoadOptions), or None after saying in the page what is wrong with them."""
    try:
        reg = parse(sys.argv[1:])
        return reg, options_from_args(reg)
    except ValueError as e:
        st.error(str(e))
        return None


def loaded_model(reg, opts: LoadOptions, mode: str, grounding: bool):
    """(model, tokenizer, image cache) serving `mode`, or None after saying why in the page."""
    path = reg.model_for(mode, grounding)
    if path is None:
        st.error("No model configured: start with `-- --cogvlm PATH` / `--cogagent PATH` or set "
                 "COGVLM_MODEL / COGAGENT_MODEL (composite_demo/README.md).")
        return None
    try:
        return load(path, opts, reg.local_tokenizer)
    except Exception as e:  # noqa: BLE001 - shown in the page; the server keeps running
        st.error(f"Cannot load {path}: {e}")
        return None


def uploaded_image(mode: str):
    """(pixels or None, the reason an upload was not usable or None)."""
    upload = st.file_uploader("Image (jpg, png, webp)", type=["jpg", "jpeg", "png", "webp"], key=f"upload::{mode}")
    if upload is None:
        return None, None
    try:
        pixels = load_image(upload.getvalue())
    except ImageError as e:
        st.error(f"Image not usable: {e}")
        return None, str(e)
    st.image(pixels, width=320)
    return pixels, None


def answer_message(mode: str, answer: str, pixels) -> dict:
    """The assistant's message: the answer, its boxes drawn, and (agent mode) its action."""
    msg = {"role": "assistant", "content": answer, "drawn": None, "action": None}
    boxes = parse_groundings(answer)
    if boxes and pixels is not None:
        msg["drawn"] = draw_groundings(pixels, boxes)
    if mode == "CogAgent agent":
        act = parse_agent_output(answer)
        if act.operation or act.plan or act.next_action:
            msg["action"] = {"plan": act.plan, "next_action": act.next_action, "operation": act.operation,
                             "element": act.element_type, "target": act.target, "text": act.text,
                             "boxes": act.boxes}
        else:
            msg["not_action"] = True
    return msg


def session_history(mode: str, retry: bool, clear: bool):
    """(this mode's history, the question to ask again or None): Clear empties it, Retry takes
    the last exchange off to ask its question again."""
    history = st.session_state.setdefault(f"history::{mode}", [])
    if clear:
        history.clear()
    if retry and len(history) >= 2:                 # ask the last question again
        retry_text = history[-2]["text"]
        del history[-2:]
        return history, retry_text
    return history, None


def show_history(mode: str, history: list) -> None:
    if mode == "CogAgent agent":
        st.caption("Each task starts fresh: the model sees one task per screenshot (as the original "
                   "recommends); earlier tasks stay on the page.")
    for msg in history:
        with st.chat_message(msg["role"]):
            st.markdown(msg["content"])
            show_extras(msg)


def respond(loaded, mode, gen, query, history, pixels, bad_image):
    """Stream the answer into the page; the assistant's message, or None when the prompt is too long."""
    from utils.chat import stream_chat
    model, tok, images = loaded
    pairs = [(history[i]["query"], history[i + 1]["content"]) for i in range(0, len(history) - 1, 2)]
    if mode == "CogAgent agent":
        pairs = []                     # a second task in the same history derails the model
    with st.chat_message("user"):
        st.markdown(query)
    with st.chat_message("assistant"):
        if bad_image:
            st.warning("The uploaded image could not be read, so this is answered without an image.")
        try:
            answer = st.write_stream(stream_chat(model, tok, query, pairs, images.get(pixels), None, gen))
        except PromptTooLong as e:
            st.error(str(e))
            return None
        answer = (answer or "").strip() if isinstance(answer, str) else "".join(answer).strip()
        msg = answer_message(mode, answer, pixels)
        show_extras(msg)
    return msg


def main():
    parsed = flags()
    if parsed is None:
        return
    mode, gen, grounding, template, retry, clear = sidebar()
    st.title(mode)
    loaded = loaded_model(*parsed, mode, grounding)
    if loaded is None:
        return
    history, retry_text = session_history(mode, retry, clear)
    pixels, bad_image = uploaded_image(mode)
    show_history(mode, history)
    text = st.chat_input("Ask about the image" if mode != "CogAgent agent" else "Describe the task",
                         key="chat") or retry_text
    if not text:
        return
    query = build_query(mode, text, grounding, template)
    msg = respond(loaded, mode, gen, query, history, pixels, bad_image)
    if msg is not None:
        history += [{"role": "user", "content": query, "query": query, "text": text}, msg]


main()
