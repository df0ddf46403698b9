"""Prefill and decode speed of the model core against this machine's own roofline.

Mid-size random-weight CogVLM (language hidden 2048, 16 layers, 16 heads, MLP 5632, vocab
32000; vision hidden 512, 4 layers, 8 heads, 224 px), in --dtype, optionally --quant 8|4
(PyTorch's weight-only CPU kernels). Every figure is a median of several runs; ratios are
taken against GEMV / GEMM figures measured in the same process: decode bandwidth against the
best GEMV this process measures (fp32 and bf16, plain and oneDNN-packed), prefill against the
GEMM of the compute dtype.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import (best_gemv, compile_or_exit, gemm_flops, image_prompt, median_time,  # noqa: E402
                          read_bandwidth)
from models import Cache, CogVLM, CrossConfig, EVAConfig, ModelConfig  # noqa: E402
from models.generate import ModelInputs, decode_one_token, prefill  # noqa: E402
from models.layout import pack_for_cpu_inference, use_fast_cpu_layout  # noqa: E402
from models.loading import init_weights  # noqa: E402

MID = ModelConfig(num_layers=16, hidden_size=2048, num_attention_heads=16, inner_hidden_size=5632,
                  vocab_size=32000, max_sequence_length=4096,
                  eva=EVAConfig(num_layers=4, hidden_size=512, num_attention_heads=8,
                                inner_hidden_size=2048, image_size=224))
# The high-res branch scaled like the released one relative to its language model
# (cross attention width = hidden / 4, encoder 4 blocks at 448 px: 1024 high-res tokens).
MID_CROSS = CrossConfig(image_size=448, hidden_size=512, num_layers=4, num_attention_heads=8,
                        inner_hidden_size=1365, head_out_dim=256, attn_hidden_size=512, attn_head_dim=32)


def make_inputs(cfg: ModelConfig, n_text: int, model: CogVLM, with_cross: bool) -> ModelInputs:
    dev = next(model.parameters()).device
    ids, pos, vision, slots = image_prompt(cfg, n_text, device=dev)
    with torch.inference_mode():
        emb = model.encode_images(torch.randn(1, 3, cfg.eva.image_size, cfg.eva.image_size, device=dev))
        ckv = model.cross_kv(torch.randn(1, 3, cfg.cross.image_size, cfg.cross.image_size, device=dev)) \
            if with_cross else None
    return ModelInputs(ids, pos, vision, slots, image_embeds=emb, cross_kv=ckv)


def prefill_flops(model: CogVLM, cfg: ModelConfig, T: int, n_vision: int) -> float:
    """FLOPs the prefill must do: every linear once per token with the expert it is routed
    to, causal attention (half the score matrix), the ViT, and the LM head for the last token."""
    lang = sum(p.numel() for n, p in model.model.layers.named_parameters() if "language" in n)
    vis = sum(p.numel() for n, p in model.model.layers.named_parameters() if "vision" in n)
    f = 2 * lang * (T - n_vision) + 2 * vis * n_vision
    f += cfg.num_layers * 2 * T * T * cfg.hidden_size            # QK^T and AV, causal half
    e = cfg.eva
    n = e.num_patches + 1
    vit = sum(p.numel() for n_, p in model.model.vision.named_parameters() if "transformer" in n_)
    f += 2 * vit * n + e.num_layers * 4 * n * n * e.hidden_size
    f += 2 * sum(p.numel() for p in model.model.vision.linear_proj.parameters()) * e.num_patches
    f += 2 * cfg.hidden_size * cfg.vocab_size
    return f


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def decode_bytes(model: CogVLM, cfg: ModelConfig, ctx: int) -> float:
    """Bytes a decode step must read, as stored (quantized weights and their scales included):
    language weights, LM head, norms, one embedding row, and the K/V cache of `ctx` tokens.
    Call before packing (oneDNN's packed tensors do not report their size)."""
    layers = model.model.layers
    lang = _bytes(t for n, t in list(layers.named_parameters()) + list(layers.named_buffers())
                  if "language" in n or "layernorm" in n and "cross" not in n)
    head = _bytes(list(model.lm_head.parameters()) + list(model.lm_head.buffers()))
    e = model.model.compute_dtype.itemsize
    kv = cfg.num_layers * 2 * ctx * cfg.hidden_size * e
    return lang + head + cfg.hidden_size * 2 * e + kv


def decode_step_time(model: CogVLM, ctx: int, steps: int, cross_kv=None, batch: int = 1) -> float:
    """Median seconds of one decode step with `ctx` tokens already in the cache. The cache
    holds random K/V (a step's cost does not depend on their values), which spares a prefill."""
    cfg = model.config
    p = next(model.parameters())
    with torch.inference_mode():                   # as in generation (a compiled step guards on it)
        cache = Cache.allocate(cfg, batch, ctx + steps + 2, p.dtype, p.device)
        for t in cache.k + cache.v:
            t.normal_()
        cache.length, cache.next_position, cache.cross_kv = ctx, torch.full((batch,), ctx, device=p.device), cross_kv
        tok = torch.full((batch,), 5, device=p.device)
        decode_one_token(model, tok, cache)                             # warm-up
        return median_time(lambda: decode_one_token(model, tok, cache), steps, 0)


def with_cross_branch(model: CogVLM, cfg: ModelConfig) -> CogVLM:
    """A CogAgent sharing `model`'s tensors, with a randomly initialised cross branch."""
    from models.checkpoint import regenerate_derived
    with torch.device("meta"):
        agent = CogVLM(cfg)
    agent.load_state_dict(model.state_dict(), strict=False, assign=True)
    dtype = model.lm_head.weight.dtype
    for name, t in list(agent.named_parameters()):
        if t.is_meta:
            mod_name, _, attr = name.rpartition(".")
            new = (torch.randn(t.shape) * 0.02 if t.dim() > 1 else torch.ones(t.shape)).to(
                dtype=dtype, device=model.lm_head.weight.device)
            setattr(agent.get_submodule(mod_name), attr, torch.nn.Parameter(new))
    regenerate_derived(agent, model.lm_head.weight.device)
    return agent.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--packed", action="store_true",
                   help="oneDNN-packed fp32/bf16 linear weights, as the demos and the server use on CPU")
    p.add_argument("--compile", action="store_true",
                   help="inductor-compiled decode step with frozen weights (models/compile.py; plain weights)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--quant", type=int, choices=[4, 8], default=None,
                   help="weight-only int8/int4, image encoder int8")
    p.add_argument("--backend", default=None, choices=["torch", "bitsandbytes"],
                   help="quantization kernels (default: torch on CPU, bitsandbytes on CUDA)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.compile and a.packed:
        p.error("--compile packs the weights itself: leave out --packed")
    dev = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from models.loading import cpu_flags, resolve_dtype
    from models.quantize import default_backend, quantize
    dtype = resolve_dtype(a.dtype, dev)
    backend = a.backend or default_backend(dev)
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"})
    print(f"CPU flags: {' '.join(flags)}; dtype {dtype}, quant {a.quant}, packed {a.packed}, compile {a.compile}")

    gemv = best_gemv(device=dev)
    bw, flops = gemv["best"], gemm_flops(dtype=dtype, device=dev)
    with torch.device(dev):
        model = CogVLM(MID)
    init_weights(model)
    model = model.to(dtype).eval()
    if dtype == torch.float32 and dev.type == "cpu":
        use_fast_cpu_layout(model)
    res = {"device": str(dev), "backend": backend if a.quant else None, "packed": a.packed, "dtype": str(dtype).split(".")[-1], "quant": a.quant, "cpu_flags": flags,
           "gemv_GBps_by_kernel": {k: v / 1e9 for k, v in gemv.items()}}
    with torch.device("meta"):                         # parameter counts, whatever the layout
        counted = CogVLM(MID)

    short = make_inputs(MID, 24, model, False)
    T = short.input_ids.shape[1]
    n_vis = int(short.vision_mask.sum())
    img = torch.randn(1, 3, 224, 224, device=dev)

    def run_prefill():                                 # image encoder + prompt, as in real use
        cache = Cache.allocate(MID, 1, T + 1, dtype, dev)
        with torch.inference_mode():
            short.image_embeds = model.encode_images(img)
            prefill(model, short, cache)

    # CogAgent: the same language model (shared tensors) plus the cross branch.
    agent_cfg = ModelConfig(**{**MID.__dict__, "model_class": "CogAgentModel", "cross": MID_CROSS,
                               "adapter_has_pos_embed": True})
    agent = with_cross_branch(model, agent_cfg)
    if dtype == torch.float32 and dev.type == "cpu":
        use_fast_cpu_layout(agent)
    if a.quant:                                        # each quantizes its own copy
        quantize(agent, a.quant, vision_bits=8, backend=backend)
        quantize(model, a.quant, vision_bits=8, backend=backend)
    step_bytes = {c: decode_bytes(model, MID, c) for c in (T, T + 1016)}
    agent_extra = _bytes(t for n, t in list(agent.model.layers.named_parameters()) +
                         list(agent.model.layers.named_buffers()) if "cross" in n)
    if a.packed:                                       # after sharing: the agent packs its own
        pack_for_cpu_inference(agent)
        pack_for_cpu_inference(model)
    if a.compile:
        compile_or_exit(model)
        compile_or_exit(agent)
        res["compiled"] = True
    with torch.inference_mode():
        ckv = agent.cross_kv(torch.randn(1, 3, MID_CROSS.image_size, MID_CROSS.image_size, device=dev))
    ctx_short, ctx_long = T, T + 1016                   # ~280 and ~1300 tokens of context
    runs = {"short": [], "long": [], "agent": [], "vlm": []}
    bws, gemms, prefills, reads = [bw], [flops], [], []
    run_prefill()                                      # warm-up
    for _ in range(a.repeat):                          # interleaved, so drift hits all alike
        bws.append(best_gemv(repeat=7, device=dev)["best"])
        reads.append(read_bandwidth(repeat=5, device=dev))
        gemms.append(gemm_flops(repeat=3, dtype=dtype, device=dev))
        prefills.append(median_time(run_prefill, 1, 0))
        runs["short"].append(decode_step_time(model, ctx_short, a.steps))
        runs["long"].append(decode_step_time(model, ctx_long, a.steps))
        runs["vlm"].append(decode_step_time(model, ctx_short, a.steps))
        runs["agent"].append(decode_step_time(agent, ctx_short, a.steps, ckv))
    med = {k: statistics.median(v) for k, v in runs.items()}
    bw, flops, t_prefill = statistics.median(bws), statistics.median(gemms), statistics.median(prefills)
    read = statistics.median(reads)
    res.update(gemv_GBps=bw / 1e9, gemm_GFLOPs=flops / 1e9, read_GBps=read / 1e9)
    print(f"medians of {len(bws)} measurements taken between the runs: best GEMV {bw / 1e9:.1f} GB/s "
          f"({', '.join(f'{k} {v / 1e9:.1f}' for k, v in gemv.items())} at start), memory read "
          f"{read / 1e9:.1f} GB/s, GEMM ({dtype}) {flops / 1e9:.0f} GFLOP/s")
    f = prefill_flops(counted, MID, T, n_vis)
    res.update(prefill_tokens=T, prefill_s=t_prefill, prefill_gemm_fraction=f / t_prefill / flops)
    print(f"prefill: {T} tokens ({n_vis} vision) + image encoder: {t_prefill:.3f} s, "
          f"{f / t_prefill / 1e9:.0f} GFLOP/s = {res['prefill_gemm_fraction']:.0%} of GEMM")
    for label, ctx in (("short", ctx_short), ("long", ctx_long)):
        step = med[label]
        frac = step_bytes[ctx] / step / bw
        res[f"decode_{label}_ctx"] = ctx
        res[f"decode_{label}_tok_s"] = 1 / step
        res[f"decode_{label}_bw_fraction"] = frac
        res[f"decode_{label}_read_fraction"] = step_bytes[ctx] / step / read
        print(f"decode at {ctx} tokens of context: {1 / step:.2f} tok/s, {step * 1e3:.1f} ms/step, "
              f"{step_bytes[ctx] / 1e9:.2f} GB/token = {frac:.0%} of the best GEMV bandwidth, "
              f"{res[f'decode_{label}_read_fraction']:.0%} of memory read")
    res["long_over_short"] = med["long"] / med["short"]
    ideal = step_bytes[ctx_long] / step_bytes[ctx_short]
    print(f"slowdown {ctx_short} -> {ctx_long} context: {res['long_over_short']:.3f}x "
          f"(bytes read grow {ideal:.3f}x)")
    extra = agent_extra + _bytes(t for kv in ckv for t in kv)
    res["cogagent_step_ratio"] = med["agent"] / med["vlm"]
    res["cogagent_bytes_ratio"] = 1 + extra / step_bytes[ctx_short]
    print(f"CogAgent decode step / CogVLM decode step: {res['cogagent_step_ratio']:.3f}x "
          f"(bytes read grow {res['cogagent_bytes_ratio']:.3f}x: {MID_CROSS.num_patches} high-res "
          f"tokens, cross width {MID_CROSS.attn_hidden_size})")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
