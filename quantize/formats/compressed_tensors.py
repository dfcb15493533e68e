"""Streamed compressed-tensors writer: one safetensors shard per decoder layer, written as soon as the layer is
quantized, then the untouched tensors, the index and config.json.

The on-disk layout is compressed-tensors' `pack-quantized` (what vLLM and SGLang load, and what transformers
loads with the compressed-tensors package): per quantized linear `weight_packed` (int32, codes packed by the
library's own `pack_to_int32`), `weight_scale` [out, groups], `weight_shape`, and for asymmetric grids a packed
`weight_zero_point`. compressed-tensors codes are signed: an unsigned b-bit code q with zero z is stored as
q − 2^(b−1) with zero z − 2^(b−1), which dequantizes to the same (q − z)·scale.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantize.sources.models import config_dtype, transformers_names
from quantize.sources.shards import Shards

STORAGE_DTYPE = torch.float16  # scales and every unquantized tensor, unless the base is bf16 (storage_dtype)


def storage_dtype(config: dict) -> torch.dtype:
    """The dtype of an artefact's scales and unquantized tensors: a base stored in bfloat16 stays bfloat16 (Gemma,
    Llama 3, Qwen: fp16 would overflow activations they were trained to keep in bf16's range); any other base
    (float16, float32) is stored in float16, as W{b}A16 checkpoints are. Both are 2 bytes."""
    return torch.bfloat16 if config_dtype(config) == "bfloat16" else STORAGE_DTYPE


def weight_args(bits: int, symmetric: bool, group_size: int, act_order: bool = False):
    from compressed_tensors.quantization import QuantizationArgs

    strategy = "channel" if group_size == -1 else "group"
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=None if group_size == -1 else group_size,
                            actorder="weight" if act_order and group_size != -1 else None)


@dataclass(frozen=True)
class Stored:
    """A scheme whose codes are stored as `weight` itself, next to `weight_scale` (compressed-tensors'
    `int-quantized` / `float-quantized` layouts, as llm-compressor writes W8A8-INT8 and FP8): `weights` and
    `input_activations` are compressed-tensors QuantizationArgs. With input_activations the engine quantizes each
    linear's input itself at run time (dynamic), so no activation tensor is stored. A block strategy's scale is
    one per [rows, cols] block of `block_structure`."""

    weights: object
    input_activations: object | None = None

    @property
    def fp4(self) -> bool:  # e2m1 codes packed two per byte; NVFP4: e4m3 group scales and a float32 global scale
        return self.weights.type == "float" and self.weights.num_bits == 4

    @property
    def mx(self) -> bool:  # MXFP4: power-of-two group scales stored as their E8M0 exponent, no global scale
        return self.fp4 and self.weights.scale_dtype == torch.uint8

    @property
    def format(self) -> str:
        if self.fp4:
            return "mxfp4-pack-quantized" if self.mx else "nvfp4-pack-quantized"
        return "float-quantized" if self.weights.type == "float" else "int-quantized"

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.weights.type == "float" else torch.int8

    @property
    def block_rows(self) -> int:
        return self.weights.block_structure[0] if self.weights.strategy == "block" else 1


class CompressedTensorsWriter:
    """`pack-quantized` (W{b}A16 integer grids), or with `stored` its layout (W8A8-INT8, FP8)."""

    def __init__(self, out_dir: Path, base_path: Path, n_layers: int, stored: Stored | None = None):
        self.stored = stored
        self.format = "pack-quantized" if stored is None else stored.format
        self.out_dir = out_dir
        self.base_path = base_path
        self.dtype = storage_dtype(json.loads((base_path / "config.json").read_text()))
        self.n_shards = n_layers + 1  # one per layer + one for everything outside the layers
        self.weight_map: dict[str, str] = {}
        self.schemes: dict[str, list[str]] = {}  # scheme key → module names
        self.args: dict[str, object] = {}
        self.written: set[str] = set()
        self.packed_names: list[str] = []  # quantized linears written so far

    STATE = ("weight_map", "schemes", "args", "written", "packed_names")  # what a resumed build restores

    def state(self) -> dict:
        """What has been written so far (shards, schemes), for a build that resumes after an interruption."""
        return {k: getattr(self, k) for k in self.STATE}

    def restore(self, state: dict) -> None:
        for k in self.STATE:
            setattr(self, k, state[k])

    def _shard_name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def packed(self, name: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               symmetric: bool, group_size: int, act_order: bool, global_scale: float | None = None
               ) -> dict[str, torch.Tensor]:
        offset = 0 if symmetric else 1 << (bits - 1)
        if self.stored is not None and self.stored.mx:  # q: e2m1 values; scale: powers of two
            from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

            tensors = {f"{name}.weight_packed": pack_fp4_to_uint8(q.float()),
                       f"{name}.weight_scale": (127 + torch.log2(scale).round()).to(torch.uint8).contiguous()}
            args = self.stored.weights
        elif self.stored is not None and self.stored.fp4:  # q: e2m1 values; scale: the group's s / global_scale
            from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

            tensors = {f"{name}.weight_packed": pack_fp4_to_uint8(q.float()),
                       f"{name}.weight_scale": (scale * global_scale).to(torch.float8_e4m3fn).contiguous(),
                       f"{name}.weight_global_scale": torch.tensor([global_scale], dtype=torch.float32)}
            args = self.stored.weights
        elif self.stored is not None:  # the codes themselves; a block scale is one row per block of rows
            assert bits == 8 and symmetric, "int-quantized and float-quantized hold symmetric 8-bit codes"
            tensors = {f"{name}.weight": q.to(self.stored.code_dtype),
                       f"{name}.weight_scale": scale[:: self.stored.block_rows].to(self.dtype).contiguous()}
            args = self.stored.weights
        else:
            tensors = self._pack(name, q, scale, zero, bits, symmetric, offset)
            args = weight_args(bits, symmetric, group_size, act_order)
        self.written.add(f"{name}.weight")
        self.packed_names.append(name)
        key = args.model_dump_json()
        self.args[key] = args
        self.schemes.setdefault(key, []).append(name)
        return tensors

    def _pack(self, name: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool,
              offset: int) -> dict[str, torch.Tensor]:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        tensors = {
            f"{name}.weight_packed": pack_to_int32((q - offset).to(torch.int8), bits),
            f"{name}.weight_scale": scale.to(self.dtype).contiguous(),
            f"{name}.weight_shape": torch.tensor(list(q.shape)),
        }
        if not symmetric:
            tensors[f"{name}.weight_zero_point"] = pack_to_int32((zero - offset).to(torch.int8), bits, packed_dim=0)
        return tensors

    def write_shard(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        shard = self._shard_name(k)
        tensors = {n: t.contiguous() for n, t in tensors.items()}
        save_file(tensors, self.out_dir / shard, metadata={"format": "pt"})
        self.weight_map.update({n: shard for n in tensors})
        self.written.update(tensors)

    def finish(self, ignore: list[str]) -> dict | None:
        """Copy every base tensor not written yet (embeddings, norms, lm_head) in the storage dtype; write index and
        config. With nothing packed (a dense export) the result is a plain checkpoint and this returns None."""
        shards = Shards(self.base_path)
        rest = {n: shards.get(n).to(self.dtype) for n in shards.names() if n not in self.written}
        self.write_shard(self.n_shards - 1, rest)
        total = sum((self.out_dir / s).stat().st_size for s in set(self.weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

        config = json.loads((self.base_path / "config.json").read_text())
        config["dtype"] = str(self.dtype).replace("torch.", "")
        config.pop("torch_dtype", None)
        (self.out_dir / "config.json").write_text(json.dumps(config, indent=2))
        for extra in ("generation_config.json",):
            if (self.base_path / extra).is_file():
                shutil.copy(self.base_path / extra, self.out_dir / extra)
        if not self.packed_names:
            return None
        return self.quantization_config(ignore)

    def quantization_config(self, ignore: list[str]) -> dict:
        from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

        only_one = len(self.schemes) == 1
        groups = {
            f"group_{k}": QuantizationScheme(targets=["Linear"] if only_one else sorted(names),
                                             weights=self.args[key],
                                             input_activations=self.stored and self.stored.input_activations)
            for k, (key, names) in enumerate(self.schemes.items())
        }
        qconfig = QuantizationConfig(config_groups=groups, ignore=ignore, format=self.format,
                                     quantization_status=QuantizationStatus.COMPRESSED)
        for group in qconfig.config_groups.values():
            group.format = self.format
        ModelCompressor(quantization_config=qconfig).update_config(str(self.out_dir))
        return json.loads((self.out_dir / "config.json").read_text())["quantization_config"]


def is_fp4(folder: Path) -> bool:
    """NVFP4 or MXFP4 weights (nvfp4- / mxfp4-pack-quantized)."""
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    return qc.get("quant_method") == "compressed-tensors" and qc.get("format") in FP4_FORMATS


FP4_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")


def is_asymmetric(folder: Path) -> bool:
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    if qc.get("quant_method") != "compressed-tensors":
        return False
    return any(not (g.get("weights") or {}).get("symmetric", True) for g in qc.get("config_groups", {}).values())


class DequantizedShards(Shards):
    """A pack-quantized checkpoint read as the dense one it stands for: `get("….weight")` of a quantized linear
    unpacks its codes (and zero points) with compressed-tensors' own unpacking and returns (q − z)·scale in
    float32; every other tensor as stored. `names()` lists the dense names."""

    SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point", ".weight_global_scale")

    def __init__(self, folder: Path):
        super().__init__(folder)
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        self.args = {target: group["weights"] for group in qc["config_groups"].values() for target in group["targets"]}
        self.packed = {n[: -len(".weight_packed")] for n in self.files if n.endswith(".weight_packed")}
        # MXFP4: e2m1 codes two per byte, E8M0 exponents as weight_scale, no global scale and no weight_shape
        self.mx = qc.get("format") == "mxfp4-pack-quantized"
        # int-quantized (W8A8): the codes stored as `weight` itself, next to `weight_scale`
        self.naive = {n[: -len(".weight_scale")] for n in self.files if n.endswith(".weight_scale")} - self.packed

    def names(self) -> list[str]:
        dense = [n for n in self.files if not n.endswith(self.SUFFIXES)]
        return dense + [m + ".weight" for m in sorted(self.packed)]

    def shape(self, name: str) -> list[int]:
        module = name.removesuffix(".weight")
        if module in self.packed and name.endswith(".weight"):
            if self.mx or module + ".weight_global_scale" in self.files:  # FP4: two e2m1 codes per byte
                rows, half = super().shape(module + ".weight_packed")
                return [rows, 2 * half]
            return super().get(module + ".weight_shape").tolist()
        return super().shape(name)

    def get(self, name: str) -> torch.Tensor:
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and self.mx and module in self.packed:  # MXFP4: code × 2^(exponent − 127)
            from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

            packed = super().get(module + ".weight_packed")
            q = unpack_fp4_from_uint8(packed, packed.shape[0], 2 * packed.shape[1], dtype=torch.float32)
            scale = torch.exp2(super().get(module + ".weight_scale").float() - 127)
            return (q.reshape(q.shape[0], scale.shape[1], -1) * scale[..., None]).reshape(q.shape)
        if name.endswith(".weight") and module + ".weight_global_scale" in self.files:  # NVFP4
            from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

            packed = super().get(module + ".weight_packed")
            q = unpack_fp4_from_uint8(packed, packed.shape[0], 2 * packed.shape[1], dtype=torch.float32)
            scale = super().get(module + ".weight_scale").float() / super().get(module + ".weight_global_scale")
            return (q.reshape(q.shape[0], scale.shape[1], -1) * scale[..., None]).reshape(q.shape)
        if name.endswith(".weight") and module in self.naive:  # codes × per-channel, group or block scale
            q = super().get(name).float()
            scale = super().get(module + ".weight_scale").float()  # [rows, groups], or [row blocks, col blocks]
            if scale.shape[0] != q.shape[0]:
                scale = scale.repeat_interleave(-(-q.shape[0] // scale.shape[0]), dim=0)[: q.shape[0]]
            return (q.reshape(q.shape[0], scale.shape[1], -1) * scale[..., None]).reshape(q.shape)
        if not (name.endswith(".weight") and module in self.packed):
            return super().get(name)
        q, scale, zero = self.codes(module)
        W = (q.reshape(q.shape[0], scale.shape[1], -1) - zero[..., None]) * scale[..., None]
        return W.reshape(q.shape)

    def codes(self, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A pack-quantized linear's signed integer codes q [out, in], scales [out, groups] and zero points (0 for
        symmetric grids), all float32, unpacked with compressed-tensors' own unpacking: W = (q − zero)·scale."""
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        args = self.args.get(module) or self.args["Linear"]
        bits = args["num_bits"]  # codes and zero points are both stored signed: the offset cancels in q - z
        shape = torch.Size(super().get(module + ".weight_shape").tolist())
        q = unpack_from_int32(super().get(module + ".weight_packed"), bits, shape).float()  # signed codes
        scale = super().get(module + ".weight_scale").float()  # [rows, groups]
        zero = torch.zeros_like(scale)
        if module + ".weight_zero_point" in self.files:
            zp = super().get(module + ".weight_zero_point")
            zero = unpack_from_int32(zp, bits, torch.Size(scale.shape), packed_dim=0).float()
        return q, scale, zero


def load_dense(folder: Path, dtype=torch.float32):
    """Reload a pack-quantized checkpoint as a dense torch model with compressed-tensors' own unpacking
    (DequantizedShards).

    Used for asymmetric checkpoints only: transformers 5.23 with compressed-tensors 0.20 builds the zero point
    unpacked and rejects the packed one on disk (the bug reported as llm-compressor#1618), while vLLM reads
    the packed layout written here. Symmetric checkpoints reload through plain transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    shards = DequantizedShards(folder)
    state = transformers_names({n: shards.get(n) for n in shards.names()}, config["model_type"])  # MoE: 3-D experts
    hf_config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k for k in missing), missing  # tied lm_head comes from the embedding
    model.tie_weights()
    return model.eval()
