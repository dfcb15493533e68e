"""Where a layer-wise build runs: the recipe's `device` and `forward_dtype` resolved for this machine, and the peak
GPU memory a build records in its manifest."""

from __future__ import annotations

import torch

from quantize.common.errors import QuantizeError


def resolve_device(device: str, where: str) -> str:
    """The recipe's `device` (auto, cpu, cuda, cuda:N) as a torch device; auto is cuda when one is visible."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QuantizeError(f"{where}: device {device!r}, but this torch ({torch.__version__}) sees no CUDA "
                                "device; use `device: auto` or `cpu`")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise QuantizeError(f"{where}: device {device!r}, but only {torch.cuda.device_count()} CUDA device(s) "
                                "are visible")
    return device


def reset_peak_vram(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def peak_vram(device: str) -> dict:
    """For the manifest of a build on a GPU: the most memory torch's allocator held on it since reset_peak_vram."""
    if not device.startswith("cuda"):
        return {}
    return {"peak_vram_bytes": int(torch.cuda.max_memory_allocated(device))}


def native_bf16(device: str) -> tuple[bool, str]:
    """Whether `device` computes bfloat16 matmuls natively, and why: a CUDA GPU that supports bf16, or a CPU whose
    flags (/proc/cpuinfo) include avx512_bf16 or amx_bf16. Elsewhere bf16 is emulated and slower than float32
    (GPTQ on SmolLM2: 322.9 s vs 105.9 s on an AVX2-only EPYC)."""
    if device.startswith("cuda"):
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)}: bf16 {'supported' if ok else 'not supported'}"
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return False, "CPU flags unknown (no /proc/cpuinfo)"
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return bool(native), f"CPU flags: {', '.join(native)}" if native else "CPU without avx512_bf16 / amx_bf16"


def resolve_forward_dtype(value: str, device: str) -> tuple[torch.dtype, str]:
    """The recipe's forward_dtype (auto, float32, bfloat16) as a torch dtype, with the reason for the manifest."""
    if value != "auto":
        return getattr(torch, value), "set in the recipe"
    native, why = native_bf16(device)
    return (torch.bfloat16 if native else torch.float32), f"auto: {why}"
