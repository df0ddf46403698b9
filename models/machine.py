"""Facts of the machine that runs: its CPU flags, the dtype it computes fastest in, and
handing freed memory back to the OS. Imported by the loaders and the engines alike."""
from __future__ import annotations

import contextlib
import ctypes
import logging
from pathlib import Path
from typing import Optional, Union

import torch

from .config import DTYPES

log = logging.getLogger(__name__)


def cpu_flags() -> set:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def last_level_cache_bytes(default: int = 32 << 20, root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The largest CPU cache's size (Linux sysfs, e.g. "32768K"); `default` where unknown."""
    sizes = []
    for f in Path(root).glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        if text.rstrip("KMG").isdigit():
            sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=default)


def resolve_dtype(name: str, device: Union[str, torch.device]) -> torch.dtype:
    """`--dtype`: float32 / bfloat16 / float16, or auto: bf16 on CUDA; on a CPU bf16 when it
    has AMX or AVX-512 BF16 (bf16 matrix products several times fp32's there, half the bytes
    per token), else fp32 (without them bf16 is slower than fp32). The choice is logged."""
    if name != "auto":
        return DTYPES[name]
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    fast = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16"})
    log.info("--dtype auto: %s", f"bfloat16 (this CPU has {', '.join(fast)})" if fast
             else "float32 (this CPU has neither AMX nor AVX-512 BF16)")
    return torch.bfloat16 if fast else torch.float32


def default_dtype(device: Union[str, torch.device], fp16: bool = False, bf16: bool = False) -> torch.dtype:
    """fp32 on CPU (no fast bf16 there), bf16 on CUDA; --fp16/--bf16 override."""
    if fp16:
        return torch.float16
    if bf16:
        return torch.bfloat16
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def available_memory() -> Optional[int]:
    """Bytes the OS can still give this process (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after transient buffers: a
    burst of prefills, a compilation), so RSS tracks live memory. No-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def memory_returned_to_os():
    """While loading: glibc serves allocations above 1 MB with mmap, so the full-precision
    temporaries of each quantized layer go back to the OS when freed. Glibc's default (a
    threshold that grows with use) kept up to 210 MB of them in its heap and doubled the
    measured peak in half the runs of tests/test_quantize.py. After loading the threshold is
    set to 32 MB (glibc's own ceiling, so prefill activations reuse heap memory) and the heap
    is trimmed. No-op where glibc is absent."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        yield
        return
    libc.mallopt(-3, 1 << 20)                           # M_MMAP_THRESHOLD
    try:
        yield
    finally:
        libc.mallopt(-3, 32 << 20)
        release_free_memory()
