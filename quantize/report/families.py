"""The families table (README's): one line per row of the architecture table (sources/architectures.py) with what
quantize does with it, generated, never written by hand. `quantize families` prints it."""

from __future__ import annotations

import importlib.util

from quantize.formats import llamacpp_convert
from quantize.sources.architectures import ARCHITECTURES, Architecture

ATTENTION = {"gqa": "GQA", "mla": "MLA (latent KV)", "hybrid": "linear + full (state + KV)"}


def _mlx(arch: Architecture) -> str:
    """mlx-lm's model module for the family (after mlx-lm's own renames: mistral → llama), where the installed
    mlx-lm has one."""
    if importlib.util.find_spec("mlx_lm") is None:
        return "–"
    from mlx_lm.utils import MODEL_REMAPPING

    name = arch.mlx_model_type or arch.model_type
    name = MODEL_REMAPPING.get(name, name)
    return f"`{name}`" if importlib.util.find_spec(f"mlx_lm.models.{name}") is not None else "–"


def _gguf(arch: Architecture) -> str:
    if arch.gguf_writer == "quantize":
        return f"`{arch.gguf_arch}`, quantize's"
    config = {"model_type": arch.model_type}
    return f"`{arch.gguf_arch}`, llama.cpp's" if llamacpp_convert.supports(config) else "–"


def families_markdown() -> str:
    rows = ["| model type | attention | MoE | layer-wise methods (rtn, gptq, awq, int8) | GGUF: llama.cpp arch, converter "
            "| mlx-lm module | notes |", "|---|---|---|---|---|---|---|"]
    for arch in ARCHITECTURES.values():
        moe = "–" if arch.moe is None else "routed" + (" + shared" if arch.moe.shared else "")
        layerwise = "yes" if arch.layer is not None else f"fit only: {arch.layer_refusal}"
        rows.append(f"| `{arch.model_type}` | {ATTENTION[arch.attention]} | {moe} | {layerwise} | {_gguf(arch)} | "
                    f"{_mlx(arch)} | {arch.note} |")
    return "\n".join(rows) + "\n"
