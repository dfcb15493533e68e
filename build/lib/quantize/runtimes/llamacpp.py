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
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

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
             metadata: dict[str, str | int] | None = None, pure: bool = False, threads: int | None = None) -> None:
    """llama-quantize SRC DST FTYPE, in process. `imatrix`: GGUF tensor name → importance per input column."""
    lib = binding()
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype_of(ftype)
    params.nthread = threads or os.cpu_count() or 1
    params.pure = pure
    keep = []  # ctypes buffers must outlive the call
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


class LlamaCppModel:
    """A GGUF loaded in llama.cpp. `kv_type` F16 is llama.cpp's default cache (what users run); F32 makes the
    logits comparable with an fp32 torch model to ~1e-4."""

    def __init__(self, path: Path, n_ctx: int = 512, threads: int | None = None, kv_type: str = "F16",
                 logits_all: bool = True, n_batch: int | None = None, flash_attn: bool = False):
        lib = binding()
        kv = int({"F16": GGMLQuantizationType.F16, "F32": GGMLQuantizationType.F32}[kv_type])
        self.path, self.n_ctx, self.kv_type = path, n_ctx, kv_type
        # what moves its numbers besides the weights: recorded with every figure it produces
        self.settings = f"KV cache {kv_type}, flash attention {'on' if flash_attn else 'off'}"
        self.threads = threads or torch.get_num_threads()
        n_batch = n_batch or n_ctx  # one evaluation chunk per batch; llama.cpp's own default is 512
        self.llm = lib.Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, logits_all=logits_all,
                             n_threads=self.threads, n_threads_batch=self.threads, type_k=kv, type_v=kv,
                             flash_attn=flash_attn, verbose=False)
        self.vocab_size = self.llm.n_vocab()

    def logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] float32 logits of one sequence from an empty cache."""
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    def close(self) -> None:  # idempotent: the pipeline closes before benchmarking, and again when freeing
        if self.llm is not None:
            self.llm.close()
            self.llm = None
