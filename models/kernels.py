"""Which kernel each linear layer runs, chosen by timing the candidates on the machine that
runs (at load, a few seconds, cached), since the fastest one differs between CPUs: oneDNN-packed
bf16 was the fastest single-row kernel on an AMD EPYC with AVX-512 BF16 and the slowest on an
Intel Xeon with AMX (the torch 2.13 wheel's oneDNN has an fp32-only matrix-vector path).

Candidates for a CPU nn.Linear in fp32 / bf16, each a weight layout (layout.LAYOUTS):
  packed    oneDNN's blocked layout (layout.PackedLinear) laid out for a decode step's rows,
            where layout.can_pack allows
  packed_many  the same, laid out for a prefill's rows (layout.MANY_ROWS): on a Xeon with AMX
            1.5x row-major F.linear at 257-288 rows where `packed` ran 0.6x, as fast for one row
  plain     F.linear on the weight row-major (PyTorch's own layout)
  colmajor  F.linear on the weight column-major (same shape, transposed strides)
  gemv      row-major; a single row through ATen's own matrix-vector kernel (oneDNN off for
            that call, layout.GemvLinear), more rows as plain. Not a candidate under
            batch-invariant decoding, which pads single rows to several (models/invariant.py)
  upcast    bf16 where oneDNN has no bf16 kernels (AVX2-only CPUs), where bf16 layers have no
            other layout but half (a forced one takes upcast): row-major bf16, products of
            more than 16 rows in fp32 on the weight converted chunk by chunk
            (layout.UpcastLinear), fewer as plain
  half      weights fp16 holds exactly (bf16 ones, and every bf16 checkpoint loaded in fp32):
            an fp16 copy in FBGEMM's packed layout, the product in fp32 (layout.HalfLinear);
            half the bytes of fp32 to read. Under batch-invariant decoding not a candidate for
            layers that decode where its single rows need padding (invariant.half_pads)
Quantized layers keep their weight-only int8 / int4 kernels (quantize.WeightOnlyLinear, which
picks the kernel or a dequantized GEMM by row count itself), except int8 layers only prefill
uses: their prefill dequantizes the whole weight either way, so they choose between packed or
packed_many (the codes kept in that blocked order, layout.PackedInt8Linear) and plain (row-major codes) by
the bf16 / fp32 GEMM of their shape, the same probes as an nn.Linear of that shape. Modules that
are not exactly an nn.Linear or a WeightOnlyLinear (tensor-parallel pieces) are left alone.

The int8 / int4 layers of an fp32 model also choose, by timing one row of their commonest
shape, whether PyTorch's one-token kernel gets fp32 or bf16 activations
(choose_quantized_kernels): the wheel's fp32 weight-only kernels are scalar. And every int8 /
int4 layer that decodes takes PyTorch's kernel up to the row count where, timed on its shape,
the dequantized weight's GEMM becomes faster (choose_kernel_rows; again against the compiled
int4 expansion once that is in use, compile.expand_int4_in_background).

Each shape class (dtype, outputs, inputs) is timed per regime: decode (1 row), batch (4 rows:
batched decoding) and prefill (283 rows, standing in for prompts of 300-1300 rows and the image
encoders), with one layer's own weight, the median of a few calls, the layouts taking turns
(each holds its own copy of that one layer meanwhile), every call with the CPU caches flushed
first as a real step finds them (a weight that stays cached between calls favours other
kernels: packed bf16 won from the cache, ATen's GEMV from memory, on the AMD EPYC). The timings are cached in
$XDG_CACHE_HOME/cogvlm/kernels.json (default ~/.cache), valid while the CPU model, its flags
and the torch version stay the same; missing entries are measured within BUDGET_S.

A layer holds one layout (no weight stored twice: at full size memory binds). The layers only
prefill uses (image encoders and adapter, the vision experts, CogAgent's cross key/value) take
the prefill regime's fastest; the LM head (prefill computes only the last row) the decode
regime's; every other layer the layout of least cost over a typical request: one prefill of
TYPICAL_PREFILL_ROWS rows (its time scaled linearly from the 283 measured) plus
TYPICAL_DECODE_STEPS decode steps. Decode steps are costed at one row, or at the batch regime
where batch-invariant decoding pads single rows to a few (models/invariant.py): every step of a
batching app (the server, the evaluation runner) then runs several rows.
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from .layout import (LAYOUTS, PACKED, UPCAST_FROM_ROWS, PackedInt8Linear, PackedLinear, can_half, can_pack, can_upcast,
                     fp16_exact, relayout, role)
from .lora import has_adapter
from .quantize import WeightOnlyLinear
from .machine import cpu_flags, last_level_cache_bytes

log = logging.getLogger(__name__)

CHOICES = ("auto",) + LAYOUTS                     # --kernels
# A prefill is timed on 283 rows, no multiple of a kernel's row block, as real prompts are
# not: on a Xeon with AMX a weight packed for one row ran exactly 256 rows 1.7x faster than
# 257-288 (those timings chose it for the image tokens, then 0.8 TFLOP/s against 1.3 plain).
REGIMES = {"decode": 1, "batch": 4, "prefill": 283}    # regime -> rows timed
# The typical request the single layout of a layer used by both prefill and decode is chosen
# for: a prompt of 300-1300 tokens (an image is 1,227 of CogVLM-17B's), 100-200 new tokens.
TYPICAL_PREFILL_ROWS = 800
TYPICAL_DECODE_STEPS = 150
FLUSH_MAX_BYTES = 512 << 20  # the read that flushes the caches before each timed call, at most
BUDGET_S = 4.0              # measuring stops starting new shape classes after this long
REPEAT = {"decode": 7, "batch": 5, "prefill": 3, "rows": 3, "long": 3}     # timed calls per probe (after one warm-up)
# The row counts a weight-only layer's two paths are timed at (choose_kernel_rows): both cost about
# a + b x rows (AMX Xeon: int4 12288x4096, kernel 0.63 ms a row; compiled expansion + GEMM 22 ms + 0.07 a row).
KERNEL_ROW_PROBES = (16, 64)
MAX_KERNEL_ROWS = 1024      # a crossover extrapolated beyond this is taken as this
# ...and below this as this: a decode step of the server's largest batch (invariant.ROWS, which
# a test holds this to) always runs the kernel (batch-invariant padding assumes one kernel there).
MIN_KERNEL_ROWS = 16
# A prefill-only packed layer may run an image's rows in this many GEMM calls (choose_row_pieces),
# of at least MIN_PIECE_ROWS rows each (CogVLM-17B's 1,226; 224-px models' 257 stay one call).
ROW_PIECES = (1, 2, 3)
MIN_PIECE_ROWS = 384
# 2: timings taken with the caches flushed before each call (version 1's were partly from cache:
# a 2048x2048 bf16 weight read 98 GB/s packed from the AMD EPYC's L3, 15 GB/s from memory).
# 3: prefill timed on 283 rows, not 256; the packed_many layout.
CACHE_VERSION = 3

ROLE_REGIMES = {"prefill": ("prefill",), "decode": ("decode", "batch"), "both": ("decode", "batch", "prefill")}


@dataclass(frozen=True)
class Probe:
    """One timing: `layout`'s kernel on a weight of out x inp in `dtype`, on `rows` rows (the
    rows of `regime`; the cache key names the rows, not the regime)."""
    layout: str
    dtype: str
    out: int
    inp: int
    rows: int
    threads: int
    regime: str = "prefill"

    @property
    def key(self) -> str:
        return f"{self.layout} {self.dtype} {self.out}x{self.inp} rows={self.rows} threads={self.threads}"


def median_seconds(probes: list, runs: list) -> list:
    """The default timer: the median wall time of each run() over a few calls, after one
    warm-up each, every call with the CPU caches flushed first (a read of twice the last-level
    cache), as a real step finds them: it reads gigabytes of weights, so no layer's weight is
    still cached when its turn comes. The runs (one regime, every layout) take turns, so a
    machine whose speed drifts (a busy shared box) slows them alike."""
    flush = torch.ones(min(2 * last_level_cache_bytes(), FLUSH_MAX_BYTES) // 4)   # fp32
    for run in runs:
        run()
    times = [[] for _ in runs]
    for _ in range(REPEAT[probes[0].regime]):
        for run, t in zip(runs, times):
            flush.sum()
            start = time.perf_counter()
            run()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


# ---------------------------------------------------------------------------------------
# The cache
def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the platform's word for it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "unknown"


def machine_id() -> dict:
    """What the timings depend on: a change of any of these invalidates the cache."""
    return {"cpu": cpu_model(), "flags": " ".join(sorted(cpu_flags())), "torch": torch.__version__}


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "cogvlm" / "kernels.json"


def read_cache(path: Path, ident: dict) -> dict:
    """probe key -> seconds, from `path` if it was written on this machine (`ident`), else {}."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(d, dict) or d.get("version") != CACHE_VERSION or d.get("machine") != ident \
            or not isinstance(d.get("timings"), dict):
        return {}
    return {k: float(v) for k, v in d["timings"].items() if isinstance(v, (int, float))}


def write_cache(path: Path, ident: dict, timings: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")   # (a background thread writes too)
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "machine": ident, "timings": timings}, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("kernel timings not cached (%s: %s); they will be measured again next time", path, e)


# ---------------------------------------------------------------------------------------
# Shape classes and measuring
@dataclass
class ShapeClass:
    """The linear layers of one dtype and shape: names -> role, and the layouts they can take."""
    dtype: torch.dtype
    out: int
    inp: int
    layers: dict
    layouts: tuple
    weight: Callable[[], torch.Tensor]              # one layer's weight, for timing
    int8: bool = False      # int8 layers only prefill uses, timed by the GEMM they run (dequantized)

    def probe(self, layout: str, regime: str) -> Probe:
        if layout == "gemv" and REGIMES[regime] > 1:   # gemv is plain beyond one row: plain's figure
            layout = "plain"
        if layout == "upcast" and REGIMES[regime] <= UPCAST_FROM_ROWS:   # upcast is plain up to there
            layout = "plain"
        return Probe(layout, str(self.dtype).replace("torch.", ""), self.out, self.inp, REGIMES[regime],
                     torch.get_num_threads(), regime)

    def regimes(self) -> list:
        return [r for r in REGIMES if any(r in ROLE_REGIMES[x] for x in self.layers.values())]


def _int8_prefill_only(name: str, mod: nn.Module, devices: tuple) -> bool:
    """An int8 weight-only layer only prefill uses, in a dtype oneDNN packs (layout.PackedInt8Linear)."""
    return mod.bits == 8 and role(name) == "prefill" and mod.qweight.device.type in devices \
        and can_pack(mod.dtype) and not has_adapter(mod)


def available_layouts(dtype: torch.dtype, cpu_layout: bool = True, single_row: bool = True,
                      half: bool = False) -> tuple:
    """The layouts a CPU weight of `dtype` can take here (cpu_layout False: no re-striding;
    single_row False: decode products never have a single row, so gemv is plain; half: an fp32
    or bf16 weight fp16 holds exactly, where FBGEMM runs: half_offered)."""
    half = ("half",) if half else ()
    if can_upcast(dtype):
        # upcast runs plain's kernel up to 16 rows (gemv's one too: without bf16 in oneDNN a
        # single bf16 row goes to ATen either way) and fp32 GEMMs beyond, where the others run
        # bf16 GEMMs 4-6x slower (colmajor 20x): timing those took 86 s at load (AVX2 EPYC).
        return ("upcast",) + half
    return tuple(x for x in LAYOUTS if (x not in PACKED or can_pack(dtype)) and (x != "colmajor" or cpu_layout)
                 and (x != "gemv" or single_row) and x not in ("upcast", "half")) + half


def half_offered(w: torch.Tensor) -> bool:
    """Whether the half layout is a candidate for weight `w`: fp32 or bf16, fp16 holds its values
    (a benchmark's model on the meta device stands in for released bf16 weights), FBGEMM runs."""
    return w.dtype in (torch.float32, torch.bfloat16) and can_half() and (w.device.type == "meta" or fp16_exact(w))


def random_weight(mod: nn.Module) -> torch.Tensor:
    """A weight of `mod`'s shape and dtype to time kernels on, for a model on the meta device."""
    return (torch.randn(mod.weight.shape) * 0.02).to(mod.weight.dtype)


def shape_classes(model: nn.Module, cpu_layout: bool = True, weight_of: Optional[Callable] = None,
                  single_row: bool = True, skip: frozenset = frozenset()) -> dict:
    """(dtype, out, in) -> ShapeClass of every plain floating-point CPU nn.Linear of `model`
    not named in `skip`, the largest (most bytes held) first. weight_of(layer): the weight timed
    (default the layer's own; random ones for a model built on the meta device)."""
    devices = ("cpu", "meta") if weight_of else ("cpu",)
    weight_of = weight_of or (lambda m: m.weight.detach() if type(m) is nn.Linear else m.dequantize())
    classes = {}
    for name, mod in model.named_modules():
        if name in skip:
            continue
        if type(mod) is WeightOnlyLinear:
            if not _int8_prefill_only(name, mod, devices):
                continue
            key, layouts = (mod.dtype, mod.out_features, mod.in_features, "int8"), ("packed", "packed_many", "plain")
        else:
            w = getattr(mod, "weight", None)
            if type(mod) is not nn.Linear or w.device.type not in devices or not w.dtype.is_floating_point:
                continue
            half = half_offered(w)
            key = (w.dtype, mod.out_features, mod.in_features) + (("fp16-exact",) if half else ())
            layouts = available_layouts(w.dtype, cpu_layout, single_row, half)
        if key not in classes:
            classes[key] = ShapeClass(*key[:3], {}, layouts, lambda m=mod: weight_of(m), key[3:] == ("int8",))
        classes[key].layers[name] = role(name)
    return dict(sorted(classes.items(), key=lambda kv: -len(kv[1].layers) * kv[0][1] * kv[0][2]))


@torch.inference_mode()
def measure_class(cls: ShapeClass, timings: dict, timer: Callable) -> None:
    """Time every missing (layout, regime) of `cls` into `timings`: per regime, the layouts
    in turn (timer(probes, runs) -> seconds each). Each layout holds its own copy of one
    layer's weight while this runs."""
    mods = {}
    for layout in cls.layouts:
        lin = nn.Linear(cls.inp, cls.out, bias=False, device="meta")
        lin.weight = nn.Parameter(cls.weight(), requires_grad=False)   # relayout copies, never writes it
        mods[layout] = relayout(lin, layout)
    for regime in cls.regimes():
        wanted = {}                        # probe key -> (probe, a layout it stands for)
        for layout in cls.layouts:
            p = cls.probe(layout, regime)
            if p.key not in timings:
                wanted.setdefault(p.key, (p, layout))
        if not wanted:
            continue
        x = torch.randn(REGIMES[regime], cls.inp).to(cls.dtype)
        probes = [p for p, _ in wanted.values()]
        seconds = timer(probes, [lambda m=mods[layout]: m(x) for _, layout in wanted.values()])
        timings.update({p.key: float(t) for p, t in zip(probes, seconds)})


def measure(classes: dict, timings: dict, timer: Callable, budget: Optional[float] = None) -> list:
    """Fill `timings` for every class, largest first, starting no class after `budget` seconds
    (default BUDGET_S). Returns the classes left unmeasured."""
    budget = BUDGET_S if budget is None else budget
    start, skipped = time.perf_counter(), []
    for key, cls in classes.items():
        if all(cls.probe(x, r).key in timings for x in cls.layouts for r in cls.regimes()):
            continue
        if time.perf_counter() - start > budget:
            skipped.append(key)
            continue
        measure_class(cls, timings, timer)
    return skipped


# ---------------------------------------------------------------------------------------
# Choosing
def cost(seconds: dict, layer_role: str, decode: str = "decode") -> float:
    """The time a layer of `layer_role` spends in a typical request, from its regime -> seconds.
    decode: the regime a decode step's rows run in ("batch" where single rows are padded)."""
    if layer_role == "prefill":
        return seconds["prefill"]
    if layer_role == "decode":
        return seconds[decode]
    return (seconds["prefill"] * TYPICAL_PREFILL_ROWS / REGIMES["prefill"]
            + seconds[decode] * TYPICAL_DECODE_STEPS)


def seconds_of(cls: ShapeClass, timings: dict) -> dict:
    """layout -> regime -> seconds of `cls` (the regimes measured)."""
    return {x: {r: timings[cls.probe(x, r).key] for r in cls.regimes() if cls.probe(x, r).key in timings}
            for x in cls.layouts}


def fastest(cls: ShapeClass, timings: dict, layer_role: str, decode: str = "decode",
            exclude: tuple = ()) -> Optional[str]:
    """The layout of least cost for layers of `layer_role` (ties: LAYOUTS order) among those not
    excluded, None unmeasured."""
    secs = seconds_of(cls, timings)
    layouts = [x for x in cls.layouts if x not in exclude]
    needed = {r for r in ROLE_REGIMES[layer_role] if r in ("prefill", decode)}   # what cost() reads
    if any(not needed <= set(secs[x]) for x in layouts):
        return None
    return min(layouts, key=lambda x: (cost(secs[x], layer_role, decode), LAYOUTS.index(x)))


def default_layout(cls: ShapeClass) -> str:
    """What a layer takes unmeasured, or forced to a layout it cannot take: packed where it can
    (the previous fixed choice), else column-major fp32 weights of more outputs than inputs."""
    if cls.int8:
        return "plain"                                     # as quantized: row-major codes
    if "upcast" in cls.layouts:
        return "upcast"
    if "packed" in cls.layouts:
        return "packed"
    return "colmajor" if "colmajor" in cls.layouts and cls.dtype == torch.float32 and cls.out > cls.inp else "plain"


def forced_layouts(classes: dict, layout: str) -> dict:
    """name -> layout for a forced --kernels (one of LAYOUTS): nothing is measured."""
    return {name: layout if layout in cls.layouts else default_layout(cls)
            for cls in classes.values() for name in cls.layers}


def unit(rows: int) -> str:
    return "GB/s" if rows <= REGIMES["batch"] else "TFLOP/s"


def rate(probe: Probe, seconds: float) -> float:
    """A timing as the figure that compares kernels (unit(rows)): GB/s of weight read for a
    few rows, TFLOP/s for many."""
    size = 2 if probe.dtype in ("bfloat16", "float16") or probe.layout == "half" else 4
    if probe.rows <= REGIMES["batch"]:
        return probe.out * probe.inp * size / seconds / 1e9
    return 2 * probe.rows * probe.out * probe.inp / seconds / 1e12


def describe(classes: dict, timings: dict, layouts: dict) -> str:
    """Per shape class: the layout(s) chosen (per role when they differ) and every measured
    layout's figure per regime."""
    parts = []
    for cls in classes.values():
        by_role = {}
        for name, r in cls.layers.items():
            by_role.setdefault(r, layouts[name])
        chosen = next(iter(by_role.values())) if len(set(by_role.values())) == 1 else \
            ", ".join(f"{r}-only {x}" if r != "both" else x for r, x in by_role.items())
        figures = "; ".join(f"{REGIMES[r]} row{'s' if REGIMES[r] > 1 else ''} {unit(REGIMES[r])} " + " ".join(
            f"{x} {rate(cls.probe(x, r), timings[cls.probe(x, r).key]):.{1 if REGIMES[r] <= 4 else 2}f}"
            for x in cls.layouts if cls.probe(x, r).key in timings) for r in cls.regimes()
            if any(cls.probe(x, r).key in timings for x in cls.layouts))
        dtype = ("int8 -> " if cls.int8 else "") + str(cls.dtype).replace("torch.", "")
        parts.append(f"{dtype} {cls.out}x{cls.inp} (x{len(cls.layers)}) -> {chosen}"
                     + (f" [{figures}]" if figures else ""))
    return "; ".join(parts)


def choose_layouts(model: nn.Module, kernels: str = "auto", cpu_layout: bool = True, remeasure: bool = False,
                   timer: Optional[Callable] = None, budget: Optional[float] = None, single_row: bool = True,
                   half_pads: Optional[Callable] = None, weight_of: Optional[Callable] = None,
                   skip: frozenset = frozenset()) -> dict:
    """name -> layout for every plain CPU linear layer of `model` (apply with
    layout.apply_layouts). kernels: auto = measured here (cached; remeasure: time again),
    or one of LAYOUTS forced on every layer that can take it. timer(probes, runs) -> seconds
    (default median_seconds); single_row False: decoding pads single rows (batch-invariant),
    so gemv is no candidate and decode steps are costed at the few-row regime, and
    half_pads(dtype, out, inp) says where half's single rows need padding too (then layers that
    decode do without it: invariant.half_pads); weight_of, skip: as shape_classes' (a model on
    the meta device: random_weight, less the layers a load quantizes). Logs one line: the
    choice and the figures that chose it."""
    if kernels not in CHOICES:
        raise ValueError(f"--kernels takes {', '.join(CHOICES)}, not {kernels!r}")
    classes = shape_classes(model, cpu_layout, weight_of, single_row or kernels != "auto", skip)   # forced: as asked
    quantized = sum(1 for m in model.modules() if hasattr(m, "qweight")) \
        - sum(len(c.layers) for c in classes.values() if c.int8)
    tail = f"; {quantized} quantized layers keep their weight-only kernels" if quantized else ""
    if kernels != "auto":
        layouts = forced_layouts(classes, kernels)
        log.info("kernels: --kernels %s, nothing measured: %s%s", kernels, describe(classes, {}, layouts), tail)
        return layouts
    if not classes:
        return {}
    path, ident = cache_path(), machine_id()
    timings = read_cache(path, ident)
    if remeasure:
        for cls in classes.values():
            for x in cls.layouts:
                for r in cls.regimes():
                    timings.pop(cls.probe(x, r).key, None)
    budget = BUDGET_S if budget is None else budget    # read when called: tests raise it
    before, start = dict(timings), time.perf_counter()
    skipped = measure(classes, timings, timer or median_seconds, budget)
    took = time.perf_counter() - start
    if timings != before:
        write_cache(path, ident, timings)
    # Batch-invariant decoding pads a single row to a few: its steps cost what the few-row regime
    # does, but for half, whose padding may be many rows (layers that decode then do without it).
    decode = "decode" if single_row else "batch"
    padded = {k for k, cls in classes.items() if not single_row and half_pads and "half" in cls.layouts
              and any(r != "prefill" for r in cls.layers.values()) and half_pads(cls.dtype, cls.out, cls.inp)}
    layouts = {name: fastest(cls, timings, r, decode, ("half",) if k in padded and r != "prefill" else ())
               or default_layout(cls) for k, cls in classes.items() for name, r in cls.layers.items()}
    how = f"measured in {took:.1f} s, saved to" if timings != before else "timings cached in"
    note = f"; {len(skipped)} shape classes over the {budget:.0f} s budget take the default until the next load" \
        if skipped else ""
    log.info("kernels chosen by timing this CPU (%s %s; --kernels to force, --remeasure_kernels to time again): "
             "%s%s%s", how, path, describe(classes, timings, layouts), note, tail)
    return layouts


def compiled_layouts(model: nn.Module, remeasure: bool = False, weight_of: Optional[Callable] = None,
                     skip: frozenset = frozenset()) -> dict:
    """name -> layout for the layers a compiled model lays out itself: those only prefill runs
    (the decode step never reads them) take their measured choice, as eagerly; of the others,
    those whose measured choice is "half", in fp32 (or bf16 where oneDNN has no bf16), keep it.
    Every other layer keeps plain weights for inductor to pack: its kernels read an fp32 weight
    at best at the memory rate (mid-size fp32 step 94% of memory read, AVX2 EPYC), which
    `half`'s half the bytes beat."""
    chosen = choose_layouts(model, "auto", remeasure=remeasure, weight_of=weight_of, skip=skip)
    dtype = {name: model.get_submodule(name).weight.dtype for name, x in chosen.items()
             if x == "half" and role(name) != "prefill"}
    return {**{name: x for name, x in chosen.items() if role(name) == "prefill"},
            **{name: "half" for name, d in dtype.items() if d == torch.float32 or can_upcast(d)}}


# ---------------------------------------------------------------------------------------
# Quantized layers of fp32 models: the activations' dtype in PyTorch's one-token kernels
def choose_quantized_kernels(model: nn.Module, remeasure: bool = False, timer: Optional[Callable] = None) -> dict:
    """For the int8 / int4 layers of an fp32 CPU model: bits -> the activation dtype their
    one-token kernel runs in, fp32 or bf16, whichever one row of their commonest shape (the
    most bytes) runs faster here (cached with the layouts' timings), and switch the layers to it
    (WeightOnlyLinear.kernel_in). In the torch 2.13 wheel the fp32 kernels are scalar: int8 2.4
    GB/s, int4 0.6 against 14-22 / 13-17 in bf16 (AMD EPYC); bf16 activations round to 8 bits of
    mantissa, below int8's and int4's own weight error. Logs one line when it measures."""
    layers = [m for m in model.modules() if type(m) is WeightOnlyLinear and m.dtype == torch.float32
              and m.qweight.device.type == "cpu"]
    if not layers:
        return {}
    path, ident = cache_path(), machine_id()
    timings = read_cache(path, ident)
    chosen, figures = {}, []
    for bits in sorted({m.bits for m in layers}):
        shapes = {}                                   # (out, in) -> layers: time the most bytes' shape
        for m in layers:
            if m.bits == bits:
                shapes.setdefault((m.out_features, m.in_features), []).append(m)
        big = max(shapes.values(), key=lambda ms: len(ms) * ms[0].out_features * ms[0].in_features)[0]
        probes = [Probe(f"int{bits}", d, big.out_features, big.in_features, 1, torch.get_num_threads(), "decode")
                  for d in ("float32", "bfloat16")]
        if remeasure or any(p.key not in timings for p in probes):
            timings.update({p.key: float(t) for p, t in zip(probes, _time_kernels(big, probes, timer))})
            write_cache(path, ident, timings)
        secs = [timings[p.key] for p in probes]
        chosen[bits] = torch.bfloat16 if secs[1] < secs[0] else torch.float32
        gbs = [big.out_features * big.in_features * bits / 8 / t / 1e9 for t in secs]
        figures.append(f"int{bits} {big.out_features}x{big.in_features}: fp32 {gbs[0]:.1f}, bf16 {gbs[1]:.1f} GB/s "
                       f"-> {str(chosen[bits]).replace('torch.', '')}")
    if model.runtime.tp_world > 1:                   # split layers: every rank computes alike
        from .tp import from_group_leader
        chosen = from_group_leader(chosen)
    for m in layers:
        if chosen[m.bits] != torch.float32:
            m.kernel_in(chosen[m.bits])
    log.info("quantized one-token kernels of this fp32 model, activations in the dtype measured faster here: %s",
             "; ".join(figures))
    return chosen


@torch.inference_mode()
def _time_kernels(layer: WeightOnlyLinear, probes: list, timer: Optional[Callable]) -> list:
    """Seconds of one row through a random layer of `layer`'s shape and bits, per probe's dtype."""
    base = WeightOnlyLinear(torch.randn(layer.out_features, layer.in_features) * 0.02, None, layer.bits, layer.group)
    runs = []
    for p in probes:
        q = copy.deepcopy(base)                       # quantized once; each probe its own scales
        if p.dtype != "float32":
            q.kernel_in(getattr(torch, p.dtype))
        x = torch.randn(1, layer.in_features)
        runs.append(lambda q=q, x=x: q._matmul(x))
    return (timer or median_seconds)(probes, runs)


# ---------------------------------------------------------------------------------------
# Weight-only layers: up to how many rows PyTorch's kernel beats the dequantized GEMMs
def choose_kernel_rows(model: nn.Module, remeasure: bool = False, timer: Optional[Callable] = None) -> dict:
    """Give each int8 / int4 layer that runs PyTorch's weight-only kernel (quantize.WeightOnlyLinear
    with few_row_kernel) the row count up to which that kernel is faster on this machine than
    dequantizing the weight for a dense GEMM (`kernel_rows`), timed per shape class at
    KERNEL_ROW_PROBES rows on one of its own layers (cached with the layouts' timings). Both costs
    grow linearly with the rows; the crossover of the two lines is taken, at least
    MIN_KERNEL_ROWS (a decode step of the server's largest batch always runs the kernel) and at
    most MAX_KERNEL_ROWS. Tensor-parallel ranks take their group leader's. Logs one line.
    Returns (bits, dtype, out, in) -> rows."""
    layers = [m for name, m in model.named_modules() if type(m) is WeightOnlyLinear and role(name) == "both"
              and m.qweight.device.type == "cpu"]       # (prefill-only layers never, the LM head always, take one row)
    chosen = measure_kernel_rows(layers, "dequantized", remeasure, timer)
    if model.runtime.tp_world > 1 and chosen:      # split layers: every rank computes alike
        from .tp import from_group_leader
        chosen = from_group_leader(chosen)
        for m in layers:
            m.kernel_rows = chosen[rows_class(m)]
    return chosen


def rows_class(m: WeightOnlyLinear) -> tuple:
    return (m.bits, str(m.dtype).replace("torch.", ""), m.out_features, m.in_features)


def _rows_probes(m: WeightOnlyLinear, expansion: str) -> list:
    """Probes of the kernel and of the dequantized path (`expansion`: "dequantized", eager
    passes; "fused", int4's compiled expansion) at KERNEL_ROW_PROBES rows."""
    kernel = str(m.kernel_dtype).replace("torch.", "")
    name = f"int{m.bits}" + (f"g{m.group}" if m.bits == 4 else "")
    return [Probe(f"{name}-{path}", kernel if path == "kernel" else rows_class(m)[1], m.out_features,
                  m.in_features, rows, torch.get_num_threads(), "rows")
            for path in ("kernel", expansion) for rows in KERNEL_ROW_PROBES]


def crossover(seconds: list) -> int:
    """The kernel_rows of a class from its probes' seconds (kernel at KERNEL_ROW_PROBES rows, then
    the dequantized path at the same): where the two lines meet, within [MIN_KERNEL_ROWS, MAX_KERNEL_ROWS]."""
    (r0, r1), (k0, k1, d0, d1) = KERNEL_ROW_PROBES, seconds
    kernel_slope, dequant_slope = (k1 - k0) / (r1 - r0), (d1 - d0) / (r1 - r0)
    if kernel_slope <= dequant_slope:              # the kernel never falls behind
        return MAX_KERNEL_ROWS
    rows = r0 + ((d0 - k0) / (kernel_slope - dequant_slope))
    return int(min(MAX_KERNEL_ROWS, max(MIN_KERNEL_ROWS, rows)))


def measure_kernel_rows(layers: list, expansion: str = "dequantized", remeasure: bool = False,
                        timer: Optional[Callable] = None, busy: Optional[float] = None) -> dict:
    """choose_kernel_rows for `layers` (expansion: see _rows_probes). busy: timed beside other
    work (the background compile of the int4 expansion, which measures again with "fused" once
    it is used): a class whose kernel now takes more than `busy` times its cached figures keeps
    its rows, and the cached kernel figures stay. Returns the classes set: key -> rows."""
    classes = {}                                         # key -> its layers
    for m in layers:
        if m.few_row_kernel:
            classes.setdefault(rows_class(m), []).append(m)
    path, ident = cache_path(), machine_id()
    timings, chosen, figures, busy_classes = read_cache(path, ident), {}, [], 0
    before = dict(timings)
    for key, members in classes.items():
        probes = _rows_probes(members[0], expansion)
        if remeasure:                                    # the compiled expansion's figures are timed again too
            for p in _rows_probes(members[0], "fused"):
                timings.pop(p.key, None)
        seconds = [timings.get(p.key) for p in probes]
        if remeasure or None in seconds:
            cached = timings.get(probes[0].key)
            seconds = [float(t) for t in _time_rows(members[0], probes, timer)]
            if busy and cached is not None and seconds[0] > busy * cached:
                busy_classes += 1
                continue
            timings.update({p.key: t for p, t in zip(probes, seconds) if not busy or p.key not in timings})
        chosen[key] = crossover(seconds)
        for m in members:
            m.kernel_rows = chosen[key]
        figures.append(f"int{key[0]} {key[2]}x{key[3]} -> {chosen[key]} rows [kernel / {expansion} ms: "
                       + ", ".join(f"{r} rows {seconds[i] * 1e3:.1f} / {seconds[i + 2] * 1e3:.1f}"
                                   for i, r in enumerate(KERNEL_ROW_PROBES)) + "]")
    if timings != before:
        write_cache(path, ident, timings)
    if figures:
        log.info("weight-only kernels up to the rows where the %s weight's GEMM is faster here (%s): %s",
                 expansion, "measured" if timings != before else "cached", "; ".join(figures))
    if busy_classes:
        log.info("weight-only kernels: %d shape classes timed while the CPU was busy keep their rows", busy_classes)
    return chosen


@torch.inference_mode()
def _time_rows(layer: WeightOnlyLinear, probes: list, timer: Optional[Callable]) -> list:
    """Seconds of `layer`'s kernel, then of its dequantized path, at each probe's rows."""
    runs = [functools.partial(layer._matmul, torch.randn(p.rows, layer.in_features).to(layer.dtype),
                              p.layout.endswith("-kernel")) for p in probes]
    return (timer or median_seconds)(probes, runs)


# ---------------------------------------------------------------------------------------
# Prefill-only packed layers: an image's rows in one GEMM call or in a few
def choose_row_pieces(model: nn.Module, rows: Optional[int] = None, remeasure: bool = False,
                      timer: Optional[Callable] = None, budget: Optional[float] = None) -> dict:
    """Give each oneDNN-packed layer only prefill runs (layout.PackedLinear, PackedInt8Linear:
    image encoders, adapter, int8 vision experts) the rows per GEMM call (`row_step`) its shape
    ran fastest at on this machine for `rows` rows (default: an image's tokens), among the rows
    in ROW_PIECES calls of at least MIN_PIECE_ROWS each (on the AMX Xeon, CogVLM-17B's image
    encoder at 1,226 rows: its 1792x15360 layer 0.85 TFLOP/s in one call, 1.39 in two). Timed
    on one layer of each shape class, largest first, none started after `budget` s (default
    BUDGET_S; the rest keep one call), cached. Logs one line. Returns (kind, dtype, out, in) -> row_step."""
    rows = rows or getattr(getattr(model, "config", None), "image_length", 0) + 1
    counts = [k for k in ROW_PIECES if rows // k >= MIN_PIECE_ROWS]
    classes = {}
    for name, m in model.named_modules():
        if isinstance(m, (PackedLinear, PackedInt8Linear)) and role(name) == "prefill":
            classes.setdefault((type(m).__name__, str(m.dtype).replace("torch.", ""), m.out_features, m.in_features),
                               []).append(m)
    if len(counts) < 2 or not classes:
        return {}
    path, ident = cache_path(), machine_id()
    timings, chosen, figures, skipped = read_cache(path, ident), {}, [], 0
    before, start = dict(timings), time.perf_counter()
    for key, members in sorted(classes.items(), key=lambda kv: -len(kv[1]) * kv[0][2] * kv[0][3]):
        probes = [Probe(f"{key[0]}-pieces{k}", key[1], key[2], key[3], rows, torch.get_num_threads(), "long")
                  for k in counts]
        if remeasure or any(p.key not in timings for p in probes):
            if time.perf_counter() - start > (BUDGET_S if budget is None else budget):
                skipped += 1
                continue
            timings.update({p.key: float(t) for p, t in zip(probes, _time_pieces(members[0], rows, counts, probes,
                                                                                  timer))})
        seconds = [timings[p.key] for p in probes]
        best = counts[seconds.index(min(seconds))]
        chosen[key] = step = None if best == 1 else -(-rows // best)
        for m in members:
            m.row_step = step
        figures.append(f"{key[0]} {key[2]}x{key[3]} -> {best} call{'s' * (best > 1)} [ms: "
                       + ", ".join(f"{k} {t * 1e3:.0f}" for k, t in zip(counts, seconds)) + "]")
    if timings != before:
        write_cache(path, ident, timings)
    note = f"; {skipped} shape classes over the {BUDGET_S if budget is None else budget:.0f} s budget: one call " \
        "until a later load times them" if skipped else ""
    log.info("prefill-only packed layers, an image's %d rows in the GEMM calls measured fastest here: %s%s", rows,
             "; ".join(figures), note)
    return chosen


@torch.inference_mode()
def _time_pieces(layer: nn.Module, rows: int, counts: list, probes: list, timer: Optional[Callable]) -> list:
    """Seconds of `layer` on `rows` rows in each of `counts` GEMM calls (its row_step put back after)."""
    x, kept = torch.randn(rows, layer.in_features).to(layer.dtype), layer.row_step

    def run(k: int):
        layer.row_step = None if k == 1 else -(-rows // k)
        layer(x)
    try:
        return (timer or median_seconds)(probes, [functools.partial(run, k) for k in counts])
    finally:
        layer.row_step = kept
