"""Quality gates for CI: each variant judged against the recipe's `gates:` limits, with the measured value beside
each limit. The run exits 3 when any variant misses one (cli.py); the artefacts are still written."""

from __future__ import annotations

from quantize.fit.gpus import gpu_by_name
from quantize.fit.shape import ModelShape
from quantize.fit.vram import fit_one
from quantize.report.compare import best_speed


def judge(variant: dict, base: dict, gates, shape: ModelShape, flash_attn: bool) -> dict:
    """{"passed": bool, "checks": [{gate, limit, measured, passed}]} for one variant's results entry; must_fit with
    the engine and KV cache type of the variant's own fit (its rows)."""
    checks = []

    def check(gate: str, limit, measured, ok: bool) -> None:
        checks.append({"gate": gate, "limit": limit, "measured": measured, "passed": bool(ok)})

    ppl, kld = variant["perplexity"], variant["perplexity"].get("kld") or {}
    if gates.max_kld is not None:
        check("max_kld", gates.max_kld, kld.get("mean"), kld.get("mean", float("inf")) <= gates.max_kld)
    if gates.min_same_top is not None:
        check("min_same_top", gates.min_same_top, kld.get("same_top"), kld.get("same_top", 0) >= gates.min_same_top)
    if gates.max_ppl_delta is not None:
        delta = ppl["ppl"] - base["perplexity"]["ppl"]
        check("max_ppl_delta", gates.max_ppl_delta, delta, delta <= gates.max_ppl_delta)
    if gates.min_tg_tps is not None:
        tg = best_speed(variant, "tg")
        check("min_tg_tps", gates.min_tg_tps, tg, tg is not None and tg >= gates.min_tg_tps)
    if gates.must_serve:
        served = variant.get("serve") or {}
        ok = served.get("status") == "ok" and not (served.get("concurrent") or {}).get("empty_answers")
        check("must_serve", True, served.get("status", "not checked"), ok)
    if gates.must_fit and not variant["fit"]["rows"]:  # a LiteRT file: no GPU runs it
        for want in gates.must_fit:
            check("must_fit", {"gpu": want.gpu, "context": want.context, "batch": want.batch},
                  "a LiteRT file runs on the device; it has no GPU fit", False)
        return {"passed": False, "checks": checks}
    weights = sum(variant["fit"]["weight_bytes_by_dtype"].values())
    engine, kv_dtype = variant["fit"]["protocol"]["engine"], variant["fit"]["rows"][0]["kv_dtype"]
    for want in gates.must_fit:
        row = fit_one(weights, shape, gpu_by_name(want.gpu), want.context, want.batch, kv_dtype, flash_attn, engine)
        check("must_fit", {"gpu": want.gpu, "context": want.context, "batch": want.batch},
              {"total_bytes": row.total_bytes, "usable_bytes": row.usable_bytes, "headroom_bytes": row.headroom_bytes},
              row.fits)
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def failed(results: dict) -> list[str]:
    """'variant: gate (measured vs limit)' for every failed gate of a run's results."""
    out = []
    for name, v in results["variants"].items():
        for c in (v.get("gates") or {}).get("checks", []):
            if not c["passed"]:
                out.append(f"{name}: {c['gate']} (measured {c['measured']}, limit {c['limit']})")
    return out
