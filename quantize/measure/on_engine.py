"""`eval.engines: [vllm]`: does a variant deliver on the engine it is deployed to the quality our report measured?

Our reference evaluation runs transformers in `eval.dtype` (float32 by default); vLLM runs a compressed-tensors
artefact in bfloat16 (its CPU kernels refuse float32; it refuses float16 for Gemma 3). Each variant vLLM can load is
scored again on vLLM itself, on the same token ids: the log-probability vLLM gives each next token (its
prompt log-probabilities; the full distributions, and so KLD, are `quantize eval --engine vllm`'s, which is slow for
a large vocabulary). Per position t, with NLL_e from the engine and NLL_r from the reference:

    r(variant)  = mean_t (NLL_e − NLL_r)                 ln(PPL on the engine / PPL in our evaluation)
    r(base)     = the same for the base model (its reference: the base store's log-probabilities)
    excess      = mean_t [(NLL_e − NLL_r)(variant) − (NLL_e − NLL_r)(base)]   ± its paired standard error

r(base) is what the engine's dtype costs any model; `excess` is what it costs this artefact beyond that. The check
passes when excess is within two standard errors of 0, or below 0.5 % of perplexity (ln 1.005): AWQ's folded Gemma
norms failed it by 16 % before methods/awq.py kept the fold exact in bfloat16.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from quantize.common.errors import QuantizeError
from quantize.measure.kld_base import KldBaseFile, decode
from quantize.measure.quality import paired_difference

ENGINE_FORMATS = {"vllm": ("compressed-tensors",)}  # what each engine check scores; other formats are skipped
TOLERANCE = math.log(1.005)  # an excess below this is no finding, whatever its standard error


def engine_dtype(eval_dtype: str) -> str:
    """vLLM's dtype for our evaluation's: bfloat16 for float32 (its CPU kernels refuse float32), else the same."""
    return "bfloat16" if eval_dtype == "float32" else eval_dtype


def engine_nll(folder: Path, chunks, dtype: str) -> np.ndarray:
    """[positions] float64: vLLM's NLL of each scored position's next token, in the order quality.score saves them.
    Raises QuantizeError with vLLM's own reason when it refuses the artefact."""
    from quantize.runtimes.vllm import VllmModel

    model = VllmModel(folder, dtype, chunks.n_ctx + 1)
    logp = model.target_logprobs(chunks.ids)[:, chunks.first :]  # row t predicts position t + 1: the scored half
    return -logp.double().numpy().reshape(-1)


def base_reference_nll(store: KldBaseFile, chunks) -> np.ndarray:
    """[positions]: the base's NLL of each scored position's next token, from the base store's codes."""
    targets = chunks.ids[:, chunks.first + 1 :]
    out = [-decode(store.chunk(i), store.n_vocab).gather(1, targets[i][:, None])[:, 0].double().numpy()
           for i in range(chunks.ids.shape[0])]
    return np.concatenate(out)


def describe(engine: str, dtype: str, on_engine: np.ndarray, reference: np.ndarray,
             base_delta: np.ndarray | None = None) -> dict:
    """The engine row of one model: its perplexity on the engine and in our evaluation, ln of their ratio, and (for a
    variant, given the base's per-position engine − reference NLLs) the excess over the base's and the verdict."""
    ratio = paired_difference(on_engine, reference)
    row = {"engine": engine, "dtype": dtype, "ppl": math.exp(float(on_engine.mean())),
           "reference_ppl": math.exp(float(reference.mean())), "ln_ratio": ratio["difference"],
           "ln_ratio_unc": ratio["unc"], "positions": int(on_engine.size)}
    if base_delta is not None:
        paired = paired_difference(on_engine - reference, base_delta)
        excess, se = paired["difference"], paired["unc"]
        delivers = abs(excess) <= max(2 * se, TOLERANCE)
        row.update({"excess": excess, "excess_unc": se, "delivers": delivers,
                    "verdict": ("delivers the quality measured (the engine's dtype costs it what it costs the base)"
                                if delivers else
                                f"{math.exp(excess) - 1:+.1%} perplexity on {engine} beyond what its dtype costs the "
                                f"base ({excess:+.4f} ± {se:.4f} nats per token)")})
    return row


def check_variant(engine: str, folder: Path, fmt: str, chunks, eval_dtype: str, reference: np.ndarray,
                  base_delta: np.ndarray) -> dict:
    """One variant's engine row, or why it has none: not the engine's format, or the engine's refusal."""
    if fmt not in ENGINE_FORMATS[engine]:
        return {"engine": engine, "skipped": f"{fmt}: not a format {engine} loads ({', '.join(ENGINE_FORMATS[engine])})"}
    dtype = engine_dtype(eval_dtype)
    try:
        on_engine = engine_nll(folder, chunks, dtype)
    except QuantizeError as exc:
        return {"engine": engine, "dtype": dtype, "refused": str(exc)}
    row = describe(engine, dtype, on_engine, reference, base_delta)
    if engine == "vllm":
        from quantize.runtimes import vllm

        if caveat := vllm.cpu_caveat(folder, vllm.cpu_build()):  # it ran, but not as the format defines it
            row["caveat"] = caveat
    return row
