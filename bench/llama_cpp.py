"""llama.cpp, type for type, on this machine: the language model of bench/decode.py's mid-size
config (hidden 2048, 16 layers, 16 heads, MLP 5632, vocab 32000) as a random-weight LLaMA GGUF,
measured by llama.cpp's own `llama-bench` (prefill of 283 text tokens, decode at 283 tokens of
context), interleaved round by round with the project's model of the same type as the apps run it
here (unquantized in --dtype auto against BF16 or F32, int8 per row against Q8_0, int4 per 64
against Q4_0, each layer's kernel measured on this CPU), so the box's drift hits both alike. Decode is
reported against the memory read bandwidth (a plain reduction) and the best PyTorch GEMV measured
in the same process. llama.cpp has no visual expert: its model is the language model alone and its
prefill is text only, while ours includes the image encoder and the 257 image tokens' expert.

llama.cpp without git: llama-cpp-python's source package vendors it.
    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -G Ninja -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
    ninja -C build llama-bench llama-quantize
    python bench/llama_cpp.py --llama_cpp $PWD --json bench/results_llama_cpp.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import (bench_parser, best_gemv, cpu_start, median_time, medians, pack_or_compile,  # noqa: E402
                          random_model, read_bandwidth, write_cpu_json)
from bench.decode import MID  # noqa: E402


def write_gguf(path: Path, gguf, cfg=MID, seed: int = 0) -> None:
    """A LLaMA with MID's language-model shapes, bf16 matrices (the released dtype), fp32 norms,
    random normal weights (std 0.02) and a vocabulary of dummy tokens (llama.cpp's "none")."""
    c, rng = cfg, np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_sequence_length)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.inner_hidden_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_attention_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("none")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    bf16 = gguf.GGMLQuantizationType.BF16

    def matrix(name, rows, cols):
        data = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)
        w.add_tensor(name, gguf.quants.quantize(data, bf16), raw_dtype=bf16)

    h, f = c.hidden_size, c.inner_hidden_size
    matrix("token_embd.weight", c.vocab_size, h)
    for i in range(c.num_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            matrix(f"blk.{i}.{name}.weight", h, h)
        matrix(f"blk.{i}.ffn_gate.weight", f, h)
        matrix(f"blk.{i}.ffn_up.weight", f, h)
        matrix(f"blk.{i}.ffn_down.weight", h, f)
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    matrix("output.weight", c.vocab_size, h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()


def decode_bytes(path: Path, gguf, ctx: int, cfg=MID) -> int:
    """Bytes one decode step reads: every tensor as stored but the embedding (one row of it),
    plus the f16 K/V cache of `ctx` tokens."""
    reader = gguf.GGUFReader(str(path))
    total = 0
    for t in reader.tensors:
        total += int(t.n_bytes) // (cfg.vocab_size if t.name == "token_embd.weight" else 1)
    return total + cfg.num_layers * 2 * ctx * cfg.hidden_size * 2


# llama.cpp type -> the project's scheme with the same bytes per weight (unquantized; int8 per
# row = 8 bits + a row scale against Q8_0's 8.5; int4 per 64 with scale and zero = Q4_0's 4.5
# bits). Ours unquantized is in --dtype (auto: bf16 where the CPU has it, else fp32), and is
# matched with llama.cpp's type of that dtype.
OURS = {"bf16": None, "f32": None, "q8_0": 8, "q4_0": 4}
UNQUANTIZED = {"torch.bfloat16": "bf16", "torch.float32": "f32"}


def llama_bench(binary: Path, model: Path, threads: int, repeat: int, args: list[str]) -> float:
    """Tokens/s that llama-bench reports (its mean over `repeat` runs)."""
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-r", str(repeat), "-o", "json", *args]
    return json.loads(run_tool(cmd))[0]["avg_ts"]


def run_tool(cmd: list[str]) -> str:
    """Run a llama.cpp tool; its failure ends the benchmark with the tool's own last words."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return p.stdout


def our_model(bits, ctx: int, dtype, compiled: bool = False):
    """bench/decode.py's mid-size CogVLM in `dtype`, unquantized or weight-only int8/int4 with
    the image encoder int8, laid out as the demos load it on this CPU (kernels measured here);
    and the bytes a decode step reads. compiled: plain weights and the inductor-compiled decode
    step (--compile)."""
    import torch
    from bench.decode import decode_bytes as step_bytes
    torch.manual_seed(0)
    model = pack_or_compile(random_model(MID, dtype, bits), not compiled, compiled, single_stream=True)
    return model, step_bytes(model, MID, ctx)                # as the layouts hold the weights


def our_prefill_s(model) -> float:
    """Image encoder + the 283-token prompt (257 image tokens through the vision expert)."""
    from bench.decode import make_inputs, prefill_run
    return median_time(prefill_run(model, make_inputs(MID, 24, model, False), "cpu"), 3)


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__, raw=True, threads=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())),
                     dtype="auto", compile=dict(help="ours with the inductor-compiled decode step"))
    p.add_argument("--llama_cpp", type=Path, required=True,
                   help="llama.cpp source folder with build/bin/llama-bench and llama-quantize built")
    p.add_argument("--types", default="bf16,f16,q8_0,q4_0",
                   help="llama.cpp weight types, comma-separated (f32 too: ours unquantized is matched "
                        "with the type of its dtype)")
    p.add_argument("--repack", default="1", help="llama-bench --repack values to try, e.g. 0,1")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds (llama.cpp, then ours, per type); medians are reported")
    p.add_argument("--prompt", type=int, default=283, help="prefill tokens and decode context")
    p.add_argument("--decode", type=int, default=32, help="tokens per decode measurement")
    p.add_argument("--workdir", type=Path, default=None, help="where the GGUF files go (default: a temp dir)")
    return p.parse_args(argv)


def import_gguf(llama_cpp: Path):
    """llama.cpp's own gguf-py, else the installed one; a missing build or package ends the run."""
    bin_dir = llama_cpp / "build" / "bin"
    for tool in ("llama-bench", "llama-quantize"):
        if not (bin_dir / tool).exists():
            sys.exit(f"{bin_dir / tool} not found: build llama.cpp first (see --help)")
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    try:
        import gguf
    except ImportError:
        sys.exit("the gguf package is missing: pip install gguf (or use a llama.cpp tree with gguf-py/)")
    return gguf


@dataclass
class Contenders:
    """Per llama.cpp type: its GGUF file and the bytes its decode step reads; where the project
    has the same type, our model and its bytes per step."""
    files: dict = field(default_factory=dict)
    theirs_bytes: dict = field(default_factory=dict)
    ours: dict = field(default_factory=dict)
    ours_bytes: dict = field(default_factory=dict)


def prepare_contenders(args, gguf, bin_dir: Path, dtype) -> Contenders:
    """The bf16 GGUF written once, each type quantized from it by llama-quantize, ours built in
    `dtype` for the quantized types and for the unquantized type of `dtype`."""
    work = args.workdir or Path(tempfile.mkdtemp(prefix="llama_cpp_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "mid-bf16.gguf"
    if not base.exists():
        print(f"writing {base}")
        write_gguf(base, gguf)
    c = Contenders()
    for typ in args.types.split(","):
        c.files[typ] = base if typ == "bf16" else work / f"mid-{typ}.gguf"
        if not c.files[typ].exists():
            print(f"llama-quantize {typ}")
            run_tool([str(bin_dir / "llama-quantize"), str(base), str(c.files[typ]), typ.upper()])
        c.theirs_bytes[typ] = decode_bytes(c.files[typ], gguf, args.prompt)
        if typ in OURS and (OURS[typ] or typ == UNQUANTIZED[str(dtype)]):
            print(f"building ours for {typ}")
            c.ours[typ], c.ours_bytes[typ] = our_model(OURS[typ], args.prompt, dtype, args.compile)
    return c


def decode_rounds(args, c: Contenders, bench_bin: Path) -> tuple[dict, list, list]:
    """(who, type, repack) -> decode tok/s per round, and the memory read and best GEMV figures
    measured between them (interleaved, so the box's drift hits all alike)."""
    from bench.decode import decode_step_time
    who_ours = "ours compiled" if args.compile else "ours"
    runs, reads, gemvs = {}, [], []
    for r in range(args.rounds):
        reads.append(read_bandwidth())
        gemvs.append(best_gemv()["best"])
        for typ in c.files:
            for repack in args.repack.split(","):
                runs.setdefault(("llama.cpp", typ, repack), []).append(llama_bench(
                    bench_bin, c.files[typ], args.threads, 3,
                    ["-p", "0", "-n", str(args.decode), "-d", str(args.prompt), "--repack", repack]))
            if typ in c.ours:
                runs.setdefault((who_ours, typ, ""), []).append(1 / decode_step_time(c.ours[typ], args.prompt, 12))
        print(f"round {r + 1}/{args.rounds}: memory read {reads[-1] / 1e9:.1f} GB/s, "
              + ", ".join(f"{w} {t}{'/' + rp if rp else ''} {v[-1]:.1f}" for (w, t, rp), v in runs.items()))
    return runs, reads, gemvs


def table_rows(args, c: Contenders, bench_bin: Path, runs: dict, read: float, gemv: float) -> list[dict]:
    """One row per (who, type, repack): prefill seconds, decode tok/s, bytes per token and the
    fractions of memory read and best GEMV bandwidth that decode reaches."""
    rows = []
    for (who, typ, repack), tok_s in medians(runs).items():
        nbytes = (c.theirs_bytes if who == "llama.cpp" else c.ours_bytes)[typ]
        if who == "llama.cpp":
            pre = args.prompt / llama_bench(bench_bin, c.files[typ], args.threads, 3,
                                            ["-p", str(args.prompt), "-n", "0", "--repack", repack])
        else:
            pre = our_prefill_s(c.ours[typ])
        rows.append({"who": who, "type": typ, "repack": repack, "prefill_s": pre, "decode_tok_s": tok_s,
                     "gb_per_token": nbytes / 1e9, "frac_read": tok_s * nbytes / read,
                     "frac_best_gemv": tok_s * nbytes / gemv})
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    gguf = import_gguf(args.llama_cpp)
    dtype = cpu_start(args)                            # threads set; the CPU line printed
    bin_dir = args.llama_cpp / "build" / "bin"
    c = prepare_contenders(args, gguf, bin_dir, dtype)
    runs, reads, gemvs = decode_rounds(args, c, bin_dir / "llama-bench")
    read, gemv = statistics.median(reads), statistics.median(gemvs)
    rows = table_rows(args, c, bin_dir / "llama-bench", runs, read, gemv)
    print(f"medians of {args.rounds} rounds: memory read {read / 1e9:.1f} GB/s, "
          f"best PyTorch GEMV {gemv / 1e9:.1f} GB/s")
    print("| who | type | prefill s | decode tok/s | GB/token | % memory read | % best GEMV |")
    for row in sorted(rows, key=lambda x: (x["type"], x["who"])):
        print(f"| {row['who']}{' repack ' + row['repack'] if row['repack'] else ''} | {row['type']} | "
              f"{row['prefill_s']:.2f} | {row['decode_tok_s']:.2f} | {row['gb_per_token']:.2f} | "
              f"{row['frac_read']:.0%} | {row['frac_best_gemv']:.0%} |")
    write_cpu_json(args.json, dtype, {"threads": args.threads, "prompt": args.prompt, "read_gbps": read / 1e9,
                                      "best_gemv_gbps": gemv / 1e9, "rows": rows})


if __name__ == "__main__":
    main()
