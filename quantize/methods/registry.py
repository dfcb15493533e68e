"""The method registry: the recipe's method name → the module whose `build(config, base, out_dir, calib,
calib_info) -> dict` makes the artefact. Each module names its config class (`Config`); the names come from
there, so they are written once (configs.py)."""

from __future__ import annotations

from quantize.methods import auto, awq, fp4, fp8, gguf, gptq, int8, litert, rtn
from quantize.methods.configs import CONFIGS

METHODS = {name: module for module in (int8, fp8, fp4, rtn, gptq, awq, gguf, auto, litert)
           for name, config in CONFIGS.items() if module.Config is config}
assert list(METHODS) == list(CONFIGS), f"a config without a module or a module without a config: {list(METHODS)}"
