"""CogVLM & CogAgent composite demo (Streamlit): CogVLM chat (with grounding), CogAgent chat,
CogAgent agent. See composite_demo/README.md; models come from composite_demo/registry.py.

  streamlit run composite_demo/main.py -- --cogvlm PATH --cogagent PATH
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402

import streamlit as st  # noqa: E402

from composite_demo.registry import MODES, parse  # noqa: E402
from models.generate import GenerationConfig, PromptTooLong  # noqa: E402
from utils.chat.grounding import draw_groundings, parse_agent_output, parse_groundings  # noqa: E402
from utils.chat.image import ImageError, load_image  # noqa: E402
from utils.chat.task_prompts import AGENT_TASK, GROUNDING_TEMPLATES, agent_query, fill  # noqa: E402

st.set_page_config(page_title="CogVLM & CogAgent", layout="wide")


@st.cache_resource(show_spinner="Loading the model (once per server)...")
def load(path: str, device, quant, bf16, fp16, local_tokenizer, dtype="auto", compile_step=False, quant_group=None):
    """(model, tokenizer, image cache) for one checkpoint, shared by every session."""
    import torch
    from utils.apps.args import add_model_args, load_from_args
    from utils.chat import ImageCache
    p = ArgumentParser()
    add_model_args(p)
    args = p.parse_args(["--from_pretrained", path])
    args.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.quant, args.bf16, args.fp16, args.dtype, args.compile = quant, bf16, fp16, dtype, compile_step
    args.quant_group = quant_group
    if local_tokenizer:
        args.local_tokenizer = local_tokenizer
    model, tok = load_from_args(args)
    return model, tok, ImageCache(model.config)


def sidebar():
    with st.sidebar:
        mode = st.radio("Mode", MODES, key="mode")
        st.subheader("Sampling")
        gen = GenerationConfig(
            temperature=st.slider("temperature", 0.0, 1.5, 0.8, 0.05, key="temperature"),
            top_p=st.slider("top_p", 0.0, 1.0, 0.4, 0.05, key="top_p"),
            top_k=st.slider("top_k (1 = greedy)", 1, 100, 1, key="top_k"),
            max_new_tokens=st.slider("max new tokens", 1, 2048, 512, key="max_new_tokens"),
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


def main():
    try:
        reg = parse(sys.argv[1:])
    except ValueError as e:
        st.error(str(e))
        return
    mode, gen, grounding, template, retry, clear = sidebar()
    path = reg.model_for(mode, grounding)
    st.title(mode)
    if path is None:
        st.error("No model configured: start with `-- --cogvlm PATH` / `--cogagent PATH` or set "
                 "COGVLM_MODEL / COGAGENT_MODEL (composite_demo/README.md).")
        return
    try:
        model, tok, images = load(path, reg.device, reg.quant, reg.bf16, reg.fp16, reg.local_tokenizer, reg.dtype,
                                   reg.compile, reg.quant_group)
    except Exception as e:  # noqa: BLE001 - shown in the page; the server keeps running
        st.error(f"Cannot load {path}: {e}")
        return
    key = f"history::{mode}"
    history = st.session_state.setdefault(key, [])
    if clear:
        history.clear()
    retry_text = None
    if retry and len(history) >= 2:                 # ask the last question again
        retry_text = history[-2]["text"]
        del history[-2:]
    upload = st.file_uploader("Image (jpg, png, webp)", type=["jpg", "jpeg", "png", "webp"], key=f"upload::{mode}")
    pixels, bad_image = None, None
    if upload is not None:
        try:
            pixels = load_image(upload.getvalue())
            st.image(pixels, width=320)
        except ImageError as e:
            bad_image = str(e)
            st.error(f"Image not usable: {e}")
    if mode == "CogAgent agent":
        st.caption("Each task starts fresh: the model sees one task per screenshot (as the original "
                   "recommends); earlier tasks stay on the page.")
    for msg in history:
        with st.chat_message(msg["role"]):
            st.markdown(msg["content"])
            show_extras(msg)
    text = st.chat_input("Ask about the image" if mode != "CogAgent agent" else "Describe the task",
                         key="chat") or retry_text
    if not text:
        return
    query = build_query(mode, text, grounding, template)
    pairs = [(history[i]["query"], history[i + 1]["content"]) for i in range(0, len(history) - 1, 2)]
    if mode == "CogAgent agent":
        pairs = []                     # a second task in the same history derails the model
    with st.chat_message("user"):
        st.markdown(query)
    with st.chat_message("assistant"):
        from utils.chat import stream_chat
        if bad_image:
            st.warning("The uploaded image could not be read, so this is answered without an image.")
        try:
            answer = st.write_stream(stream_chat(model, tok, query, pairs, images.get(pixels), None, gen))
        except PromptTooLong as e:
            st.error(str(e))
            return
        answer = (answer or "").strip() if isinstance(answer, str) else "".join(answer).strip()
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
        show_extras(msg)
    history += [{"role": "user", "content": query, "query": query, "text": text}, msg]


main()
