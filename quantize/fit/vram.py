"""VRAM-fit estimate: does this model fit on GPU X at context C and batch B, and with how much headroom?

    total = weight bytes + KV cache bytes + runtime overhead

* Weight bytes are measured from the real tensors (safetensors headers or GGUF tensor infos, formats/tensors.py),
  not from a nominal bits-per-weight figure.
* KV cache and overhead: context_memory.py. GPU capacities: gpus.py.

A row "fits" when total <= usable bytes (capacity x usable_fraction of the GPU row).
Everything here is an estimate; the report states the formula and constants it used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from quantize.common.errors import QuantizeError
from quantize.fit.context_memory import (
    COMPUTE_UBATCH_TOKENS,
    KV_DTYPE_BYTES,
    OVERHEAD_NOTE,
    RUNTIME_OVERHEAD_BYTES,
    kv_cache_bytes,
    overhead_bytes,
)
from quantize.fit.gpus import GiB, Gpu, gpu_by_name
from quantize.fit.shape import ModelShape


def gib(n: int | float) -> str:
    """Bytes as a display string in GiB, e.g. '1.00 GiB'."""
    return f"{n / GiB:.2f} GiB"


@dataclass(frozen=True)
class FitRow:
    gpu: str
    context: int
    batch: int
    kv_dtype: str
    weights_bytes: int
    kv_bytes: int
    overhead_bytes: int
    total_bytes: int
    usable_bytes: int
    fits: bool
    headroom_bytes: int  # usable - total; negative when it does not fit


def fit_one(weight_bytes: int, shape: ModelShape, gpu: Gpu, context: int, batch: int, kv_dtype: str,
            flash_attn: bool = True) -> FitRow:
    kv = kv_cache_bytes(shape, context, batch, kv_dtype)
    over = overhead_bytes(shape, context, flash_attn)
    total = weight_bytes + kv + over
    usable = gpu.usable_bytes
    return FitRow(gpu.name, context, batch, kv_dtype, weight_bytes, kv, over, total, usable,
                  total <= usable, usable - total)


def fit_rows(weight_bytes: int, shape: ModelShape, gpus, contexts: list[int], batch: int,
             kv_dtype: str, flash_attn: bool = True) -> list[FitRow]:
    """One FitRow per (gpu, context); gpus may be Gpu rows or names."""
    gpus = [g if isinstance(g, Gpu) else gpu_by_name(g) for g in gpus]
    return [fit_one(weight_bytes, shape, g, c, batch, kv_dtype, flash_attn) for g in gpus for c in contexts]


def _largest(fits, cap: int) -> int:
    """Largest n in [1, cap] with fits(n) true, assuming fits is monotone (true then false); 0 if none."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def largest_context(weight_bytes: int, shape: ModelShape, gpu: Gpu, batch: int, kv_dtype: str,
                    max_context: int | None = None, flash_attn: bool = True) -> int:
    """Largest context <= max_context (default: max_position_embeddings) that fits; 0 if none does."""
    cap = max_context or shape.max_position_embeddings
    if not cap:
        raise QuantizeError("largest_context needs max_context or max_position_embeddings in config.json")
    return _largest(lambda c: fit_one(weight_bytes, shape, gpu, c, batch, kv_dtype, flash_attn).fits, int(cap))


def largest_batch(weight_bytes: int, shape: ModelShape, gpu: Gpu, context: int, kv_dtype: str,
                  cap: int = 1024, flash_attn: bool = True) -> int:
    """Largest batch <= cap whose KV cache fits at this context; 0 if batch 1 does not fit."""
    return _largest(lambda b: fit_one(weight_bytes, shape, gpu, context, b, kv_dtype, flash_attn).fits, cap)


def weight_budget(shape: ModelShape, gpu_name: str, context: int, batch: int, kv_dtype: str,
                  flash_attn: bool = True) -> tuple[int, str]:
    """The bytes left for weights on a GPU at this context and batch: usable − KV cache − runtime overhead (the
    same terms as fit_one), and the arithmetic as a sentence."""
    gpu = gpu_by_name(gpu_name)
    kv = kv_cache_bytes(shape, context, batch, kv_dtype)
    over = overhead_bytes(shape, context, flash_attn)
    left = gpu.usable_bytes - kv - over
    how = (f"{gpu.name}: usable {gib(gpu.usable_bytes)} − KV {gib(kv)} ({kv_dtype}, context {context}, batch "
           f"{batch}) − overhead {gib(over)} = {gib(left)} for weights")
    if left <= 0:
        raise QuantizeError(f"{how}: nothing is left for the weights; lower the context or batch, or quantize the KV")
    return left, how


def decode_tokens_per_s_estimate(bytes_read_per_token: int, gpu: Gpu) -> float:
    """Estimate (upper bound from memory bandwidth): bandwidth / bytes read per generated token."""
    return gpu.bandwidth_gb_s * 1e9 / bytes_read_per_token


def fit_report(weight_bytes: int, shape: ModelShape, gpu_names: list[str], contexts: list[int],
               batch: int, kv_dtype: str, flash_attn: bool = True) -> dict:
    """JSON-serialisable fit report: protocol (formula, constants), rows, largest context and batch."""
    gpus = [gpu_by_name(n) for n in gpu_names]
    max_context = shape.max_position_embeddings or max(contexts)
    return {
        "protocol": {
            "formula": "total = weights + kv + overhead; fits if total <= memory x usable_fraction",
            "kv_formula": "per layer 2 x n_kv_heads x head_dim (MLA: kv_lora_rank + rope head dim) x cells x batch x "
                          "bytes_per_element; cells = context on full layers, min(context, sliding_window + "
                          f"{COMPUTE_UBATCH_TOKENS} padded to 256) on sliding layers (llama.cpp's SWA cache)",
            "overhead_note": OVERHEAD_NOTE,
            "runtime_overhead_bytes": RUNTIME_OVERHEAD_BYTES,
            "compute_ubatch_tokens": COMPUTE_UBATCH_TOKENS,
            "flash_attn": flash_attn,
            "kv_dtype_bytes": dict(KV_DTYPE_BYTES),
            "weights": "measured from tensor headers, not nominal bits per weight",
            "decode_estimate": "upper bound: bandwidth / bytes read per token",
            "largest_context_cap": max_context,
            "shape": asdict(shape),
            "gpus": [asdict(g) for g in gpus],
        },
        "rows": [asdict(r) for r in fit_rows(weight_bytes, shape, gpus, contexts, batch, kv_dtype, flash_attn)],
        "largest_context": {
            g.name: largest_context(weight_bytes, shape, g, batch, kv_dtype, max_context, flash_attn) for g in gpus
        },
        "largest_batch": {
            g.name: {str(c): largest_batch(weight_bytes, shape, g, c, kv_dtype, flash_attn=flash_attn)
                     for c in contexts}
            for g in gpus
        },
    }
