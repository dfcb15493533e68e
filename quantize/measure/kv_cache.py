"""The KV cache's own cost, measured: a GGUF scored on llama.cpp once per K/V cache type (`eval.kv_cache`), every
type with flash attention on (llama.cpp needs it for a quantized V cache, so the f16 row is scored the same way
and the rows differ by the cache alone), each against the same base store (the run puts beside each the memory
the fit computes for weights + that cache + overhead: pipeline._kv_cache)."""

from __future__ import annotations

from pathlib import Path

from quantize.measure import quality
from quantize.runtimes.llamacpp import LlamaCppModel

# eval.kv_cache's names (the fit's kv_dtype names; upper case: llama.cpp's cache type, -ctk / -ctv)
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def score_kv_types(path: Path, chunks, base, kv_types: list[str], label: str) -> dict:
    """{kv type: {"perplexity": scores, "loader": settings}} for the GGUF at `path`; `base`: the base store (None:
    perplexity only)."""
    out = {}
    for kv in kv_types:
        model = LlamaCppModel(path, n_ctx=chunks.n_ctx, kv_type=kv.upper(), flash_attn=True)
        try:
            name = f"{label} (KV {kv})"
            scores = (quality.score_model(model, chunks, None, name, floor=False) if base is None
                      else quality.score(model, chunks, base, name))
            out[kv] = {"perplexity": scores, "loader": model.settings}
        finally:
            model.close()
    return out
