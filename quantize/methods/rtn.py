"""RTN: round-to-nearest onto each group's grid (min/max, or the mse shrink search), no calibration. The baseline
GPTQ and AWQ must beat; streamed layer by layer and written like them."""

from __future__ import annotations

from quantize.methods import grids
from quantize.methods.configs import RtnMethod
from quantize.methods.weight_only import Solved, build_streamed, scale_dtype

Config = RtnMethod


def build(method: RtnMethod, base, out_dir, calib=None, calib_info=None, keep: dict | None = None) -> dict:
    dtype = scale_dtype(method, base)

    def solve(W, hess, group_size: int) -> Solved:
        scale, zero = grids.OBSERVERS[method.observer](W, method.bits, method.sym, group_size)
        scale = grids.storable_scale(scale, dtype)
        q = grids.quantize(W, scale, zero, method.bits, method.sym, group_size)
        row_loss = ((grids.dequantize(q, scale, zero, group_size) - W.float()) ** 2).sum(dim=1)
        return Solved(q, scale, zero, row_loss, 0.0)

    return {"scheme": f"w{method.bits}a16", **build_streamed(method, base, out_dir, None, solve, keep)}
