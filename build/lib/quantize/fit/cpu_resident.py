"""Resident memory of an artefact's runtime on a CPU host. `quantize fit` (vram.py) predicts what a GPU is charged; a CPU
process holds something else, modelled here. bench/memory_check.py checks both against this machine.

llama.cpp, CPU backend (weights mmap'd from the GGUF):

    resident = weights                         every tensor's pages, read once
             + repacked copies                 ggml-cpu re-lays out some matmul weights into interleaved blocks in
                                               an anonymous buffer of the same size (the file pages were read to
                                               make them, so both count); see REPACKED_TYPES
             + KV cache
             + the compute buffer's attention phase (decoding keeps one output row, so the f32 logits phase of the
               buffer is allocated but never touched) + without flash attention the f16 copy of the scores

torch (transformers on CPU, one dtype for weights, activations and KV cache):

    resident = tensors the model holds         after compressed-tensors checkpoints are decompressed to dense
             + the checkpoint's file pages     transformers reads safetensors through mmap; the mapping outlives the
                                               load and its pages stay resident (clean page cache, reclaimable)
             + KV cache                        2 x layers x kv_heads x head_dim x context x dtype bytes
             + prefill activations             context x (3 x intermediate + 4 x hidden) x dtype bytes: the gated
                                               MLP's three widest tensors alive at once, plus the residual stream,
                                               the norm output and q/attention output (CPU sdpa's flash kernel keeps
                                               no context² scores)

Neither includes the runtime's fixed host-side state (llama.cpp's vocabulary tables, Python and the libraries):
bench/memory_check.py measures that separately.
"""

from __future__ import annotations

from pathlib import Path

from quantize.fit.context_memory import attention_work_bytes, compute_phases, kv_cache_bytes
from quantize.fit.shape import ModelShape

# GGML types ggml-cpu repacks on x86 builds with AVX2 (ggml/src/ggml-cpu/repack.cpp,
# ggml_repack_get_optimal_repack_type, llama.cpp as vendored in llama-cpp-python 0.3.36): Q4_0 -> q4_0_8x8,
# Q4_K -> q4_K_8x8, IQ4_NL -> iq4_nl_8x8, MXFP4 -> mxfp4_8x8, for matmul weights whose row count is a multiple of
# 8. (Q2_K needs AVX-512; Q5_K/Q6_K/Q8_0 are repacked on ARM only.) The token embedding feeds GET_ROWS, not a
# matmul, and stays where it is.
REPACKED_TYPES = ("Q4_0", "Q4_K", "IQ4_NL", "MXFP4")
REPACK_ROW_MULTIPLE = 8


def is_repacked(name: str, ggml_type: str, shape: tuple[int, ...]) -> bool:
    """shape in GGML order (ne0 = columns, ne1 = rows)."""
    return (ggml_type in REPACKED_TYPES and len(shape) == 2 and shape[1] % REPACK_ROW_MULTIPLE == 0
            and name != "token_embd.weight")


def repack_bytes_gguf(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors
               if is_repacked(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape)))


def llamacpp_resident_bytes(weight_bytes: int, repack_bytes: int, shape: ModelShape, context: int,
                            flash_attn: bool, kv_dtype: str = "f16") -> int:
    attention_phase = compute_phases(shape, context, flash_attn)[1]
    return (weight_bytes + repack_bytes + kv_cache_bytes(shape, context, 1, kv_dtype) + attention_phase
            + attention_work_bytes(shape, context, flash_attn))


def torch_kv_bytes(shape: ModelShape, context: int, dtype_bytes: int) -> int:
    return kv_cache_bytes(shape, context, 1, {4: "f32", 2: "f16"}[dtype_bytes])


def torch_activation_bytes(shape: ModelShape, context: int, dtype_bytes: int) -> int:
    return context * (3 * shape.intermediate_size + 4 * shape.hidden_size) * dtype_bytes


def torch_resident_bytes(tensor_bytes: int, checkpoint_bytes: int, shape: ModelShape, context: int,
                         dtype_bytes: int) -> int:
    return (tensor_bytes + checkpoint_bytes + torch_kv_bytes(shape, context, dtype_bytes)
            + torch_activation_bytes(shape, context, dtype_bytes))
