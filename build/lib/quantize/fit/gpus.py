"""The GPU table (data, not code): memory, the share a runtime can use, bandwidth, and where each figure comes from.
Also the default GPUs and contexts that `quantize fit` and a recipe's `fit:` use when none are given."""

from __future__ import annotations

from dataclasses import dataclass

from quantize.common.errors import QuantizeError

GiB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    usable_fraction: float
    bandwidth_gb_s: float
    source: str

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_bytes * self.usable_fraction)


NVIDIA_USABLE = 0.95  # assumption: ~5% kept by driver / display / fragmentation
APPLE_SMALL_USABLE = 2 / 3  # approx. macOS default GPU working-set limit (recommendedMaxWorkingSetSize,
APPLE_LARGE_USABLE = 3 / 4  # as llama.cpp's Metal backend reports it): ~2/3 of RAM up to 36 GB, ~3/4 above

# NVIDIA's (and Apple's) "GB" for these memory sizes is GiB, except H200: 141 x 10^9 bytes.
GPUS: tuple[Gpu, ...] = (
    Gpu("RTX 4060", 8 * GiB, NVIDIA_USABLE, 272, "NVIDIA GeForce RTX 4060 spec page"),
    Gpu("RTX 3060", 12 * GiB, NVIDIA_USABLE, 360, "NVIDIA GeForce RTX 3060 spec page"),
    Gpu("RTX 4060 Ti", 16 * GiB, NVIDIA_USABLE, 288, "NVIDIA GeForce RTX 4060 Ti spec page (16 GB)"),
    Gpu("RTX 3090", 24 * GiB, NVIDIA_USABLE, 936, "NVIDIA GeForce RTX 3090 spec page"),
    Gpu("RTX 4090", 24 * GiB, NVIDIA_USABLE, 1008, "NVIDIA GeForce RTX 4090 spec page"),
    Gpu("RTX 5090", 32 * GiB, NVIDIA_USABLE, 1792, "NVIDIA GeForce RTX 5090 spec page"),
    Gpu("L4", 24 * GiB, NVIDIA_USABLE, 300, "NVIDIA L4 datasheet"),
    Gpu("A10", 24 * GiB, NVIDIA_USABLE, 600, "NVIDIA A10 datasheet"),
    Gpu("A100 40GB", 40 * GiB, NVIDIA_USABLE, 1555, "NVIDIA A100 datasheet (40GB)"),
    Gpu("L40S", 48 * GiB, NVIDIA_USABLE, 864, "NVIDIA L40S datasheet"),
    Gpu("A100 80GB", 80 * GiB, NVIDIA_USABLE, 2039, "NVIDIA A100 datasheet (80GB SXM)"),
    Gpu("H100 SXM", 80 * GiB, NVIDIA_USABLE, 3350, "NVIDIA H100 datasheet (SXM)"),
    Gpu("H200", 141 * 10**9, NVIDIA_USABLE, 4800, "NVIDIA H200 datasheet (141 GB taken as 10^9 bytes)"),
    Gpu("M-series 16 GB", 16 * GiB, APPLE_SMALL_USABLE, 120, "Apple M4 tech specs"),
    Gpu("M-series 32 GB", 32 * GiB, APPLE_SMALL_USABLE, 273, "Apple M4 Pro tech specs"),
    Gpu("M-series 64 GB", 64 * GiB, APPLE_LARGE_USABLE, 546, "Apple M4 Max tech specs"),
    Gpu("M-series 128 GB", 128 * GiB, APPLE_LARGE_USABLE, 546, "Apple M4 Max tech specs"),
    Gpu("M-series 192 GB", 192 * GiB, APPLE_LARGE_USABLE, 800, "Apple M2 Ultra tech specs"),
)


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def gpu_by_name(name: str) -> Gpu:
    """Case- and space-insensitive lookup ('rtx4090' -> RTX 4090); a unique prefix ('h100') also works."""
    key = _norm(name)
    exact = [g for g in GPUS if _norm(g.name) == key]
    matches = exact or [g for g in GPUS if key and _norm(g.name).startswith(key)]
    if len(matches) != 1:
        why = "ambiguous" if matches else "unknown"
        raise QuantizeError(f"{why} GPU {name!r}; known: {', '.join(g.name for g in GPUS)}")
    return matches[0]


DEFAULT_GPUS = ("RTX 3060", "RTX 4090", "A100 80GB", "H100 SXM", "M-series 16 GB")
DEFAULT_CONTEXTS = (8192, 32768, 131072)
