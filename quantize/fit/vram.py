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
    VLLM_BLOCK,
    VLLM_KV_DTYPES,
    kv_cache_bytes,
    overhead_bytes,
    vllm_in_flight_tokens,
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


def gpu_kv_bytes(shape: ModelShape, gpu: Gpu, context: int, batch: int, kv_dtype: str, engine: str) -> int:
    """The KV cache `engine` allocates on `gpu` (vLLM's sliding layers depend on its batch defaults for the GPU)."""
    in_flight = vllm_in_flight_tokens(gpu.memory_bytes, gpu.name) if engine == "vllm" else 0
    return kv_cache_bytes(shape, context, batch, kv_dtype, engine, in_flight)


def fit_one(weight_bytes: int, shape: ModelShape, gpu: Gpu, context: int, batch: int, kv_dtype: str,
            flash_attn: bool = True, engine: str = "llama.cpp") -> FitRow:
    kv = gpu_kv_bytes(shape, gpu, context, batch, kv_dtype, engine)
    over = overhead_bytes(shape, context, flash_attn)
    total = weight_bytes + kv + over
    usable = gpu.usable_bytes
    return FitRow(gpu.name, context, batch, kv_dtype, weight_bytes, kv, over, total, usable,
                  total <= usable, usable - total)


def fit_rows(weight_bytes: int, shape: ModelShape, gpus, contexts: list[int], batch: int,
             kv_dtype: str, flash_attn: bool = True, engine: str = "llama.cpp") -> list[FitRow]:
    """One FitRow per (gpu, context); gpus may be Gpu rows or names."""
    gpus = [g if isinstance(g, Gpu) else gpu_by_name(g) for g in gpus]
    return [fit_one(weight_bytes, shape, g, c, batch, kv_dtype, flash_attn, engine) for g in gpus for c in contexts]


def _largest(fits, cap: int) -> int:
    """Largest n in [1, cap] with fits(n) true, assuming fits is monotone (true then false); 0 if none."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def largest_context(weight_bytes: int, shape: ModelShape, gpu: Gpu, batch: int, kv_dtype: str,
                    max_context: int | None = None, flash_attn: bool = True, engine: str = "llama.cpp") -> int:
    """Largest context <= max_context (default: max_position_embeddings) that fits; 0 if none does."""
    cap = max_context or shape.max_position_embeddings
    if not cap:
        raise QuantizeError("largest_context needs max_context or max_position_embeddings in config.json")
    return _largest(lambda c: fit_one(weight_bytes, shape, gpu, c, batch, kv_dtype, flash_attn, engine).fits,
                    int(cap))


def largest_batch(weight_bytes: int, shape: ModelShape, gpu: Gpu, context: int, kv_dtype: str,
                  cap: int = 1024, flash_attn: bool = True, engine: str = "llama.cpp") -> int:
    """Largest batch <= cap whose KV cache fits at this context; 0 if batch 1 does not fit."""
    return _largest(lambda b: fit_one(weight_bytes, shape, gpu, context, b, kv_dtype, flash_attn, engine).fits, cap)


def weight_budget(shape: ModelShape, gpu_name: str, context: int, batch: int, kv_dtype: str,
                  flash_attn: bool = True, engine: str = "llama.cpp") -> tuple[int, str]:
    """The bytes left for weights on a GPU at this context and batch: usable − KV cache − runtime overhead (the
    same terms as fit_one), and the arithmetic as a sentence."""
    gpu = gpu_by_name(gpu_name)
    kv = gpu_kv_bytes(shape, gpu, context, batch, kv_dtype, engine)
    over = overhead_bytes(shape, context, flash_attn)
    left = gpu.usable_bytes - kv - over
    how = (f"{gpu.name}: usable {gib(gpu.usable_bytes)} − KV {gib(kv)} ({engine}'s {kv_dtype} cache, context "
           f"{context}, batch {batch}) − overhead {gib(over)} = {gib(left)} for weights")
    if left <= 0:
        raise QuantizeError(f"{how}: nothing is left for the weights; lower the context or batch, or quantize the KV")
    return left, how


def weight_budgets(shape: ModelShape, gpu_name: str, context: int, batch: int, kv_types, flash_attn: bool = True,
                   engine: str = "llama.cpp") -> dict[str, tuple[int, str]]:
    """weight_budget for each of `kv_types`: {type: (bytes left, the arithmetic)}; a type whose cache leaves the
    weights nothing gets (0, why). Refused when none leaves anything (one type: its own message)."""
    out, errors = {}, []
    for kv in kv_types:
        try:
            out[kv] = weight_budget(shape, gpu_name, context, batch, kv, flash_attn, engine)
        except QuantizeError as exc:
            out[kv] = (0, str(exc))
            errors.append(str(exc))
    if len(errors) == len(out):
        raise QuantizeError(errors[0] if len(errors) == 1 else
                            f"no KV cache type leaves room for the weights ({'; '.join(errors)})")
    return out


def decode_tokens_per_s_estimate(bytes_read_per_token: int, gpu: Gpu) -> float:
    """Estimate (upper bound from memory bandwidth): bandwidth / bytes read per generated token."""
    return gpu.bandwidth_gb_s * 1e9 / bytes_read_per_token


KV_FORMULA = {
    "llama.cpp": "per layer 2 x n_kv_heads x head_dim (MLA: kv_lora_rank + rope head dim) x cells x batch x "
                 "bytes_per_element; cells = context on full layers, min(context, sliding_window + "
                 f"{COMPUTE_UBATCH_TOKENS} padded to 256) on sliding layers (llama.cpp's SWA cache) in the families "
                 "whose llama.cpp graph uses the window (Gemma 2/3); elsewhere every layer holds the context "
                 "(llama.cpp runs Mistral on its llama graph and disables Phi-3's window); the SWA cache as "
                 "llama-server and llama-cli allocate it (swa_full off, their default; the C API's default, which "
                 "llama-cpp-python keeps, is a full-size cache on every layer)",
    "vllm": "per layer 2 x n_kv_heads x head_dim (MLA: kv_lora_rank + rope head dim) x cells x batch x "
            f"bytes_per_element; cells = context in blocks of {VLLM_BLOCK} on full layers; on config.json's sliding "
            "layers (every layer for a Mistral-style sliding_window) min(sliding_window - 1 + in-flight tokens, "
            f"context) in blocks of {VLLM_BLOCK}, plus one block; in-flight tokens = 2 x the API server's default "
            "max_num_batched_tokens for the GPU (4096; 16384 at >= 70 GiB but not A100; 32768 at >= 160 GiB)",
}


def engine_for(artefact_format: str) -> str:
    """Whose cache the fit models for an artefact: llama.cpp for GGUF (and MLX, whose own cache is not modelled:
    llama.cpp's per-family rule is assumed), vLLM for a safetensors checkpoint (dense, compressed-tensors, GPTQ,
    AWQ, bitsandbytes)."""
    return "llama.cpp" if artefact_format in ("gguf", "mlx") else "vllm"


def engine_kv(engine: str, kv_dtype: str) -> str:
    """The cache type `engine` runs for a recipe's kv_dtype: vLLM has no q8_0 / q4_0 cache and llama.cpp no fp8
    one, so the engine's default (f16) stands in for them; every other type is taken as given."""
    if engine == "vllm" and kv_dtype not in VLLM_KV_DTYPES or engine == "llama.cpp" and kv_dtype == "fp8":
        return "f16"
    return kv_dtype


def fit_report(weight_bytes: int, shape: ModelShape, gpu_names: list[str], contexts: list[int],
               batch: int, kv_dtype: str, flash_attn: bool = True, engine: str = "llama.cpp") -> dict:
    """JSON-serialisable fit report: protocol (formula, constants), rows, largest context and batch."""
    gpus = [gpu_by_name(n) for n in gpu_names]
    max_context = shape.max_position_embeddings or max(contexts)
    kv_asked, kv_dtype = kv_dtype, engine_kv(engine, kv_dtype)
    return {
        "protocol": {
            "engine": engine,
            **({"kv_dtype_note": f"{'vLLM' if engine == 'vllm' else 'llama.cpp'} has no {kv_asked} cache: its "
                                 "default (f16) is assumed"}
               if kv_asked != kv_dtype else {}),
            "formula": "total = weights + kv + overhead; fits if total <= memory x usable_fraction",
            "kv_formula": KV_FORMULA[engine],
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
        "rows": [asdict(r) for r in fit_rows(weight_bytes, shape, gpus, contexts, batch, kv_dtype, flash_attn,
                                             engine)],
        "largest_context": {
            g.name: largest_context(weight_bytes, shape, g, batch, kv_dtype, max_context, flash_attn, engine)
            for g in gpus
        },
        "largest_batch": {
            g.name: {str(c): largest_batch(weight_bytes, shape, g, c, kv_dtype, flash_attn=flash_attn, engine=engine)
                     for c in contexts}
            for g in gpus
        },
    }
