"""LiteRT's own quantizer as a method: the float export of the base model, then one of ai-edge-quantizer's named
recipes (its round-to-nearest), both run by LiteRT's tools in their managed environment (runtimes/litert.py). The
baseline that `format: litert` variants (our RTN / GPTQ / AWQ codes in LiteRT's layout) are compared with."""

from __future__ import annotations

from pathlib import Path

from quantize.methods.configs import LitertMethod
from quantize.runtimes import litert
from quantize.sources.models import BaseModel

Config = LitertMethod


def build(method: LitertMethod, base: BaseModel, out_dir: Path, calib=None, calib_info=None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    info = litert.build_with_recipe(base.path, out_dir, method.recipe, method.linears_only)
    return {"scheme": method.recipe, "format": "litert", "quantization_config": None, "litert": info}
