"""Files and their provenance: sha256 of files, JSON written atomically, library versions, and output folders
written to a staging folder, renamed into place only when complete.

A failed or interrupted run removes its staging folder and never touches `outputs/<name>`; a finished output
(one with a `report.md`) is replaced only with `force`, and then only after the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path

from quantize.common.errors import QuantizeError

LIBRARIES = ("quantize", "torch", "transformers", "compressed-tensors", "bitsandbytes", "safetensors", "gguf",
             "tokenizers", "numpy")
FINISHED_MARKER = "report.md"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", "results.json")
    }


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class Staging:
    """`with Staging(final, force) as folder:` write into `folder`; on success it becomes `final`."""

    def __init__(self, final: Path, force: bool):
        self.final = final
        self.force = force
        self.folder = final.with_name(f".{final.name}.partial-{os.getpid()}")

    def check(self) -> None:
        if self.final.exists() and not self.force:
            finished = (self.final / FINISHED_MARKER).exists()
            what = "a finished run" if finished else "a folder that is not a finished run"
            raise QuantizeError(f"output {self.final} already exists ({what}); pass --force to replace it, "
                                "or set `output:` in the recipe")

    def __enter__(self) -> Path:
        self.check()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        return self.folder

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
        if self.final.exists():  # only reachable with force
            os.replace(self.final, old)
        os.replace(self.folder, self.final)
        shutil.rmtree(old, ignore_errors=True)
