"""The classic packed-int32 checkpoint layouts, for stacks that predate compressed-tensors:

- `gptq` (AutoGPTQ / GPTQModel checkpoint_format "gptq", v1), per quantized linear:
      qweight int32 [in·b/32, out]   codes packed along the input dim, value j of a word at bits b·j
      qzeros  int32 [groups, out·b/32]  zero points − 1 (v1; asymmetric grids are written as v2, zeros as
                                        they are: see gptq_checkpoint_format), packed along the output dim
      scales  fp16  [groups, out]      g_idx int32 [in] (group of each input column)
  plus `quantize_config.json` and config.json `quantization_config` with quant_method "gptq".
- `awq` (AutoAWQ GEMM, version "gemm"), 4-bit only:
      qweight int32 [in, out/8]   qzeros int32 [groups, out/8]   scales fp16 [groups, out]
  eight codes per word along the output dim in AutoAWQ's interleaved order AWQ_ORDER, zero points as they are;
  config.json `quantization_config` with quant_method "awq", zero_point true.

Codes are unsigned in both: a symmetric signed code q ∈ [−2^(b−1), 2^(b−1)) with zero 0 is stored as
q + 2^(b−1) with zero 2^(b−1), which dequantizes to the same (q − z)·scale. Both layouts need one group size
for every linear; both load through transformers with GPTQModel installed (its kernels; CPU included).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantize.formats import CLASSIC_BITS
from quantize.formats.compressed_tensors import CompressedTensorsWriter
from quantize.sources.shards import Shards

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ GEMM: nibble j of a word holds output column 8k + AWQ_ORDER[j]
AWQ_REVERSE = [AWQ_ORDER.index(j) for j in range(8)]


def pack(values: torch.Tensor, bits: int, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """Unsigned b-bit values → int32 words of 32/b values along `dim` (value j at bits b·j, after `order`)."""
    per = 32 // bits
    v = (values.to(torch.int64) & ((1 << bits) - 1)).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, per)  # [..., words, per]
    if order is not None:
        v = v[..., order]
    words = (v << (torch.arange(per) * bits)).sum(-1)  # < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed
    return words.movedim(-1, dim)


def unpack(words: torch.Tensor, bits: int, dim: int, order: list[int] | None = None) -> torch.Tensor:
    per = 32 // bits
    w = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    v = (w[..., None] >> (torch.arange(per) * bits)) & ((1 << bits) - 1)  # [..., words, per]
    if order is not None:
        v = v[..., [order.index(j) for j in range(per)]]
    return v.reshape(*v.shape[:-2], -1).movedim(-1, dim).to(torch.int32)


class ClassicWriter(CompressedTensorsWriter):
    """The streamed compressed-tensors writer with the `gptq` or `awq` tensors and config instead."""

    STATE = (*CompressedTensorsWriter.STATE, "shape")

    def __init__(self, out_dir: Path, base_path: Path, n_layers: int, fmt: str, extra_config: dict):
        super().__init__(out_dir, base_path, n_layers)
        self.dtype = torch.float16  # the GPTQ v1 and AutoAWQ layouts are fp16 by definition
        self.fmt, self.extra_config = fmt, extra_config
        self.shape: tuple[int, bool] | None = None  # (group_size, symmetric) shared by every linear

    def packed(self, name, q, scale, zero, bits, symmetric, group_size, act_order):
        assert bits in CLASSIC_BITS[self.fmt], (self.fmt, bits)
        rows, cols = q.shape
        gs = cols if group_size == -1 else group_size
        assert self.shape in (None, (group_size, symmetric)), f"{name}: one group size per {self.fmt} checkpoint"
        self.shape = (group_size, symmetric)
        offset = 1 << (bits - 1) if symmetric else 0
        q_u, zero_u = (q + offset).T, (zero.round().to(torch.int32) + offset).T  # [in, out], [groups, out]
        scales = scale.T.to(torch.float16).contiguous()
        self.written.add(f"{name}.weight")
        self.packed_names.append(name)
        if self.fmt == "awq":
            return {f"{name}.qweight": pack(q_u, bits, 1, AWQ_ORDER), f"{name}.qzeros": pack(zero_u, bits, 1, AWQ_ORDER),
                    f"{name}.scales": scales}
        zeros_stored = zero_u - 1 if symmetric else zero_u  # v1 stores z − 1; see gptq_checkpoint_format
        return {f"{name}.qweight": pack(q_u, bits, 0), f"{name}.qzeros": pack(zeros_stored, bits, 1),
                f"{name}.scales": scales, f"{name}.g_idx": (torch.arange(cols) // gs).to(torch.int32)}

    def quantization_config(self, ignore: list[str]) -> dict:
        group_size, symmetric = self.shape
        bits = self.extra_config["bits"]
        if self.fmt == "awq":
            qc = {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
                  "version": "gemm", "modules_to_not_convert": ignore or None}
        else:
            qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": symmetric,
                  "desc_act": False, "checkpoint_format": gptq_checkpoint_format(symmetric), "pack_dtype": "int32",
                  **self.extra_config}
            (self.out_dir / "quantize_config.json").write_text(json.dumps(qc, indent=2))
        config = json.loads((self.out_dir / "config.json").read_text())
        config["quantization_config"] = qc
        (self.out_dir / "config.json").write_text(json.dumps(config, indent=2))
        return qc


def gptq_checkpoint_format(symmetric: bool) -> str:
    """Symmetric grids: v1 ("gptq"), zeros stored as z − 1 = 2^(b−1) − 1, what every GPTQ stack reads.
    Asymmetric grids: v2 ("gptq_v2"), zeros as they are, because a zero point of 0 (a group with no negative
    weight) would be stored as −1, and v1 readers add 1 to the packed word as a whole, carrying into the next
    column's zero; GPTQModel and transformers read v2."""
    return "gptq" if symmetric else "gptq_v2"


def load_dense(folder: Path, dtype=torch.float32):
    """Dequantize a `gptq` (v1) or `awq` (GEMM) checkpoint into a dense torch model, with our own unpacking:
    the evaluation path when GPTQModel (what transformers needs for these formats) is not installed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((folder / "config.json").read_text())
    qc = config.pop("quantization_config")
    fmt, bits = qc["quant_method"], qc["bits"]
    shards = Shards(folder)
    state = {}
    for name in shards.names():
        module, _, leaf = name.rpartition(".")
        if leaf in ("qzeros", "scales", "g_idx"):
            continue
        if leaf != "qweight":
            state[name] = shards.get(name)
            continue
        scales = shards.get(module + ".scales").float()  # [groups, out]
        if fmt == "awq":
            q = unpack(shards.get(name), bits, 1, AWQ_ORDER)  # [in, out]
            zero = unpack(shards.get(module + ".qzeros"), bits, 1, AWQ_ORDER)
            g_idx = torch.arange(q.shape[0]) // (q.shape[0] // scales.shape[0])
        else:
            q = unpack(shards.get(name), bits, 0)
            zero = unpack(shards.get(module + ".qzeros"), bits, 1)
            if qc.get("checkpoint_format", "gptq") == "gptq":  # v1: z − 1 on disk
                zero = (zero + 1) & ((1 << bits) - 1)
            g_idx = shards.get(module + ".g_idx").long()
        W = (q.float() - zero[g_idx].float()) * scales[g_idx]  # [in, out]
        state[module + ".weight"] = W.T.contiguous()
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k for k in missing), missing  # tied lm_head comes from the embedding
    model.tie_weights()
    return model.eval()
