"""Prefill and decode speed of the model core against this machine's own roofline.

Mid-size random-weight CogVLM (language hidden 2048, 16 layers, 16 heads, MLP 5632, vocab
32000; vision hidden 512, 4 layers, 8 heads, 224 px), in --dtype, optionally --quant 8|4
(PyTorch's weight-only CPU kernels). Every figure is a median of several runs; ratios are
taken against GEMV / GEMM figures measured in the same process: decode bandwidth against the
best GEMV this process measures (fp32, bf16 plain, ATen GEMV and oneDNN-packed), prefill against the
GEMM of the compute dtype. With no flags it measures what the single-stream apps (CLIs, web
and composite demos) run: --dtype auto, each linear layer in the layout measured fastest here
(--kernels auto), no batch invariance (it guards batches; --deterministic times the server's
invariant single row). With --quant, the same model unquantized is prefilled in the same process, alternating,
and `prefill_vs_bf16` (or `_vs_float32`) in the JSON is the quantized prefill's time over it.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import (best_gemv, bench_parser, cpu_features, gemm_dtype, gemm_flops, held_bytes,  # noqa: E402
                          image_prompt, median_time, medians, pack_or_compile, random_model, read_bandwidth, step_kind,
                          write_json)
from models import Cache, CogVLM, CrossConfig, EVAConfig, ModelConfig  # noqa: E402
from models.generate import ModelInputs, decode_one_token, prefill  # noqa: E402
from models.layout import use_fast_cpu_layout  # noqa: E402
from models.loading import resolve_dtype  # noqa: E402
from models.quantize import default_backend, quantize  # noqa: E402

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
    """Bytes a decode step must read, as held (common.held_bytes: quantized weights with their
    scales, fp16 copies as fp16): language weights, LM head, norms, one embedding row, and the
    K/V cache of `ctx` tokens."""
    lang = sum(held_bytes(m) for n, m in model.model.layers.named_modules()
               if not list(m.children()) and ("language" in n or "layernorm" in n and "cross" not in n))
    head = held_bytes(model.lm_head)
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


@dataclass
class Measured:
    """The mid-size CogVLM and a CogAgent sharing its language model, as the rounds measure them."""
    model: CogVLM
    agent: CogVLM
    prompt: ModelInputs                               # the short prompt (24 text tokens)
    run_prefill: Callable[[], None]                   # image encoder + that prompt, once
    step_bytes: dict                                  # context -> bytes a CogVLM decode step reads
    agent_extra: int                                  # bytes of the cross branch's weights
    cross_kv: list                                    # the agent's high-res K/V
    unquantized_prefill: Optional[Callable[[], None]] = None   # --quant: the same prefill unquantized


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, threads=2, repeat=5, steps=12, dtype="auto", device="cpu", deterministic=None,
                     quant=dict(help="weight-only int8/int4, image encoder int8"),
                     compile=dict(help="inductor-compiled decode step with frozen weights (models/compile.py; "
                                       "plain weights); default: as the CLIs, compiled in the background "
                                       "where it pays and used if timed faster; --no-compile: eager"))
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: each linear layer in the layout measured fastest on this CPU, as every app "
                        "loads it (--kernels auto; default); --no-packed: PyTorch's own layout")
    p.add_argument("--backend", default=None, choices=["torch", "bitsandbytes"],
                   help="quantization kernels (default: torch on CPU, bitsandbytes on CUDA)")
    a = p.parse_args(argv)
    a.packed = a.packed and not a.compile              # inductor lays the weights out itself
    return a


def build(dev: torch.device, dtype: torch.dtype, bits, backend: str, packed: bool, compiled: bool,
          deterministic=None) -> Measured:
    """The CogVLM, its short prompt, and the CogAgent (the same language model, shared tensors,
    plus the cross branch), each quantized, packed or compiled on its own copy as asked."""
    model = random_model(MID, dtype, device=dev)
    prompt = make_inputs(MID, 24, model, False)
    run_prefill = prefill_run(model, prompt, dev)
    agent_cfg = ModelConfig(**{**MID.__dict__, "model_class": "CogAgentModel", "cross": MID_CROSS,
                               "adapter_has_pos_embed": True})
    agent = with_cross_branch(model, agent_cfg)
    if dtype == torch.float32 and dev.type == "cpu":
        use_fast_cpu_layout(agent)
    unquantized = None
    if bits:                                           # each quantizes its own copy
        # the same weights unquantized, prepared as the apps would, to time its prefill alongside
        unquantized = pack_or_compile(copy.deepcopy(model), packed, False, deterministic, single_stream=True)
        quantize(agent, bits, vision_bits=8, backend=backend)
        quantize(model, bits, vision_bits=8, backend=backend)
    T = prompt.input_ids.shape[1]
    agent_extra = _bytes(t for n, t in list(agent.model.layers.named_parameters()) +
                         list(agent.model.layers.named_buffers()) if "cross" in n)
    for m in (model, agent):                           # after sharing: the agent packs its own
        pack_or_compile(m, packed, compiled, deterministic, single_stream=True)
    step_bytes = {c: decode_bytes(model, MID, c) for c in (T, T + 1016)}     # as the layouts hold them
    with torch.inference_mode():
        ckv = agent.cross_kv(torch.randn(1, 3, MID_CROSS.image_size, MID_CROSS.image_size, device=dev))
    return Measured(model, agent, prompt, run_prefill, step_bytes, agent_extra, ckv,
                    prefill_run(unquantized, prompt, dev) if unquantized is not None else None)


def prefill_run(model: CogVLM, inputs: ModelInputs, device):
    """A function running the image encoder + the prompt's prefill, as in real use."""
    img = torch.randn(1, 3, MID.eva.image_size, MID.eva.image_size, device=device)
    T = inputs.input_ids.shape[1]

    def run():
        cache = Cache.allocate(MID, 1, T + 1, model.model.compute_dtype, device)
        with torch.inference_mode():
            inputs.image_embeds = model.encode_images(img)
            prefill(model, inputs, cache)
    return run


def measure_rounds(m: Measured, repeat: int, steps: int, dev, dtype, start: dict) -> dict:
    """Medians over --repeat rounds that interleave every measurement, so drift hits all alike:
    decode steps (short and long context, CogVLM and CogAgent), prefill, and the machine's
    GEMV, memory read and GEMM figures (`start`: those measured before the model was built)."""
    ctx = m.prompt.input_ids.shape[1]
    runs = {"short": [], "long": [], "agent": [], "vlm": [], "prefill": [], "read": [], **start}
    prefills = {"prefill": m.run_prefill}
    if m.unquantized_prefill:                          # alternating with it: the box drifts 2x between processes
        prefills["prefill_unquantized"] = m.unquantized_prefill
    for fn in prefills.values():                       # warm-up
        fn()
    for i in range(repeat):
        runs["gemv"].append(best_gemv(repeat=7, device=dev)["best"])
        runs["read"].append(read_bandwidth(repeat=5, device=dev))
        runs["gemm"].append(gemm_flops(repeat=3, dtype=dtype, device=dev))
        # each goes first in every other round: the first prefill after the references ran 15% slower
        for name in list(prefills)[::-1 if i % 2 else 1]:
            runs.setdefault(name, []).append(median_time(prefills[name], 1, 0))
        runs["short"].append(decode_step_time(m.model, ctx, steps))
        runs["long"].append(decode_step_time(m.model, ctx + 1016, steps))   # ~1300 tokens of context
        runs["vlm"].append(decode_step_time(m.model, ctx, steps))
        runs["agent"].append(decode_step_time(m.agent, ctx, steps, m.cross_kv))
    return {**medians(runs), "rounds": len(runs["gemv"])}


def report_prefill(res: dict, med: dict, gemv: dict, dtype, T: int, n_vis: int) -> None:
    bw, flops, read, t_prefill = med["gemv"], med["gemm"], med["read"], med["prefill"]
    res.update(gemv_GBps=bw / 1e9, gemm_GFLOPs=flops / 1e9, read_GBps=read / 1e9)
    print(f"medians of {med['rounds']} measurements taken between the runs: best GEMV {bw / 1e9:.1f} GB/s "
          f"({', '.join(f'{k} {v / 1e9:.1f}' for k, v in gemv.items())} at start), memory read "
          f"{read / 1e9:.1f} GB/s, GEMM ({gemm_dtype(dtype, res['device'])}) {flops / 1e9:.0f} GFLOP/s")
    with torch.device("meta"):                         # parameter counts, whatever the layout
        counted = CogVLM(MID)
    f = prefill_flops(counted, MID, T, n_vis)
    res.update(prefill_tokens=T, prefill_s=t_prefill, prefill_gemm_fraction=f / t_prefill / flops)
    print(f"prefill: {T} tokens ({n_vis} vision) + image encoder: {t_prefill:.3f} s, "
          f"{f / t_prefill / 1e9:.0f} GFLOP/s = {res['prefill_gemm_fraction']:.0%} of GEMM")
    if "prefill_unquantized" in med:
        name = f"prefill_vs_{str(dtype).split('.')[-1].replace('bfloat16', 'bf16')}"
        res[name] = t_prefill / med["prefill_unquantized"]
        print(f"the same prefill unquantized ({dtype}), same process, alternating: "
              f"{med['prefill_unquantized']:.3f} s; quantized / unquantized = {res[name]:.2f}x ({name})")


def report_decode(res: dict, med: dict, m: Measured) -> None:
    ctx_short = m.prompt.input_ids.shape[1]
    ctx_long = ctx_short + 1016
    for label, ctx in (("short", ctx_short), ("long", ctx_long)):
        step, nbytes = med[label], m.step_bytes[ctx]
        frac = nbytes / step / med["gemv"]
        res[f"decode_{label}_ctx"] = ctx
        res[f"decode_{label}_tok_s"] = 1 / step
        res[f"decode_{label}_bw_fraction"] = frac
        res[f"decode_{label}_read_fraction"] = nbytes / step / med["read"]
        print(f"decode at {ctx} tokens of context: {1 / step:.2f} tok/s, {step * 1e3:.1f} ms/step, "
              f"{nbytes / 1e9:.2f} GB/token = {frac:.0%} of the best GEMV bandwidth, "
              f"{res[f'decode_{label}_read_fraction']:.0%} of memory read")
    res["long_over_short"] = med["long"] / med["short"]
    ideal = m.step_bytes[ctx_long] / m.step_bytes[ctx_short]
    print(f"slowdown {ctx_short} -> {ctx_long} context: {res['long_over_short']:.3f}x "
          f"(bytes read grow {ideal:.3f}x)")
    extra = m.agent_extra + _bytes(t for kv in m.cross_kv for t in kv)
    res["cogagent_step_ratio"] = med["agent"] / med["vlm"]
    res["cogagent_bytes_ratio"] = 1 + extra / m.step_bytes[ctx_short]
    print(f"CogAgent decode step / CogVLM decode step: {res['cogagent_step_ratio']:.3f}x "
          f"(bytes read grow {res['cogagent_bytes_ratio']:.3f}x: {MID_CROSS.num_patches} high-res "
          f"tokens, cross width {MID_CROSS.attn_hidden_size})")


def main(argv=None) -> int:
    a = parse_args(argv)
    dev = torch.device(a.device)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = resolve_dtype(a.dtype, dev)
    backend = a.backend or default_backend(dev)
    flags = cpu_features()
    print(f"CPU flags: {' '.join(flags)}; dtype {dtype}, quant {a.quant}, packed {a.packed}, compile {a.compile}")
    gemv = best_gemv(device=dev)
    start = {"gemv": [gemv["best"]], "gemm": [gemm_flops(dtype=dtype, device=dev)]}
    m = build(dev, dtype, a.quant, backend, a.packed, a.compile, a.deterministic)
    res = {"device": str(dev), "backend": backend if a.quant else None, "packed": a.packed,
           "dtype": str(dtype).split(".")[-1], "quant": a.quant, "cpu_flags": flags,
           "gemv_GBps_by_kernel": {k: v / 1e9 for k, v in gemv.items()}}
    res["decode_step"] = step_kind(m.model)            # eager, or compiled (--compile, or in the background)
    med = measure_rounds(m, a.repeat, a.steps, dev, dtype, start)
    report_prefill(res, med, gemv, dtype, m.prompt.input_ids.shape[1], int(m.prompt.vision_mask.sum()))
    report_decode(res, med, m)
    write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
