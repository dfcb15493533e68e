"""VRAM-fit estimate: does this model fit on GPU X at context C and batch B, and with how much headroom?

    total = weight bytes + KV cache bytes + runtime overhead

* Weight bytes are measured from the real tensors (safetensors headers or GGUF tensor infos),
  not from a nominal bits-per-weight figure.
* KV cache bytes follow from the model shape in config.json: per layer
  2 (K and V) x n_kv_heads x head_dim x tokens x batch x bytes_per_element(kv_dtype),
  where sliding-window layers keep only min(context, window) tokens.
* Runtime overhead is a fixed allowance plus an estimated compute buffer (see OVERHEAD_NOTE).

A row "fits" when total <= usable bytes (capacity x usable_fraction of the GPU row).
Everything here is an estimate; the report states the formula and constants it used.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from quantize.errors import QuantizeError

GiB = 2**30

# Bytes per cached K/V element, keyed by llama.cpp's --cache-type-k/v names (plus vLLM's "fp8").
# q8_0: blocks of 32 int8 + one f16 scale = 34 bytes / 32; q4_0: 16 bytes + f16 scale = 18 / 32.
KV_DTYPE_BYTES: dict[str, float] = {
    "f16": 2.0,
    "bf16": 2.0,
    "f32": 4.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "fp8": 1.0,  # vLLM --kv-cache-dtype fp8 (e4m3/e5m2), one byte per element
}

# Assumption, not a measurement: CUDA context + cuBLAS workspace + allocator slack.
RUNTIME_OVERHEAD_BYTES = 512 * 2**20

# llama.cpp's compute buffer (the graph allocator's peak for one micro-batch of UBATCH tokens, f32 values).
# Two phases peak; the buffer is the larger one:
#   output:    ubatch x (vocab_size + 2 x hidden_size)                 (f32 logits of the micro-batch)
#   attention: ubatch x (3 x hidden_size + intermediate_size)          (q/k/v, FFN activations)
#              + without flash attention: ubatch x context x (n_heads + 1) (f32 KQ scores of one layer + mask)
#              + with flash attention:    ubatch x context x 2/4       (f16 mask only; scores stay in tiles)
# Checked against the "compute buffer size" llama.cpp 0.3.36 logs for SmolLM2-135M at n_ctx 512..16384, flash
# attention on and off (bench/results/memory_check.md). Context is per sequence: llama.cpp reserves the
# worst case for one sequence, so the buffer does not grow with batch.
COMPUTE_UBATCH_TOKENS = 512
COMPUTE_BYTES_PER_VALUE = 4  # f32 activations

OVERHEAD_NOTE = (
    f"overhead = {RUNTIME_OVERHEAD_BYTES // 2**20} MiB fixed (assumed: CUDA context + cuBLAS workspace "
    f"+ allocator slack) + llama.cpp's compute buffer for one {COMPUTE_UBATCH_TOKENS}-token micro-batch, f32: "
    f"max(ubatch x (vocab + 2 x hidden), ubatch x (3 x hidden + intermediate) + attention scores), attention "
    f"scores = ubatch x context x (n_heads + 1) without flash attention, ubatch x context / 2 with it; "
    f"without flash attention also an f16 copy of the scores, ubatch x context x n_heads x 2 bytes"
)

# transformers' Gemma3TextConfig defaults: Gemma 3 config.json files (e.g. gemma-3-4b-it) omit these.
_MODEL_TYPE_DEFAULTS: dict[str, dict] = {
    "gemma3_text": {
        "vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "max_position_embeddings": 131072, "sliding_window": 4096, "sliding_window_pattern": 6,
    },
}


def gib(n: int | float) -> str:
    """Bytes as a display string in GiB, e.g. '1.00 GiB'."""
    return f"{n / GiB:.2f} GiB"


# ---------------------------------------------------------------- weight bytes from real tensors

def weight_bytes_safetensors(model_dir: Path) -> dict[str, int]:
    """Bytes per dtype over every *.safetensors file in model_dir, read from the JSON headers only."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise QuantizeError(f"no *.safetensors file in {model_dir}")
    totals: dict[str, int] = {}
    for path in files:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise QuantizeError(f"{path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > 100 * 2**20:
                raise QuantizeError(f"{path}: implausible safetensors header length {header_len}")
            header = json.loads(f.read(header_len))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            totals[entry["dtype"]] = totals.get(entry["dtype"], 0) + (end - start)
    return totals


def weight_bytes_gguf(path: Path) -> dict[str, int]:
    """Bytes per GGML tensor type (e.g. 'Q4_K', 'F32') in a GGUF file, from its tensor infos."""
    import gguf  # optional dependency, only needed for GGUF files

    path = Path(path)
    if not path.is_file():
        raise QuantizeError(f"GGUF file not found: {path}")
    totals: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        kind = tensor.tensor_type.name
        totals[kind] = totals.get(kind, 0) + int(tensor.n_bytes)
    return totals


# ---------------------------------------------------------------- model shape from config.json

@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    intermediate_size: int
    sliding_window: int | None
    sliding_layers: int  # layers that keep only the last sliding_window tokens; 0 if none
    n_params_estimate: int  # rough: embeddings + attention + gated MLP, ignores norms/biases
    max_position_embeddings: int | None = None
    n_heads: int = 0  # query heads; 0 in reports written before it was recorded (then hidden // head_dim)

    @property
    def query_heads(self) -> int:
        return self.n_heads or self.hidden_size // self.head_dim


def shape_from_config(cfg: dict) -> ModelShape:
    """ModelShape from a Hugging Face config.json dict (text_config is used when nested)."""
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    cfg = {**_MODEL_TYPE_DEFAULTS.get(cfg.get("model_type", ""), {}), **cfg}

    def need(key: str) -> int:
        if cfg.get(key) is None:
            raise QuantizeError(f"config.json is missing required key {key!r}")
        return int(cfg[key])

    n_layers = need("num_hidden_layers")
    hidden = need("hidden_size")
    n_heads = need("num_attention_heads")
    n_kv_heads = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    vocab = need("vocab_size")
    inter = need("intermediate_size")

    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:  # Qwen2-style: window set but switched off
        window = None
    layer_types = cfg.get("layer_types")
    if window is None:
        sliding = 0
    elif layer_types:  # Gemma 3 / newer transformers: explicit per-layer list
        sliding = sum(1 for t in layer_types if t == "sliding_attention")
    elif cfg.get("sliding_window_pattern"):  # every Nth layer is full attention
        sliding = n_layers - n_layers // int(cfg["sliding_window_pattern"])
    else:  # Mistral-style: every layer uses the window
        sliding = n_layers

    embed = vocab * hidden * (1 if cfg.get("tie_word_embeddings", True) else 2)
    attn = hidden * head_dim * (2 * n_heads + 2 * n_kv_heads)  # q, o + k, v projections
    mlp = 3 * hidden * inter  # gate, up, down
    return ModelShape(
        n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, hidden_size=hidden,
        vocab_size=vocab, intermediate_size=inter,
        sliding_window=int(window) if window is not None else None, sliding_layers=sliding,
        n_params_estimate=embed + n_layers * (attn + mlp),
        max_position_embeddings=cfg.get("max_position_embeddings"), n_heads=n_heads,
    )


# ---------------------------------------------------------------- KV cache and overhead

def kv_bytes_per_element(kv_dtype: str) -> float:
    if kv_dtype not in KV_DTYPE_BYTES:
        raise QuantizeError(f"unknown kv dtype {kv_dtype!r}; accepted: {', '.join(KV_DTYPE_BYTES)}")
    return KV_DTYPE_BYTES[kv_dtype]


def kv_cache_bytes(shape: ModelShape, context: int, batch: int, kv_dtype: str) -> int:
    """KV cache bytes; sliding layers hold min(context, window) tokens, full layers hold context."""
    per_token = 2 * shape.n_kv_heads * shape.head_dim * batch  # K and V elements per layer per token
    full_layers = shape.n_layers - shape.sliding_layers
    swa_tokens = min(context, shape.sliding_window) if shape.sliding_window else context
    elements = per_token * (full_layers * context + shape.sliding_layers * swa_tokens)
    return int(elements * kv_bytes_per_element(kv_dtype) + 0.5)


def compute_phases(shape: ModelShape, context: int, flash_attn: bool = True) -> tuple[int, int]:
    """(output phase, attention phase) bytes of llama.cpp's compute buffer; see the constants' comment."""
    ub, value = COMPUTE_UBATCH_TOKENS, COMPUTE_BYTES_PER_VALUE
    output = ub * (shape.vocab_size + 2 * shape.hidden_size) * value
    scores = ub * context * (value // 2 if flash_attn else (shape.query_heads + 1) * value)
    attention = ub * (3 * shape.hidden_size + shape.intermediate_size) * value + scores
    return output, attention


def compute_buffer_bytes(shape: ModelShape, context: int, flash_attn: bool = True) -> int:
    """Estimate of llama.cpp's compute buffer at this per-sequence context: the larger of its two phases."""
    return max(compute_phases(shape, context, flash_attn))


def attention_work_bytes(shape: ModelShape, context: int, flash_attn: bool = True) -> int:
    """Without flash attention, the scores x V product converts one layer's probabilities to f16 first: a second
    copy of the scores outside the compute buffer (ggml-cpu's work buffer, measured here; cuBLAS's f16 path
    makes the same copy in ggml-cuda's pool). Zero with flash attention."""
    return 0 if flash_attn else COMPUTE_UBATCH_TOKENS * context * shape.query_heads * 2


def overhead_bytes(shape: ModelShape, context: int, flash_attn: bool = True) -> int:
    """Fixed runtime allowance + estimated compute buffer (+ f16 scores without flash attention); see OVERHEAD_NOTE."""
    return (RUNTIME_OVERHEAD_BYTES + compute_buffer_bytes(shape, context, flash_attn)
            + attention_work_bytes(shape, context, flash_attn))


# ---------------------------------------------------------------- GPU table (data, not code)

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
    Gpu("RTX 3060", 12 * GiB, NVIDIA_USABLE, 360, "NVIDIA GeForce RTX 3060 spec page"),
    Gpu("RTX 4060 Ti", 16 * GiB, NVIDIA_USABLE, 288, "NVIDIA GeForce RTX 4060 Ti spec page (16 GB)"),
    Gpu("RTX 3090", 24 * GiB, NVIDIA_USABLE, 936, "NVIDIA GeForce RTX 3090 spec page"),
    Gpu("RTX 4090", 24 * GiB, NVIDIA_USABLE, 1008, "NVIDIA GeForce RTX 4090 spec page"),
    Gpu("RTX 5090", 32 * GiB, NVIDIA_USABLE, 1792, "NVIDIA GeForce RTX 5090 spec page"),
    Gpu("L4", 24 * GiB, NVIDIA_USABLE, 300, "NVIDIA L4 datasheet"),
    Gpu("A10", 24 * GiB, NVIDIA_USABLE, 600, "NVIDIA A10 datasheet"),
    Gpu("A100 40GB", 40 * GiB, NVIDIA_USABLE, 1555, "NVIDIA A100 datasheet (40GB)"),
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


# ---------------------------------------------------------------- the fit

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
            "kv_formula": "per layer 2 x n_kv_heads x head_dim x tokens x batch x bytes_per_element; "
                          "tokens = min(context, sliding_window) on sliding layers, context on full layers",
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
