"""The released sizes on this machine: CogVLM-17B (`cogvlm-chat-v1.1`) or CogAgent-18B
(`cogagent-chat`) with their released configs and random weights, built directly in the target
precision through the same streaming path that loads a checkpoint (models.checkpoint.materialize:
one full-precision layer at a time, quantized as it arrives), then measured in one process:
build time, peak RSS, image encoding (CogAgent: plus its 1120-px branch), prefill of image + 30
text tokens, time to first token, decode tokens/s and its fraction of the GEMV bandwidth
measured in the same process.

  python bench/full_size.py --model cogvlm-chat-v1.1 --quant 4 --json out.json
  python bench/full_size.py --model tiny-test-cogagent --quant 8     # seconds, for a check
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import (bench_parser, best_gemv, cpu_features, gemm_flops, held_bytes, image_prompt,  # noqa: E402
                          load_options, logits, now, pack_or_compile, peak_rss, rss_gb, step_kind,
                          write_json)
from models import Cache, CogVLM  # noqa: E402
from models.checkpoint import is_derived, materialize  # noqa: E402
from models.config import MODEL_CONFIGS, get_config  # noqa: E402
from models.generate import ModelInputs, decode_one_token, prefill  # noqa: E402
from models.loading import (LoadOptions, half_layers, layouts_after_loading, memory_returned_to_os,  # noqa: E402
                            resolve_dtype, stream_plans)
from models.quantize import GROUP, GROUPS, VISION_BITS, QuantConfig  # noqa: E402


def peak_rss_gb() -> float:
    return peak_rss() / 1e9


def random_tensors(model: torch.nn.Module, dtype: torch.dtype, device, seed: int = 0):
    """(key, tensor) for every weight of a meta-built model, one at a time, in the target
    dtype on the target device, holding bf16 values as a released checkpoint does: N(0, 0.02)
    matrices and learned embeddings, zero biases, unit norm weights."""
    g = torch.Generator(device=device).manual_seed(seed)
    for name, t in model.state_dict().items():
        if is_derived(name):
            continue
        if t.dim() >= 2 or name.endswith(("boi", "eoi", "cls_embedding", "cls_token", "pos_embed")):
            out = torch.empty(t.shape, dtype=torch.bfloat16, device=device)
            out = out.normal_(0.0, 0.02, generator=g).to(dtype)
        elif name.endswith("bias"):
            out = torch.zeros(t.shape, dtype=dtype, device=device)
        else:
            out = torch.ones(t.shape, dtype=dtype, device=device)
        yield name, out


def model_config(name: str):
    """A released or tiny config by name, or "mid": the mid-size model of bench/decode.py."""
    if name == "mid":
        from bench.decode import MID
        return MID
    return get_config(name)


def build(name: str, dtype: torch.dtype, opts: LoadOptions, stream: bool = True) -> tuple[CogVLM, Optional[dict]]:
    """The model of config `name` with random weights, made as models.loading.load_model reads
    a checkpoint under `opts`: quantized, or the layers whose layout will be `half` converted,
    one layer at a time as its tensors arrive (stream False: after every weight is made, as
    before, for comparison). Returns (model, the layouts left to give it)."""
    with torch.device("meta"):
        model = CogVLM(model_config(name))
    plan, chosen = stream_plans(model, dtype, opts, stream)
    total = len(model.state_dict())
    with memory_returned_to_os():
        materialize(model, random_tensors(model, dtype, opts.device), total, opts.device, plan,
                    half=half_layers(chosen))
    return model.eval(), layouts_after_loading(model, chosen, dtype, plan)


def decode_bytes(model: CogVLM, ctx: int) -> int:
    """What one decode step must read: the language path of every layer (weights as stored,
    scales included), CogAgent's cross query/output and cached K/V, the LM head, the KV cache."""
    cfg = model.config
    n = 0
    for layer in model.model.layers:
        for mod_name, mod in layer.named_modules():
            if not list(mod.children()) and "vision" not in mod_name and "key_value" not in mod_name:
                n += held_bytes(mod)
    n += held_bytes(model.lm_head)
    e = model.model.compute_dtype.itemsize
    n += cfg.num_layers * 2 * ctx * cfg.hidden_size * e
    if cfg.cross is not None:
        n += cfg.num_layers * 2 * cfg.cross.num_patches * cfg.cross.attn_hidden_size * e
    return n


def weights_bytes(model: CogVLM) -> int:
    """Every weight as held in memory (quantized with its scales; oneDNN-packed as its plain size:
    models.quantize.weight_bytes sees parameters and buffers only, not the packed tensors)."""
    return sum(held_bytes(m) for m in model.modules() if not list(m.children()))


def ttft_flops(cfg, T: int) -> float:
    """FLOPs from image to first token: bench/decode.prefill_flops (ViT, adapter, every linear
    once per token through its expert, causal attention, the LM head once) plus, for CogAgent,
    the high-res encoder and each layer's cross attention (K/V of every high-res token once,
    query/output per prompt token, attention over the high-res tokens)."""
    from bench.decode import prefill_flops
    with torch.device("meta"):
        meta = CogVLM(cfg)
    f = prefill_flops(meta, cfg, T, cfg.image_length + 1)
    c = cfg.cross
    if c is not None:
        n = c.num_patches + 1
        vit = sum(p.numel() for name, p in meta.model.cross_vision.named_parameters() if "blocks" in name)
        f += 2 * vit * n + c.num_layers * 4 * n * n * c.hidden_size
        for layer in meta.model.layers:
            a = layer.cross_attn
            f += 2 * a.key_value.weight.numel() * n + 2 * (a.query.weight.numel() + a.dense.weight.numel()) * T
            f += 4 * T * n * c.attn_hidden_size
    return f


@torch.inference_mode()
def measure(model: CogVLM, text_tokens: int, decode_steps: int) -> dict:
    cfg = model.config
    dtype, dev = model.model.compute_dtype, model.model.device
    res = {}
    img = torch.randn(1, 3, cfg.eva.image_size, cfg.eva.image_size, device=dev)
    t = now()
    embeds = model.encode_images(img)
    res["image_s"] = now() - t
    res["peak_rss_image_gb"] = round(peak_rss_gb(), 3)
    cross_kv = None
    res["cross_image_s"] = 0.0
    if cfg.cross is not None:
        t = now()
        cross_kv = model.cross_kv(torch.randn(1, 3, cfg.cross.image_size, cfg.cross.image_size, device=dev))
        res["cross_image_s"] = now() - t
    ids, pos, vision, slots = image_prompt(cfg, text_tokens, device=dev)
    T = ids.shape[1]
    inputs = ModelInputs(ids, pos, vision, slots, image_embeds=embeds, cross_kv=cross_kv)
    cache = Cache.allocate(cfg, 1, T + decode_steps + 2, dtype, dev)
    t = now()
    first = prefill(model, inputs, cache)
    res["prefill_s"] = now() - t
    res["peak_rss_prefill_gb"] = round(peak_rss_gb(), 3)
    res["prompt_tokens"] = T
    res["ttft_s"] = res["image_s"] + res["cross_image_s"] + res["prefill_s"]
    tok = first.argmax(-1)
    t = now()
    decode_one_token(model, tok, cache)                # warm-up (first call allocates, or compiles)
    res["first_step_s"] = now() - t
    steps = []
    for _ in range(decode_steps):
        t = now()
        tok = decode_one_token(model, tok, cache).argmax(-1)
        steps.append(now() - t)
    step = sorted(steps)[len(steps) // 2]
    res["decode_tok_s"] = 1 / step
    res["decode_bytes_per_token"] = decode_bytes(model, T + decode_steps // 2)
    return res


def qlora_step(model: CogVLM, text_tokens: int, rank: int = 10) -> dict:
    """One QLoRA training step, batch 1: the quantized base frozen, LoRA (rank 10, fp32) on the
    attention of every decoder layer (and CogAgent's cross attention), each layer recomputed
    in backward (utils.training.finetune.checkpoint_layers), the image encoders frozen, AdamW on the
    adapters. Returns its wall time and the peak RSS of the process so far."""
    from models.lora import LoRAConfig, apply_lora
    from utils.training.finetune import checkpoint_layers
    cfg = model.config
    dev = model.model.device
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(model, LoRAConfig(rank=rank, alpha=rank), dtype=torch.float32)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    checkpoint_layers(model)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids, pos, vision, slots = image_prompt(cfg, text_tokens, device=dev)
    t = now()
    with torch.no_grad():                              # frozen encoders: no graph, no activations kept
        embeds = model.encode_images(torch.randn(1, 3, cfg.eva.image_size, cfg.eva.image_size, device=dev))
        cross_kv = model.cross_kv(torch.randn(1, 3, cfg.cross.image_size, cfg.cross.image_size, device=dev)) \
            if cfg.cross is not None else None
    out = logits(model, ModelInputs(ids, pos, vision, slots, image_embeds=embeds, cross_kv=cross_kv))
    answer = ~slots[0, 1:]                             # the loss on the text tokens
    loss = torch.nn.functional.cross_entropy(out[0, :-1][answer].float(), ids[0, 1:][answer])
    loss.backward()
    opt.step()
    return {"qlora_step_s": round(now() - t, 2), "qlora_loss": round(float(loss.detach()), 4),
            "qlora_trainable": sum(p.numel() for p in params),
            "qlora_peak_rss_gb": round(peak_rss_gb(), 3)}


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, raw=True, dtype="auto",
                     quant=dict(choices=[0, 4, 8], default=4,
                                help="language model weights: 4 or 8 bits, 0 = unquantized (default 4)"),
                     device=dict(default="cpu", help="cpu, or cuda (quantized with bitsandbytes there)"),
                     threads=dict(default=None, help="default: every core"),
                     compile=dict(help="inductor-compiled decode step (models/compile.py; first_step_s is "
                                       "its compile time)"))
    p.add_argument("--model", default="cogvlm-chat-v1.1", choices=sorted(MODEL_CONFIGS) + ["mid"],
                   help="a released config (cogvlm-chat-v1.1, cogagent-chat, ...), a tiny one, or mid "
                        "(bench/decode.py's mid-size model)")
    p.add_argument("--quant_vision", type=int, choices=[4, 8, 16], default=VISION_BITS,
                   help="image encoders' bits (16 = unquantized; default 8)")
    p.add_argument("--quant_group", type=int, choices=GROUPS, default=GROUP,
                   help=f"inputs per int4 scale (default {GROUP})")
    p.add_argument("--layouts_after_build", action="store_true",
                   help="give the layers their layouts once every weight is made (the way before the half "
                        "layout streamed in): the peak memory that saves")
    p.add_argument("--text_tokens", type=int, default=30)
    p.add_argument("--decode_steps", type=int, default=8)
    p.add_argument("--qlora_step", action="store_true",
                   help="after the inference figures, one QLoRA training step (batch 1): its time and peak RSS")
    return p.parse_args(argv)


def precision_name(a) -> str:
    """The weights' precision as the report names it, e.g. "int4 + vision int8 (groups of 64)"."""
    if not a.quant:
        return "unquantized"
    groups = f" (groups of {a.quant_group})" if 4 in (a.quant, a.quant_vision) else ""
    vision = "int" + str(a.quant_vision) if a.quant_vision != 16 else "unquantized"
    return f"int{a.quant} + vision {vision}{groups}"


def summary(model: CogVLM, r: dict, gemv: float, gemm: float, build_s: float) -> dict:
    """The reported figures of one run, from measure()'s and the roofline's."""
    frac = r["decode_bytes_per_token"] * r["decode_tok_s"] / gemv
    flops = ttft_flops(model.config, r["prompt_tokens"])
    return {"peak_rss_gb": round(peak_rss_gb(), 3), "build_s": round(build_s, 2),
            "weights_gb": round(weights_bytes(model) / 1e9, 4),
            "image_s": round(r["image_s"], 3), "cross_image_s": round(r["cross_image_s"], 3),
            "ttft_s": round(r["ttft_s"], 3), "decode_tok_s": round(r["decode_tok_s"], 3),
            "decode_frac_bw": float(f"{frac:.4g}"), "gemv_gbps": round(gemv / 1e9, 2),
            "ttft_tflop": round(flops / 1e12, 2), "gemm_tflops": round(gemm / 1e12, 3),
            "ttft_frac_gemm": round(flops / r["ttft_s"] / gemm, 3),
            "prefill_s": round(r["prefill_s"], 3), "prompt_tokens": r["prompt_tokens"],
            "decode_gb_per_token": round(r["decode_bytes_per_token"] / 1e9, 3)}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = resolve_dtype(a.dtype, a.device)
    flags, precision = cpu_features(), precision_name(a)
    print(f"{a.model}: {precision}, compute {dtype}, {torch.get_num_threads()} threads, CPU flags {' '.join(flags)}",
          flush=True)
    tiny = a.model.startswith("tiny")                  # a check of the script: small references
    gemv = best_gemv(n=4096 if tiny else 8192, device=a.device)["best"]
    gemm = gemm_flops(n=512 if tiny else 2048, dtype=dtype, device=a.device)
    t = time.perf_counter()
    quant = QuantConfig(a.quant or None, a.quant_vision, a.quant_group)
    model, layouts = build(a.model, dtype, load_options(a.device, not a.compile, a.compile, single_stream=True,
                                                        quant=quant), not a.layouts_after_build)
    build_s = time.perf_counter() - t
    pack_or_compile(model, not a.compile, a.compile, single_stream=True, layouts=layouts)   # as the CLIs load it
    ready_s = time.perf_counter() - t
    build_rss = round(peak_rss_gb(), 3)
    print(f"built in {build_s:.1f} s, peak RSS {build_rss:.2f} GB (now {rss_gb():.2f} GB)", flush=True)
    r = measure(model, a.text_tokens, a.decode_steps)
    out = {"model": a.model, "precision": f"{precision} ({str(dtype).split('.')[-1]})",
           **summary(model, r, gemv, gemm, build_s),
           "threads": torch.get_num_threads(), "cpu_flags": flags, "device": a.device,
           "decode_step": step_kind(model), "first_step_s": round(r["first_step_s"], 2),
           "ready_s": round(ready_s, 2),               # weights made and laid out (compile: before its first step)
           # where the peak happens: ru_maxrss after each phase
           "peak_rss_build_gb": build_rss, "peak_rss_image_gb": r["peak_rss_image_gb"],
           "peak_rss_prefill_gb": r["peak_rss_prefill_gb"]}
    cuda = torch.device(a.device).type == "cuda"
    if cuda:
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        out["gpu"] = torch.cuda.get_device_name()
    if a.qlora_step:
        out.update(qlora_step(model, a.text_tokens))
        if cuda:
            out["qlora_peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    print(json.dumps(out, indent=1))
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
