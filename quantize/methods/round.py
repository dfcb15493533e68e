"""RTN: round-to-nearest onto each group's min/max grid, no calibration. The baseline GPTQ and AWQ must beat;
streamed layer by layer and written as compressed-tensors like them."""

from __future__ import annotations

import torch

from quantize import rtn
from quantize.models import unique_parameters
from quantize.recipe import ignored


def build(method, base, out_dir, calib=None, calib_info=None):
    from quantize.methods.weight_only import build_streamed

    def quantize_linear(W, hess, group_size: int):
        scale, zero = rtn.OBSERVERS[method.observer](W, method.bits, method.sym, group_size)
        scale = rtn.storable_scale(scale)
        q = rtn.quantize(W, scale, zero, method.bits, method.sym, group_size)
        row_loss = ((rtn.dequantize(q, scale, zero, group_size) - W.float()) ** 2).sum(dim=1)
        return q, scale, zero, row_loss, 0.0

    return {"scheme": f"w{method.bits}a16", **build_streamed(method, base, out_dir, None, quantize_linear)}


def weight_only_bytes(method, meta_model: torch.nn.Module) -> int:
    """bits/8 per quantized weight + an fp16 scale (and packed zero) per group; everything else fp16."""
    total = 0
    for name, module, pname, p in unique_parameters(meta_model):
        quantized = (isinstance(module, torch.nn.Linear) and pname == "weight" and ".layers." in name
                     and not ignored(name, method.ignore))
        if not quantized:
            total += p.numel() * 2
            continue
        rows, cols = p.shape
        gs = method.group_size if method.group_size != -1 and cols % method.group_size == 0 else cols
        groups = rows * (cols // gs)
        total += rows * cols * method.bits // 8 + groups * 2 + (0 if method.sym else groups * method.bits // 8)
    return total


def estimate_bytes(method, meta_model) -> int:
    return weight_only_bytes(method, meta_model)
