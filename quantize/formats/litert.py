"""LiteRT (TensorFlow Lite) from our integer codes: what the conversion needs from a symmetric compressed-tensors
folder, and how a LiteRT artefact folder is recognised.

The .tflite itself is written by LiteRT's own tools in their environment (runtimes/litert.py, the worker): litert-
torch exports a float model from a Hugging Face folder, ai-edge-quantizer rewrites its FULLY_CONNECTED weights. So
the conversion hands over two files:

    dense/   the checkpoint as float32, every quantized linear's weight exactly codes × scale (what the export traces)
    codes.safetensors
             <linear>.codes int8 [out, in] and <linear>.scale float32 [out, in / block]: the worker finds each
             exported weight among these by its bytes and writes these codes and scales in its place

ai-edge-quantizer's layouts (read from its 0.10.0 sources): 4-bit weights as INT4 (two codes per byte) with one
float16 scale per block of 32, 64, 128 or 256 input columns and no zero points; 8-bit weights as INT8 with one
float32 scale per output channel. It writes block scales as bfloat16 values in float16 and XNNPack reads them as
bfloat16 and refuses a scale that is not a normal float16 (≥ 2⁻¹⁴): the method rounds scales to bfloat16 before
coding (methods/weight_only.scale_dtype), and a block whose scale is smaller is coded again here on 2⁻¹⁴ (its
weights are all below 7.5 · 2⁻¹⁴ ≈ 4.6e-4; counted as `scales_raised`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantize.formats.compressed_tensors import DequantizedShards
from quantize.sources.shards import Shards

FP16_MIN_NORMAL = 2.0**-14
MODEL_FILE = "model.tflite"
BUNDLE_FILE = "model.litertlm"  # LiteRT-LM's bundle: the same model, the tokenizer and chat template
INFO_FILE = "litert.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model")


def is_litert(folder: Path) -> bool:
    return folder.is_dir() and (folder / MODEL_FILE).is_file()


def write_dense(folder: Path, dense_dir: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """The float32 Hugging Face folder litert-torch exports from: one safetensors file, the config, the tokenizer."""
    dense_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dense_dir / "model.safetensors", metadata={"format": "pt"})
    (dense_dir / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy(folder / name, dense_dir / name)


def dense_checkpoint(folder: Path, dense_dir: Path) -> None:
    """An unquantized checkpoint (any float dtype) as the float32 folder the export reads."""
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "float32"
    shards = Shards(folder)
    write_dense(folder, dense_dir, {n: shards.get(n).float().contiguous() for n in shards.names()}, config)


def dense_and_codes(folder: Path, dense_dir: Path, codes_path: Path) -> dict:
    """Write `dense_dir` (float32 checkpoint, config without quantization_config, tokenizer) and `codes_path` from a
    symmetric pack-quantized folder. Returns the bits, block size (-1: per channel), linears and scales raised to
    2⁻¹⁴."""
    shards = DequantizedShards(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config")
    config["dtype"] = "float32"
    dense, codes, raised, blocks, bits = {}, {}, 0, set(), set()
    for module in sorted(shards.packed):
        q, scale, zero = shards.codes(module)
        bits.add((shards.args.get(module) or shards.args["Linear"])["num_bits"])
        assert not zero.any(), f"{module}: LiteRT holds symmetric grids only (no zero points)"
        rows, cols = q.shape
        block = cols // scale.shape[1]
        blocks.add(-1 if scale.shape[1] == 1 else block)  # -1: one scale per output channel
        low = scale < FP16_MIN_NORMAL
        if low.any():  # code the block again on the smallest scale XNNPack takes
            W = (q.reshape(rows, -1, block) * scale[..., None])
            scale = scale.clamp(min=FP16_MIN_NORMAL)
            top = 2 ** (max(bits) - 1)
            q = torch.clamp(torch.round(W / scale[..., None]), -top, top - 1).reshape(rows, cols)
            raised += int(low.sum())
        dense[f"{module}.weight"] = (q.reshape(rows, -1, block) * scale[..., None]).reshape(rows, cols).contiguous()
        codes[f"{module}.codes"] = q.to(torch.int8).contiguous()
        codes[f"{module}.scale"] = scale.contiguous()
    for name in shards.names():
        if name.removesuffix(".weight") not in shards.packed:
            dense[name] = shards.get(name).float().contiguous()
    write_dense(folder, dense_dir, dense, config)
    save_file(codes, codes_path)
    assert len(bits) == 1 and len(blocks) == 1, f"one scheme per LiteRT file, got bits {bits}, blocks {blocks}"
    return {"bits": bits.pop(), "block": blocks.pop(), "linears": len(shards.packed), "scales_raised": raised}
