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

from models.generate import GenerationConfig, PromptTooLong  # noqa: E402
from utils.args import GEN_DEFAULTS, add_generation_args, add_model_args, load_or_report, setup_logging  # noqa: E402
from utils.chat import ImageCache, stream_chat  # noqa: E402
from utils.grounding import draw_groundings, parse_groundings  # noqa: E402
from utils.image import ImageError, load_image  # noqa: E402
from utils.lockstep import Lockstep  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
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


def build_app(step: Lockstep, title: str = "CogVLM / CogAgent"):
    import gradio as gr

    def respond(query, image_path, chat, history, temperature, top_p, top_k, max_new_tokens):
        """Streams (chatbot, history, boxes image, error text)."""
        query = (query or "").strip()
        if not query:
            yield chat, history, gr.update(), "Type a question first."
            return
        try:
            pixels = load_image(image_path) if image_path else None
        except ImageError as e:
            yield chat, history, gr.update(), f"**Error:** {e}"
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
            yield chat[:-2], history, gr.update(), f"**Error:** {e}"
            return
        finally:                       # the other ranks run the whole answer: so does rank 0
            for _ in deltas or ():
                pass
        answer = answer.strip()
        history = history + [(query, answer)]
        boxes = parse_groundings(answer)
        drawn = draw_groundings(pixels, boxes) if boxes and pixels is not None else None
        yield chat, history, drawn if drawn is not None else gr.update(), ""

    def clear():
        return [], [], None, None, ""

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"## {title}\nUpload an image (or none for text-only chat), then ask. "
                    "Answers with `[[x0,y0,x1,y1]]` boxes are drawn on the right.")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", elem_id="image-input", height=320)
                temperature = gr.Slider(0.0, 1.5, value=GEN_DEFAULTS.temperature, step=0.05,
                                        label="temperature", elem_id="temperature")
                top_p = gr.Slider(0.0, 1.0, value=GEN_DEFAULTS.top_p, step=0.05, label="top_p", elem_id="top_p")
                top_k = gr.Slider(1, 100, value=GEN_DEFAULTS.top_k, step=1, label="top_k (1 = greedy)",
                                  elem_id="top_k")
                max_new = gr.Slider(1, 2048, value=512, step=1, label="max new tokens", elem_id="max_new")
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
        inputs = [query, image, chat, history, temperature, top_p, top_k, max_new]
        outputs = [chat, history, boxes, error]
        for ev in (send.click, query.submit):
            ev(respond, inputs, outputs).then(lambda: "", None, query)
        clear_btn.click(clear, None, [chat, history, boxes, image, error])
        image.change(lambda: ([], [], None, ""), None, [chat, history, boxes, error])   # new image: new chat
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
        # one request at a time: every rank must run the same calls in the same order
        app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port,
                                                      share=args.share, show_error=True)
    return 0


if __name__ == "__main__":
    from models.tp import exit_process
    exit_process(main())                        # under torchrun: every rank leaves together
