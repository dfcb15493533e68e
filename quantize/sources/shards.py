"""A checkpoint's tensors by name, read one at a time from its safetensors files (sharded or not)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class Shards:
    """Tensor name → safetensors file, read one tensor at a time."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / f for name, f in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            self.files = {}
            for f in files:
                with safe_open(f, "pt") as fh:
                    self.files.update({k: f for k in fh.keys()})

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> list[int]:
        """A tensor's shape from its file's header, no data read."""
        with safe_open(self.files[name], "pt") as fh:
            return list(fh.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], "pt") as fh:
            return fh.get_tensor(name)
