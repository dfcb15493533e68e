"""What a serving engine's quantized-activation linear computes, in torch: the reference our evaluation runs for
a compressed-tensors artefact whose config quantizes `input_activations` (W8A8-INT8, FP8 dynamic and block), so
its KLD holds the activation rounding the engine adds, not only the weights'. FP8 inputs follow vLLM's QuantFP8
(per token, or per 1 × 128 group for block-scaled weights; see fp8_per_token / fp8_per_group).

vLLM's W8A8-INT8 kernels (CUDA `cutlass_scaled_mm`, the CPU build's oneDNN `int8_scaled_mm`) quantize each input
row (token) dynamically, symmetric:

    scale_t = max_j |x_tj| / 127          q_tj = clamp(round_half_even(x_tj · (1 / scale_t)), −128, 127)
    y_t = scale_t · scale_w[o] · Σ_j q_tj · q_w[o, j]  (+ bias)              (int32 accumulation)

tests/test_w8a8.py checks the codes and scales against vLLM's own `scaled_int8_quant` bit for bit (the reciprocal
matters: x / scale differs from x · (1/scale) in a few codes per thousand). The reference computes the same sum in
float32 as (q·scale_t) · (q_w·scale_w)ᵀ: exact products of small integers, rounded once per add. compressed-tensors'
own fake quantization divides by 127.5 (its symmetric int8 range), which is not what the engine runs; so these
artefacts are evaluated here, not through transformers' compressed-tensors forward.

    INPUT_QUANTIZERS: (type, strategy, dynamic, symmetric, bits) of the config's input_activations → function
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from quantize.common.errors import QuantizeError


def int8_token_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [..., n], scale float32 [..., 1]) of x per row (last dim), as vLLM's dynamic symmetric
    `scaled_int8_quant`."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return torch.clamp(torch.round(xf * inv), -128, 127).to(torch.int8), scale


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x quantized to int8 per row (last dim) and back, as vLLM's W8A8-INT8 kernels see it."""
    q, scale = int8_token_codes(x)
    return (q.float() * scale).to(x.dtype)


FP8_MAX = 448.0  # e4m3fn
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor on a dynamic fp8 scale


def fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    """x quantized to fp8 e4m3 per row and back, as vLLM's dynamic per-token QuantFP8 (scale = max|x_t| / 448,
    floored at 1/(448·512); x · (1/scale), clamped to ±448, cast with round-to-nearest-even)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    q = (xf * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def fp8_per_group(x: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """x quantized to fp8 e4m3 per group of `group_size` consecutive channels of each row and back, as vLLM's
    dynamic per-token-group QuantFP8 (its native path divides by the scale)."""
    xf = x.float()
    G = xf.reshape(*xf.shape[:-1], -1, group_size)
    scale = (G.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    q = (G / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).reshape(x.shape).to(x.dtype)


# (type, strategy, dynamic, symmetric, bits, group_size) → the engine's input quantization
INPUT_QUANTIZERS = {("int", "token", True, True, 8, None): int8_per_token,
                    ("float", "token", True, True, 8, None): fp8_per_token,
                    ("float", "group", True, True, 8, 128): fp8_per_group}


def input_quantizer(args: dict, where: str):
    key = (args.get("type"), args.get("strategy"), bool(args.get("dynamic")), bool(args.get("symmetric")),
           args.get("num_bits"), args.get("group_size"))
    if key not in INPUT_QUANTIZERS:
        raise QuantizeError(f"{where}: input_activations {key} (type, strategy, dynamic, symmetric, bits, group "
                            f"size) has no kernel reference here; accepted: {list(INPUT_QUANTIZERS)}")
    return INPUT_QUANTIZERS[key]


class InputQuantizedLinear(torch.nn.Module):
    """A linear whose input is quantized as the engine's kernel quantizes it, with its dequantized weight."""

    def __init__(self, linear: torch.nn.Linear, quantize_input):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quantize_input = quantize_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.quantize_input(x), self.weight, self.bias)


def input_activations(folder: Path) -> dict[str, dict]:
    """target (a module name or "Linear") → the input_activations args of its config group; empty for weight-only."""
    return _targets(json.loads((folder / "config.json").read_text()).get("quantization_config") or {})


def _targets(qc: dict) -> dict[str, dict]:
    return {t: g["input_activations"] for g in qc.get("config_groups", {}).values()
            if g.get("input_activations") for t in g["targets"]}


def _named(name: str, patterns) -> str | None:
    """The first of compressed-tensors' target/ignore patterns (a module name, or `re:` and a regex) naming `name`."""
    for p in patterns:
        if p == name or (p.startswith("re:") and re.match(p[3:], name)):
            return p
    return None


def quantize_inputs(model: torch.nn.Module, folder: Path) -> int:
    """Swap every linear the config quantizes for an InputQuantizedLinear; returns how many. A linear is quantized
    when a group targets it by name (or `re:` regex), or targets "Linear" and the config's `ignore` does not name
    it, as compressed-tensors matches them."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    targets = _targets(qc)
    ignore = qc.get("ignore") or []
    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or _named(name, ignore):
            continue
        target = _named(name, [t for t in targets if t != "Linear"]) or ("Linear" if "Linear" in targets else None)
        if target is None:
            continue
        args = targets[target]
        owner, _, leaf = name.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        setattr(parent, leaf, InputQuantizedLinear(module, input_quantizer(args, str(folder / "config.json"))))
        swapped += 1
    return swapped
