"""bench/llama_cpp.py: the random-weight LLaMA it writes for llama.cpp must be what llama.cpp's
loader expects for the "llama" architecture (tensor names from gguf's own table, GGUF's
dimension order, the dummy vocabulary), and its bytes-per-token figure must be the stored sizes.
llama.cpp itself is not built in CI (bench/RESULTS.md has the figures of a real run)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
gguf = pytest.importorskip("gguf")       # requirements-dev.txt installs it


def test_llama_cpp_help():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "llama_cpp.py"), "--help"],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert p.returncode == 0 and "--llama_cpp" in p.stdout and "llama-cpp-python" in p.stdout


def test_llama_cpp_bench_missing_build_is_a_clear_error(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "llama_cpp.py"), "--llama_cpp", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert p.returncode != 0 and "llama-bench not found" in p.stderr and "Traceback" not in p.stderr


def test_written_gguf_is_a_llama_of_the_config(tmp_path):
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES
    from bench.decode import MID
    from bench.llama_cpp import decode_bytes, write_gguf
    cfg = dataclasses.replace(MID, num_layers=2, hidden_size=64, num_attention_heads=4,
                              inner_hidden_size=128, vocab_size=100)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, gguf, cfg)
    r = gguf.GGUFReader(str(path))

    def field(key):
        f = r.fields[key]
        v = f.parts[f.data[0]]
        return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else int(v[0])
    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "none"            # llama.cpp's dummy vocabulary
    assert field("llama.vocab_size") == 100 and field("llama.block_count") == 2
    assert field("llama.embedding_length") == 64 and field("llama.feed_forward_length") == 128
    assert field("llama.attention.head_count") == field("llama.attention.head_count_kv") == 4
    allowed = {TENSOR_NAMES[t].format(bid=b) + ".weight" for t in MODEL_TENSORS[MODEL_ARCH.LLAMA] for b in range(2)}
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) <= allowed and len(tensors) == 3 + 2 * 9
    # GGUF lists dimensions innermost first: a PyTorch (out, in) weight is (in, out) there.
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [128, 64]
    assert list(tensors["blk.0.ffn_gate.weight"].shape) == [64, 128]
    assert list(tensors["output.weight"].shape) == [64, 100]
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    per_layer = (4 * 64 * 64 + 3 * 64 * 128) * 2 + 2 * 64 * 4
    expected = 2 * per_layer + 64 * 4 + 100 * 64 * 2 + 64 * 2 + 2 * 2 * 10 * 64 * 2   # + embedding row + K/V
    assert decode_bytes(path, gguf, 10, cfg) == expected
