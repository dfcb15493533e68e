"""Streamed MLX writer: mlx-lm's affine layout, straight from our integer codes, one safetensors shard per
decoder layer as the layer is quantized, then the untouched tensors and config.json.

mlx-lm (utils.load_model) quantizes every module whose `<path>.scales` is in the checkpoint, with the bits and group
size it reads back from the shapes; config.json's `quantization: {group_size, bits, mode: affine}` says the
checkpoint is quantized. Per quantized linear:

    weight  uint32 [out, in·bits/32]   the codes u ∈ [0, 2^bits) as one little-endian bit stream per row
                                       (code j in bits j·bits … j·bits + bits − 1), what mx.quantize packs
    scales  [out, in/group_size]       w = scales · u + biases
    biases  [out, in/group_size]

Our codes dequantize as (q − zero)·scale, with q signed around 0 for symmetric grids and unsigned for asymmetric
ones; with u = q + off (off = 2^(bits−1) symmetric, 0 asymmetric) that is scale·u − scale·(zero + off), so
biases = −scale·(zero + off). MLX groups are 32, 64 or 128 columns wide in natural column order: no per-channel
grid, no g_idx (our act_order keeps static groups, so it needs none).

Tensors are written in the base checkpoint's dtype, as mlx_lm.convert keeps it (float16 unless the base is bfloat16
or float32; an fp32 base keeps the fp32 scales exact, so its logits compare with compressed-tensors' to float
error). Linears left alone (`ignore`, e.g. lm_head) and embeddings stay dense; a tied lm_head is not written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from quantize.formats import MLX_GROUP_SIZES
from quantize.sources.architectures import ARCHITECTURES
from quantize.sources.models import config_dtype
from quantize.sources.shards import Shards


def mlx_dtype(config: dict) -> torch.dtype:
    """The base's own dtype (float16 unless it says bfloat16 or float32), as mlx_lm.convert keeps it."""
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(config_dtype(config), torch.float16)


def with_rope_keys(config: dict) -> dict:
    """transformers ≥ 5 writes the rotary settings as `rope_parameters` (per layer type for Gemma 3); mlx-lm's
    ModelArgs read the older top-level `rope_theta`, `rope_local_base_freq` and `rope_scaling`, and fall back to
    their own defaults without them (Qwen2: θ = 1e6, where transformers' default is 1e4), and GLM-4 MoE's requires
    `partial_rotary_factor` and `rope_scaling`. Write both spellings; and
    Qwen3-MoE's expert count, which transformers ≥ 5 saves as `num_local_experts`, as mlx-lm's `num_experts` too."""
    config = dict(config)
    if config.get("model_type") == "qwen3_moe" and "num_local_experts" in config:
        config.setdefault("num_experts", config["num_local_experts"])  # transformers ≥ 5's name for it; mlx-lm's
    params = config.get("rope_parameters")
    if not params:
        return config
    full = params.get("full_attention", params)  # Gemma 3: {full_attention: {…}, sliding_attention: {…}}
    if "rope_theta" in full:
        config.setdefault("rope_theta", full["rope_theta"])
    if "rope_theta" in params.get("sliding_attention", {}):
        config.setdefault("rope_local_base_freq", params["sliding_attention"]["rope_theta"])
    if "partial_rotary_factor" in full:  # GLM-4 MoE: mlx-lm requires it at the top level
        config.setdefault("partial_rotary_factor", full["partial_rotary_factor"])
    if full.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", {k: v for k, v in full.items() if k not in ("rope_theta",
                                                                                       "partial_rotary_factor")})
    config.setdefault("rope_scaling", None)  # a required field of some mlx-lm ModelArgs (GLM-4 MoE)
    return config


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] codes in [0, 2^bits) → uint32 [rows, cols·bits/32], each row one LSB-first bit stream."""
    u = codes.to(torch.int64).numpy()
    assert u.min() >= 0 and u.max() < (1 << bits), "codes outside the grid"
    rows, cols = u.shape
    assert (cols * bits) % 32 == 0, f"{cols} columns of {bits} bits do not fill whole uint32 words"
    bit = (u[..., None] >> np.arange(bits)) & 1  # [rows, cols, bits], least significant first
    stream = bit.astype(np.uint8).reshape(rows, cols * bits // 8, 8)
    words = np.packbits(stream, axis=-1, bitorder="little").reshape(rows, -1).view("<u4")
    return torch.from_numpy(np.ascontiguousarray(words))


def unpack(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of `pack`: uint32 [rows, cols·bits/32] → int64 codes [rows, cols]."""
    raw = words.contiguous().numpy().view(np.uint8)
    stream = np.unpackbits(raw, axis=-1, bitorder="little").reshape(raw.shape[0], cols, bits)
    return torch.from_numpy((stream.astype(np.int64) << np.arange(bits)).sum(-1))


SWITCH_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral's expert linears in mlx-lm


def switch_mlp(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A sparse MoE block's per-expert tensors (`{block}.experts.{e}.{linear}.{weight,scales,biases}`) stacked
    over the experts as mlx-lm's SwitchGLU holds them and mlx_lm.convert writes them:
    `{block}.switch_mlp.{gate_proj,up_proj,down_proj}.{…}` [experts, …] (mlx-lm's Qwen3-MoE stacks only
    unquantized expert weights itself). Other tensors as they are."""
    out, stacks = {}, {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(.*)\.experts\.(\d+)\.(\w+)\.(weight|scales|biases)", name)
        if m is None:
            out[name] = t
            continue
        key = f"{m[1]}.switch_mlp.{SWITCH_NAMES.get(m[3], m[3])}.{m[4]}"
        stacks.setdefault(key, {})[int(m[2])] = t
    for key, experts in stacks.items():
        out[key] = torch.stack([experts[e] for e in range(len(experts))])
    return out


class MlxWriter:
    def __init__(self, out_dir: Path, base_path: Path, n_layers: int):
        self.out_dir = out_dir
        self.base_path = base_path
        self.dtype = mlx_dtype(json.loads((base_path / "config.json").read_text()))
        self.n_shards = n_layers + 1
        self.written: set[str] = set()
        self.schemes: set[tuple[int, int]] = set()  # (bits, group_size) used
        self.packed_names: list[str] = []

    def state(self) -> dict:
        return {"written": sorted(self.written), "schemes": sorted(self.schemes), "packed_names": self.packed_names}

    def restore(self, state: dict) -> None:
        self.written = set(state["written"])
        self.schemes = {tuple(s) for s in state["schemes"]}
        self.packed_names = list(state["packed_names"])

    def _shard_name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def packed(self, name: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               symmetric: bool, group_size: int, act_order: bool) -> dict[str, torch.Tensor]:
        assert group_size in MLX_GROUP_SIZES, f"{name}: MLX takes group sizes {MLX_GROUP_SIZES}, not {group_size}"
        off = 1 << (bits - 1) if symmetric else 0
        scale = scale.to(self.dtype).float()  # the artefact's scale; the bias is computed from it
        self.written.add(f"{name}.weight")
        self.packed_names.append(name)
        self.schemes.add((bits, group_size))
        return {f"{name}.weight": pack(q + off, bits),
                f"{name}.scales": scale.to(self.dtype).contiguous(),
                f"{name}.biases": (-scale * (zero.float() + off)).to(self.dtype).contiguous()}

    def write_shard(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        save_file({n: t.contiguous() for n, t in switch_mlp(tensors).items()}, self.out_dir / self._shard_name(k),
                  metadata={"format": "mlx"})
        self.written.update(tensors)

    def finish(self, ignore: list[str]) -> dict | None:
        """Every base tensor not written yet, in the artefact's dtype; config.json with `quantization`. Returns the
        quantization entry (None for a dense export)."""
        shards = Shards(self.base_path)
        self.write_shard(self.n_shards - 1, {n: shards.get(n).to(self.dtype) for n in shards.names()
                                             if n not in self.written})
        config = with_rope_keys(json.loads((self.base_path / "config.json").read_text()))
        arch = ARCHITECTURES.get(config.get("model_type"))
        if arch is not None and arch.mlx_model_type:  # mlx-lm's module for the family, where its name differs
            config["model_type"] = arch.mlx_model_type
        config["dtype"] = str(self.dtype).replace("torch.", "")
        config.pop("torch_dtype", None)
        qconfig = None
        if self.packed_names:
            assert len(self.schemes) == 1, f"one (bits, group size) per artefact, got {sorted(self.schemes)}"
            bits, group_size = next(iter(self.schemes))
            qconfig = {"group_size": group_size, "bits": bits, "mode": "affine"}
            config["quantization"] = qconfig
        (self.out_dir / "config.json").write_text(json.dumps(config, indent=2))
        if (self.base_path / "generation_config.json").is_file():
            shutil.copy(self.base_path / "generation_config.json", self.out_dir / "generation_config.json")
        return qconfig


def is_mlx(config: dict) -> bool:
    """An MLX checkpoint's config.json: mlx-lm's `quantization` entry and no transformers quantization method
    (mlx_lm.convert also copies the entry to `quantization_config`, without a quant_method)."""
    return "quantization" in config and "quant_method" not in (config.get("quantization_config") or {})
