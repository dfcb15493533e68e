"""An artefact's tensors counted from its headers, no weights read: bytes by dtype of safetensors files, bytes by
GGML type of a GGUF, and a GGUF's bits per weight and type histogram."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from quantize.common.errors import QuantizeError


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
    import gguf

    path = Path(path)
    if not path.is_file():
        raise QuantizeError(f"GGUF file not found: {path}")
    totals: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        kind = tensor.tensor_type.name
        totals[kind] = totals.get(kind, 0) + int(tensor.n_bytes)
    return totals


def weight_bytes(folder_or_file: Path) -> dict[str, int]:
    """Bytes by dtype of an artefact: a .gguf, a folder holding model.gguf, a LiteRT folder (its constant tensors by
    TFLite tensor type, counted by LiteRT's tools when the file was written: litert.json), or a safetensors folder."""
    path = Path(folder_or_file)
    gguf_file = path if path.suffix == ".gguf" else path / "model.gguf"
    if gguf_file.is_file():
        return weight_bytes_gguf(gguf_file)
    if (path / "model.tflite").is_file() and (path / "litert.json").is_file():
        return json.loads((path / "litert.json").read_text())["bytes_by_type"]
    return weight_bytes_safetensors(path)


def gguf_stats(path: Path) -> dict:
    """Tensor bytes, parameters, bits per weight over all tensors, and how many tensors of each GGML type."""
    import gguf

    reader = gguf.GGUFReader(path)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    return {"bytes": n_bytes, "params": n_params, "bits_per_weight": 8 * n_bytes / n_params,
            "tensor_types": dict(sorted({t.tensor_type.name: 0 for t in reader.tensors}.items()))
            | {k: sum(1 for t in reader.tensors if t.tensor_type.name == k)
               for k in {t.tensor_type.name for t in reader.tensors}}}
