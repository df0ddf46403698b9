"""Web chat with CogVLM / CogAgent (Gradio 6): upload an image, ask, watch the answer stream;
answers with boxes show the image with the boxes and their phrases drawn beside the chat.

  python basic_demo/web_demo.py --from_pretrained cogvlm-chat-v1.1 --port 7860
  torchrun --standalone --nnodes=1 --nproc-per-node=2 basic_demo/web_demo.py --from_pretrained cogagent-chat

Binds 127.0.0.1 unless --host is given; --share (a public Gradio link) is off by default.
Under torchrun, rank 0 serves the page and the other ranks follow each request.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from any directory
from utils.apps.flags import ArgumentParser  # noqa: E402
from utils.apps.tool import run_tool  # noqa: E402

from models.generate import GenerationConfig, PromptTooLong  # noqa: E402
from utils.apps.args import (GEN_DEFAULTS, UI_MAX_NEW_TOKENS, add_generation_args, add_model_args,  # noqa: E402
                             load_or_report, setup_logging)
from utils.chat import ImageCache, stream_chat  # noqa: E402
from utils.chat.grounding import draw_groundings, parse_groundings  # noqa: E402
from utils.chat.image import ImageError, load_image  # noqa: E402
from utils.serving.lockstep import Lockstep  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, single_stream=True)
    add_generation_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    return p.parse_args(argv)


def make_generate(model, tok, args):
    """The model call every rank runs: (query, history, pixels, sampling) -> text deltas."""
    images = ImageCache(model.config)

    def generate(query, history, pixels, temperature, top_p, top_k, max_new_tokens):
        gen = GenerationConfig(max_length=args.max_length, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, top_k=top_k,
                               repetition_penalty=args.repetition_penalty, seed=args.seed)
        return stream_chat(model, tok, query, history, images.get(pixels), args.version, gen)
    return generate


def make_respond(step: Lockstep):
    """The Send handler: every rank runs the answer (Lockstep); rank 0 streams it to the page."""
    import gradio as gr

    def respond(query, picture, chat, history, temperature, top_p, top_k, max_new_tokens):
        """Streams (chatbot, history, boxes image, error text). `picture`: the path of the
        last image that decoded (a bad upload never replaces it)."""
        query = (query or "").strip()
        if not query:
            yield chat, history, gr.update(), "⚠️ **Type a question first.**"
            return
        try:
            pixels = load_image(picture) if picture else None
        except ImageError as e:                       # the file changed since it was checked
            yield chat, history, gr.update(), f"⚠️ **Error:** {e}"
            return
        chat = chat + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        answer, deltas = "", None
        try:
            deltas = step.call("generate", query, history, pixels, float(temperature), float(top_p),
                               int(top_k), int(max_new_tokens))
            for d in deltas:
                answer += d
                chat[-1] = {"role": "assistant", "content": answer}
                yield chat, history, gr.update(), ""
        except PromptTooLong as e:
            yield chat[:-2], history, gr.update(), f"⚠️ **Error:** {e}"
            return
        finally:                       # the other ranks run the whole answer: so does rank 0
            for _ in deltas or ():
                pass
        answer = answer.strip()
        history = history + [(query, answer)]
        boxes = parse_groundings(answer)
        # The panel shows this answer's boxes, or nothing: never an earlier answer's.
        yield chat, history, draw_groundings(pixels, boxes) if boxes and pixels is not None else None, ""
    return respond


def new_image(path, chat, history, picture):
    """(upload box, chat, history, boxes, preview, picture, error): a good image starts a
    new chat; a bad one is reported in our own words and changes nothing else. The upload
    box is emptied either way, ready for the next file (the preview shows the image)."""
    import gradio as gr
    if not path:
        return None, chat, history, gr.update(), gr.update(), picture, ""
    try:
        load_image(path)
    except ImageError as e:
        return (None, chat, history, gr.update(), gr.update(), picture,
                f"⚠️ **Error:** {e}. The chat goes on with the previous image (or none).")
    return None, [], [], None, path, path, ""


def clear_chat():
    """(chat, history, boxes, upload box, preview, picture, error), all empty."""
    return [], [], None, None, None, None, ""


def build_app(step: Lockstep, title: str = "CogVLM / CogAgent"):
    import gradio as gr
    respond = make_respond(step)
    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\nUpload an image (or none for text-only chat), then ask. "
                    "Answers with `[[x0,y0,x1,y1]]` boxes are drawn on the right.")
        history = gr.State([])
        picture = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                # A plain file input: the upload is decoded by us (Gradio's image input fails on a
                # bad file with its own popup and loses the chat).
                image = gr.File(label="Image (png, jpg, webp, gif)", type="filepath", elem_id="image-input")
                preview = gr.Image(label="Image", interactive=False, elem_id="image-preview", height=320)
                temperature = gr.Slider(0.0, 1.5, value=GEN_DEFAULTS.temperature, step=0.05,
                                        label="temperature", elem_id="temperature")
                top_p = gr.Slider(0.0, 1.0, value=GEN_DEFAULTS.top_p, step=0.05, label="top_p", elem_id="top_p")
                top_k = gr.Slider(1, 100, value=GEN_DEFAULTS.top_k, step=1, label="top_k (1 = greedy)",
                                  elem_id="top_k")
                max_new = gr.Slider(1, 2048, value=UI_MAX_NEW_TOKENS, step=1, label="max new tokens", elem_id="max_new")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="Chat", elem_id="chatbot", height=420)
                error = gr.Markdown("", elem_id="error")
                query = gr.Textbox(label="Question", placeholder="Ask about the image", elem_id="query")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear_btn = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1):
                boxes = gr.Image(type="pil", label="Boxes in the answer", elem_id="grounding-output",
                                 interactive=False, height=320)
        inputs = [query, picture, chat, history, temperature, top_p, top_k, max_new]
        outputs = [chat, history, boxes, error]
        for ev in (send.click, query.submit):
            ev(respond, inputs, outputs).then(lambda: "", None, query)
        clear_btn.click(clear_chat, None, [chat, history, boxes, image, preview, picture, error])
        image.upload(new_image, [image, chat, history, picture],
                     [image, chat, history, boxes, preview, picture, error])
    return app


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    loaded = load_or_report(args)
    if loaded is None:
        return 1
    model, tok = loaded
    step = Lockstep({"generate": make_generate(model, tok, args)})
    if step.rank != 0:
        return step.follow()
    with step:
        app = build_app(step)
        # Gradio's own start-up lines advise `share=True in launch()`; ours name our flag.
        print(f"web demo on http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
              + ("" if args.share else " (for a public link, restart with --share)"), flush=True)
        # one request at a time: every rank must run the same calls in the same order
        app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port,
                                                      share=args.share, show_error=True, quiet=True)
    return 0


if __name__ == "__main__":
    run_tool(main)                              # under torchrun: every rank leaves together
