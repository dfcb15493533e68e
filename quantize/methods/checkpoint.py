"""The resume state of a streamed build, saved after each finished decoder layer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch


class Checkpoint:
    """Where a streamed build stands after its last finished decoder layer: `folder/.resume-state.pt` holds the
    layer index, the calibration activations entering the next layer (float32, exactly as computed) and the
    writer's state (`extra()`, set by the writer). Saved atomically after each layer's shard is on disk, so a
    build killed at any moment continues with the layer after the last saved one and writes the same bytes."""

    FILE = ".resume-state.pt"

    def __init__(self, folder: Path):
        self.path = folder / self.FILE
        self.state = torch.load(self.path, weights_only=False) if self.path.is_file() else None
        self.extra: Callable[[], dict] = dict

    @property
    def next_layer(self) -> int:
        return 0 if self.state is None else self.state["layer"] + 1

    def save(self, layer: int, hidden: torch.Tensor | None) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"layer": layer, "hidden": None if hidden is None else hidden.cpu(), **self.extra()}, tmp)
        os.replace(tmp, self.path)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)
