"""The memory that grows with context, besides the weights: the KV cache and the runtime's compute buffer.

* KV cache bytes follow from the model shape in config.json: per layer
  2 (K and V) x n_kv_heads x head_dim (MLA: kv_lora_rank + rope head dim) x cells x batch x bytes_per_element,
  where sliding-window layers keep only the window plus one micro-batch (llama.cpp's SWA cache, kv_cells), and
  a hybrid model's linear-attention layers keep no KV but a fixed-size f32 state per sequence.
* Runtime overhead is a fixed allowance plus an estimated compute buffer (see OVERHEAD_NOTE).
"""

from __future__ import annotations

from quantize.common.errors import QuantizeError
from quantize.fit.shape import ModelShape

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


def kv_bytes_per_element(kv_dtype: str) -> float:
    if kv_dtype not in KV_DTYPE_BYTES:
        raise QuantizeError(f"unknown kv dtype {kv_dtype!r}; accepted: {', '.join(KV_DTYPE_BYTES)}")
    return KV_DTYPE_BYTES[kv_dtype]


ENGINES = ("llama.cpp", "vllm")  # whose cache the fit models: llama.cpp for GGUF, vLLM for safetensors checkpoints
VLLM_BLOCK = 16  # vLLM's KV cache block size (tokens) on CUDA
# vLLM's KV cache types (--kv-cache-dtype): auto is the model's 16-bit dtype; it has no q8_0 / q4_0 cache
VLLM_KV_DTYPES = ("f16", "bf16", "fp8")


def vllm_in_flight_tokens(memory_bytes: int, name: str) -> int:
    """Tokens vLLM may have scheduled and not yet settled (VllmConfig.max_in_flight_tokens): 2 concurrent batches
    (async scheduling, its default) × the API server's default max_num_batched_tokens for the GPU (vllm 0.32
    engine/arg_utils.py: 16384 at ≥ 160 GiB, 8192 at ≥ 70 GiB but not A100, else 2048)."""
    gib = 2**30
    if memory_bytes >= 160 * gib:
        tokens = 16384
    elif memory_bytes >= 70 * gib and "a100" not in name.lower():
        tokens = 8192
    else:
        tokens = 2048
    return 2 * tokens


def kv_cells(shape: ModelShape, context: int, engine: str = "llama.cpp", in_flight: int = 0) -> tuple[int, int]:
    """(cells of a full-attention layer, cells of a sliding-window layer) per sequence, as the engine allocates
    them. llama.cpp (src/llama-kv-cache-iswa.cpp): the SWA cache holds the window plus one micro-batch, padded to
    256 cells, never more than the context; only in the families whose graph uses the window
    (ModelShape.llama_cpp_window), else every layer holds the context. vLLM (v1/kv_cache_interface.py): blocks of
    16 tokens; a sliding layer holds min(window − 1 + `in_flight` tokens, context) in blocks, plus one block."""
    if engine not in ENGINES:
        raise QuantizeError(f"unknown engine {engine!r}; accepted: {', '.join(ENGINES)}")
    if engine == "vllm":
        full = -(-context // VLLM_BLOCK) * VLLM_BLOCK
        if not shape.sliding_window:
            return full, full
        held = min(shape.sliding_window - 1 + in_flight, context)
        return full, (-(-held // VLLM_BLOCK) + 1) * VLLM_BLOCK
    if not shape.sliding_window or not shape.llama_cpp_window:
        return context, context
    swa = -(-(shape.sliding_window + COMPUTE_UBATCH_TOKENS) // 256) * 256
    return context, min(context, swa)


def kv_cache_bytes(shape: ModelShape, context: int, batch: int, kv_dtype: str, engine: str = "llama.cpp",
                   in_flight: int = 0) -> int:
    """The cache's bytes: per attention layer and sequence, kv_elements per cell (ModelShape.kv_elements: K and V,
    or MLA's latent) × the cells kv_cells gives, × batch sequences; plus, for a hybrid model's linear-attention
    layers, their fixed-size state per sequence (recurrent_state_bytes), whatever the context and KV type."""
    if engine == "vllm" and kv_dtype not in VLLM_KV_DTYPES:
        raise QuantizeError(f"KV cache type {kv_dtype!r} is llama.cpp's; vLLM's are {', '.join(VLLM_KV_DTYPES)} "
                            "(--kv-cache-dtype auto: the model's 16-bit dtype)")
    if engine == "llama.cpp" and kv_dtype == "fp8":
        raise QuantizeError("KV cache type 'fp8' is vLLM's; llama.cpp's are f32, f16, bf16, q8_0, q4_0")
    full_cells, swa_cells = kv_cells(shape, context, engine, in_flight)
    full_layers = shape.n_layers - shape.sliding_layers - shape.recurrent_layers
    elements = shape.kv_elements * batch * (full_layers * full_cells + shape.sliding_layers * swa_cells)
    return int(elements * kv_bytes_per_element(kv_dtype) + 0.5) + recurrent_state_bytes(shape, batch)


def recurrent_state_bytes(shape: ModelShape, batch: int) -> int:
    """Linear-attention layers' state: llama.cpp keeps each sequence's conv and recurrent state in f32
    (src/llama-model.cpp: recurrent_type_r/s = F32), independent of the context and of --cache-type-k/v."""
    return shape.recurrent_layers * shape.recurrent_state * batch * 4


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
