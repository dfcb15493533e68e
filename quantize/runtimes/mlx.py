"""MLX artefacts on mlx-lm, the runtime Apple Silicon users run them on (on Linux: `pip install "mlx-lm[cpu]"`,
MLX's CPU backend; plain `mlx-lm` installs no MLX there).

- MlxModel: logits of a token sequence from mlx-lm's own model code and MLX's quantized matmul, loaded with
  mlx_lm.utils.load_model (which quantizes the modules whose `.scales` the checkpoint holds).
- bench_mlx: llama-bench-style prompt processing and decode timings on the same runtime.

MLX is lazy: nothing is computed until mx.eval, so every timing ends with one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from quantize.common.errors import QuantizeError
from quantize.sources.models import config_dtype


def binding():
    try:
        import mlx.core as mx
        import mlx_lm
    except ImportError as exc:
        raise QuantizeError(f"MLX artefacts run on mlx-lm: pip install 'mlx-lm[cpu]==0.32.2' on Linux, 'mlx-lm' on "
                            f"Apple Silicon ({exc})") from None
    return mx, mlx_lm


def on_cpu() -> bool:
    """Whether MLX runs on its CPU backend here (no Metal, no CUDA)."""
    mx, _ = binding()
    return mx.default_device() == mx.cpu


def stored_dtype(path: Path) -> str:
    """The dtype an MLX folder's tensors are stored in (its config.json; float16 when it says nothing)."""
    return config_dtype(json.loads((Path(path) / "config.json").read_text())) or "float16"


# On its CPU backend MLX's float16 quantized matmul is far slower than its float32 one (SmolLM2-135M W4 g64, one
# thread: a 128-token forward did not finish in 600 s in float16; 12.8 s in float32), so off Apple Silicon (and
# CUDA) the model computes in float32 on the stored values, as torch artefacts are evaluated in float32 on CPU.
class MlxModel:
    """An MLX folder loaded by mlx-lm; computes in the dtype its tensors are stored in, or float32 on MLX's CPU
    backend."""

    def __init__(self, path: Path):
        mx, mlx_lm = binding()
        from mlx_lm.utils import load_model

        self.path = Path(path)
        self.model, config = load_model(self.path)
        self.vocab_size = int(config.get("vocab_size") or config["text_config"]["vocab_size"])
        stored = stored_dtype(self.path)
        self.dtype = stored
        if on_cpu() and stored != "float32":
            self.model.set_dtype(mx.float32)  # upcasts scales, biases and dense tensors; the codes stay packed
            self.dtype = "float32"
        self.settings = (f"mlx {mx.__version__} on {mx.default_device()}, computed in {self.dtype} (stored "
                         f"{stored})")
        self.version = mlx_lm.__version__

    def logits(self, ids: list[int], first: int = 0) -> torch.Tensor:
        """[len(ids) - first, vocab] float32 logits of positions first… of one sequence, no cache."""
        mx, _ = binding()
        out = self.model(mx.array([ids]))[0, first:].astype(mx.float32)
        return torch.from_numpy(np.array(out))

    def close(self) -> None:
        self.model = None


def bench_mlx(model: MlxModel, prompt_tokens: int, gen_tokens: int, repetitions: int, label: str, seed: int,
              timed_row) -> dict:
    """pp = one batch of N random tokens into an empty cache; tg = M tokens one by one (greedy, each fed back)
    from an empty cache. `timed_row` is measure/speed's warm-up + repetitions loop. MLX's CPU backend picks its
    own thread count (none is settable), so there is one row."""
    mx, _ = binding()
    from mlx_lm.models.cache import make_prompt_cache

    rng = np.random.default_rng(seed)
    prompt = mx.array(rng.integers(0, model.vocab_size, (1, prompt_tokens)))

    def pp() -> float:
        cache = make_prompt_cache(model.model)
        start = time.perf_counter()
        mx.eval(model.model(prompt, cache=cache))
        return time.perf_counter() - start

    def tg() -> float:
        cache = make_prompt_cache(model.model)
        token = prompt[:, :1]
        start = time.perf_counter()
        for _ in range(gen_tokens):
            token = model.model(token, cache=cache)[:, -1:].argmax(-1)
            mx.eval(token)
        return time.perf_counter() - start

    weights = sum(f.stat().st_size for f in model.path.glob("*.safetensors"))
    row = timed_row("mlx default", pp, tg, prompt_tokens, gen_tokens, repetitions, label, weights)
    return {"protocol": "llama-bench semantics on mlx-lm: pp = one batch of N random tokens from an empty cache; "
                        "tg = M tokens one by one from an empty cache; 1 warm-up, then timed repetitions; "
                        f"tokens/sec; {model.settings}",
            "backend": "mlx", "weight_bytes_in_memory": weights, "dtype": model.dtype, "cpu_count": os.cpu_count(),
            "rows": [row]}
