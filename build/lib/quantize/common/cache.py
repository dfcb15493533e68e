"""The cache folder: converted base models, base log-probabilities, lm-eval task data. `QUANTIZE_CACHE` moves it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("QUANTIZE_CACHE", Path.home() / ".cache" / "quantize"))
