"""RTN: round-to-nearest onto each group's grid (min/max, or the mse shrink search), no calibration. The baseline
GPTQ and AWQ must beat; streamed layer by layer and written like them."""

from __future__ import annotations

from quantize.methods import grids
from quantize.methods.configs import RtnMethod
from quantize.methods.weight_only import Solved, build_streamed, scale_dtype, scheme_name

Config = RtnMethod


def solver(method: RtnMethod, dtype):
    """The per-linear solve (weight_only.build_streamed's `solve`), scales stored in `dtype`."""
    def solve(W, hess, group_size: int, bits: int) -> Solved:
        scale, zero = grids.OBSERVERS[method.observer](W, bits, method.sym, group_size)
        scale = grids.storable_scale(scale, dtype)
        q = grids.quantize(W, scale, zero, bits, method.sym, group_size)
        row_loss = ((grids.dequantize(q, scale, zero, group_size) - W.float()) ** 2).sum(dim=1)
        return Solved(q, scale, zero, row_loss, 0.0)
    return solve


def build(method: RtnMethod, base, out_dir, calib=None, calib_info=None, keep: dict | None = None) -> dict:
    solve = solver(method, scale_dtype(method, base))
    return {"scheme": scheme_name(method), **build_streamed(method, base, out_dir, None, solve, keep)}
