"""llama.cpp through its Python binding (llama-cpp-python): the k-quant encoder and the GGUF runtime.

- quantize(): `llama_model_quantize` with llama.cpp's own type mixes (the reference definitions of Q4_K_M
  and friends), an importance matrix passed as `llama_model_imatrix_data` rows (tensor name → mean x² per
  input column, the statistic llama.cpp's imatrix tool computes as in_sum2 / counts), and the
  `quantize.imatrix.*` metadata that llama-quantize writes.
- LlamaCppModel: logits of a token sequence from llama.cpp's own kernels (fed the HF tokenizer's ids, so
  both backends score the same tokens). Its llama-bench-style timings are in measure/speed.py.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantize.common.errors import QuantizeError
from quantize.formats.gguf_types import ftype as ftype_of

KV_OVERRIDE_STR, KV_OVERRIDE_INT = 3, 0  # llama_model_kv_override_type


def binding():
    try:
        import llama_cpp
    except ImportError as exc:
        raise QuantizeError("the gguf method needs llama-cpp-python (pip install llama-cpp-python==0.3.36; it "
                            f"compiles llama.cpp, about 10 min on 2 cores): {exc}") from None
    return llama_cpp


def quantize(src: Path, dst: Path, ftype: str, imatrix: dict[str, np.ndarray] | None = None,
             metadata: dict[str, str | int] | None = None, pure: bool = False, threads: int | None = None,
             tensor_types: dict[str, str] | None = None) -> None:
    """llama-quantize SRC DST FTYPE, in process. `imatrix`: GGUF tensor name → importance per input column.
    `tensor_types`: GGUF tensor name → GGML type, llama-quantize's `--tensor-type` (each an anchored pattern, so
    it names exactly one tensor); llama.cpp still applies its fallback to a tensor whose rows the type cannot
    hold, so callers give types that fit (`fits_rows`)."""
    lib = binding()
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype_of(ftype)
    params.nthread = threads or os.cpu_count() or 1
    params.pure = pure
    keep = []  # ctypes buffers must outlive the call
    if tensor_types:
        overrides = (lib.llama_model_tensor_override * (len(tensor_types) + 1))()  # a null pattern ends the list
        for k, (name, kind) in enumerate(sorted(tensor_types.items())):
            overrides[k].pattern = f"^{re.escape(name)}$".encode()
            overrides[k].type = int(GGMLQuantizationType[kind])
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(lib.llama_model_tensor_override))
        keep.append(overrides)
    if imatrix:
        rows = (lib.llama_model_imatrix_data * (len(imatrix) + 1))()  # zeroed last row ends the list
        for k, (name, values) in enumerate(sorted(imatrix.items())):
            buf = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(buf)
            rows[k].name = name.encode()
            rows[k].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            rows[k].size = buf.size
        params.imatrix = ctypes.cast(rows, ctypes.POINTER(lib.llama_model_imatrix_data))
        keep.append(rows)
    if metadata:
        kv = (lib.llama_model_kv_override * (len(metadata) + 1))()  # key[0] == 0 ends the list
        for k, (key, value) in enumerate(metadata.items()):
            kv[k].key = key.encode()
            if isinstance(value, int):
                kv[k].tag, kv[k].value.val_i64 = KV_OVERRIDE_INT, value
            else:
                kv[k].tag, kv[k].value.val_str = KV_OVERRIDE_STR, str(value).encode()[:127]
        params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(lib.llama_model_kv_override))
        keep.append(kv)
    partial = dst.with_name(dst.name + ".partial")
    rc = lib.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise QuantizeError(f"llama.cpp could not quantize {src} to {ftype} (llama_model_quantize returned {rc})")
    partial.replace(dst)


def fits_rows(kind: str, n_per_row: int) -> bool:
    """Whether GGML type `kind` can hold rows of `n_per_row` weights (whole blocks: 256 for k-quants, 32 …)."""
    return n_per_row % GGML_QUANT_SIZES[GGMLQuantizationType[kind]][0] == 0


class _TypeTraits(ctypes.Structure):  # ggml.h struct ggml_type_traits
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)),
                ("from_float_ref", ctypes.c_void_p)]


def _ggml():
    """libggml-base of the llama-cpp-python build: ggml's own quantisation and dequantisation routines."""
    lib = ctypes.CDLL(str(Path(binding().__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def roundtrip(kind: str, weights: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`weights` [rows, n_per_row] as llama.cpp stores them in GGML type `kind` and reads them back: the same
    `ggml_quantize_chunk` llama-quantize calls per tensor (with the tensor's importance per column, when it has
    one), then the type's own `to_float`. Returns (dequantized float32 [rows, n_per_row], the stored bytes)."""
    global _LIB
    if _LIB is None:
        _LIB = _ggml()
    rows, n_per_row = weights.shape
    code = int(GGMLQuantizationType[kind])
    if not fits_rows(kind, n_per_row):  # ggml would abort the process
        raise QuantizeError(f"GGML type {kind} cannot hold rows of {n_per_row} weights")
    if importance is None and _LIB.ggml_quantize_requires_imatrix(code):
        raise QuantizeError(f"GGML type {kind} needs an importance matrix")
    src = np.ascontiguousarray(weights, dtype=np.float32)
    traits = _LIB.ggml_get_type_traits(code).contents
    n_bytes = rows * (n_per_row // traits.blck_size) * traits.type_size
    dst = np.empty(n_bytes, dtype=np.uint8)
    imat = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    f32 = ctypes.POINTER(ctypes.c_float)
    written = _LIB.ggml_quantize_chunk(code, src.ctypes.data_as(f32), dst.ctypes.data, 0, rows, n_per_row,
                                       None if imat is None else imat.ctypes.data_as(f32))
    assert written == n_bytes, (kind, written, n_bytes)
    out = np.empty((rows, n_per_row), dtype=np.float32)
    traits.to_float(dst.ctypes.data, out.ctypes.data_as(f32), rows * n_per_row)
    return out, dst


_LIB = None


def cpu_features() -> str:
    """The instruction sets this llama.cpp build's CPU kernels use (llama_print_system_info), e.g. "AVX2 FMA F16C":
    .ci/setup builds llama-cpp-python portable (GGML_NATIVE=OFF, so a cached wheel runs on any x86-64 CI machine),
    which leaves out AVX512 where the machine has it; a native llama.cpp is faster there (bench/results/
    gguf_eval_speed.md: 5.4 vs 7.5 s per 4 × 512-token pass of Gemma-3-270m on this AVX512 EPYC)."""
    info = binding().llama_print_system_info().decode()
    return " ".join(k.strip() for k, v in re.findall(r"([A-Z0-9_ ]+?) = (\d+)", info.split("CPU :", 1)[-1])
                    if v != "0" and k.strip() not in ("LLAMAFILE", "OPENMP", "REPACK")) or "generic"


class LlamaCppModel:
    """A GGUF loaded in llama.cpp. `kv_type` F16 is llama.cpp's default cache (what users run); F32 makes the
    logits comparable with an fp32 torch model to ~1e-4; Q8_0 / Q4_0 are llama.cpp's quantized caches (-ctk/-ctv),
    whose V half needs `flash_attn`."""

    def __init__(self, path: Path, n_ctx: int = 512, threads: int | None = None, kv_type: str = "F16",
                 logits_all: bool = True, n_batch: int | None = None, flash_attn: bool = False):
        lib = binding()
        kv = int(GGMLQuantizationType[kv_type])  # F16, F32, BF16, Q8_0, Q4_0 (a quantized V needs flash_attn)
        self.path, self.n_ctx, self.kv_type = path, n_ctx, kv_type
        # what moves its numbers besides the weights: recorded with every figure it produces
        self.settings = (f"KV cache {kv_type}, flash attention {'on' if flash_attn else 'off'}, CPU kernels "
                         f"{cpu_features()}")
        self.threads = threads or torch.get_num_threads()
        n_batch = n_batch or n_ctx  # one evaluation chunk per batch; llama.cpp's own default is 512
        self.llm = lib.Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, logits_all=logits_all,
                             n_threads=self.threads, n_threads_batch=self.threads, type_k=kv, type_v=kv,
                             flash_attn=flash_attn, verbose=False)
        self.vocab_size = self.llm.n_vocab()
        self._logits: torch.Tensor | None = None  # logits(…, reuse=True)'s buffer

    reuses_logits = True  # logits(…, reuse=True) exists: quality's scoring loop consumes each chunk before the next

    def logits(self, ids: list[int], first: int = 0, reuse: bool = False) -> torch.Tensor:
        """[len(ids) - first, vocab] float32 logits of positions first… of one sequence from an empty cache. The
        batch asks llama.cpp for those outputs only (as llama-perplexity asks for the scored half), so the output
        layer runs on them alone: for Gemma 3's 262k vocabulary that layer is most of a chunk's work.
        Without `reuse`, a fresh tensor of its own. With `reuse`, a tensor valid only until the next call or close:
        when the sequence fits one batch (an evaluation chunk does: n_batch = n_ctx), llama.cpp's own output buffer
        itself, uncopied (268 MB per Gemma 3 chunk); else a buffer of this model that the next call overwrites."""
        llm, vocab = self.llm, self.vocab_size
        n_out = max(0, len(ids) - first)
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # an empty cache, as Llama.eval starts from
        batches = [(start, ids[start : start + llm.n_batch]) for start in range(0, len(ids), llm.n_batch)]
        if reuse and len(batches) == 1:
            return torch.from_numpy(self._decode(*batches[0], first))
        if not reuse:
            out = torch.empty(n_out, vocab)
        else:
            if self._logits is None or self._logits.shape[0] < n_out:
                self._logits = torch.empty(n_out, vocab)
            out = self._logits[:n_out]
        filled = 0
        for start, batch in batches:
            rows = self._decode(start, batch, first)
            out[filled : filled + rows.shape[0]].numpy()[:] = rows
            filled += rows.shape[0]
        return out

    def _decode(self, start: int, batch: list[int], first: int) -> np.ndarray:
        """Decode `batch` at positions start… asking for the outputs of positions ≥ first; their logits [k, vocab]
        as a view of llama.cpp's output buffer (valid until the next decode)."""
        llm, vocab = self.llm, self.vocab_size
        llm._batch.set_batch(batch=batch, n_past=start, logits_all=False)
        k = 0
        for j in range(len(batch)):
            wanted = start + j >= first
            llm._batch.batch.logits[j] = wanted
            k += wanted
        llm._ctx.decode(llm._batch)
        llm.n_tokens += len(batch)
        if not k:
            return np.empty((0, vocab), dtype=np.float32)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(k * vocab,)).reshape(k, vocab)

    def close(self) -> None:  # idempotent: the pipeline closes before benchmarking, and again when freeing
        if self.llm is not None:
            self.llm.close()
            self.llm = None
