"""`quantize eval` and its base-log-prob cache on real artefacts.

1. Each artefact is evaluated twice with `quantize eval` (scorecard.evaluate_artefact) against the same base:
   the first call computes and publishes the base's compact log-probs (uint16 over a 16-nat window), the
   second and later ones reuse them. Perplexity and KLD must be identical between the two evaluations.
2. The KLD through the cache is set beside the KLD the pipeline measured when it built the artefact, which
   keeps the base's log-probs in float32 for the run (no cache, no window).

The base cache goes to a fresh temporary folder so the first evaluation really computes it.
Usage: python bench/eval_cache_check.py [RUN/VARIANT ...]
  default: outputs/smollm2-awq/awq-w4-asym-g64 and outputs/smollm2-gguf/gguf-q4_k_m
Writes bench/results/eval_cache_check.{json,md}.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    from quantize.measure import scorecard
    from quantize.recipe import Eval

    ap = argparse.ArgumentParser()
    ap.add_argument("artefacts", nargs="*", type=Path)
    args = ap.parse_args()
    artefacts = args.artefacts or [ROOT / "outputs/smollm2-awq/awq-w4-asym-g64",
                                   ROOT / "outputs/smollm2-gguf/gguf-q4_k_m"]
    os.environ["QUANTIZE_CACHE"] = tempfile.mkdtemp(prefix="quantize-cache-")  # a fresh cache for this check only
    ev = Eval.model_validate({"perplexity": {"source": "bundled:wiki", "n_ctx": 512, "max_chunks": 32},
                              "speed": {"enabled": False}})
    rows = []
    for path in artefacts:
        pipeline = json.loads((path.parent / "results.json").read_text())["variants"][path.name]["perplexity"]
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            out = scorecard.evaluate_artefact(path, "bundled:smollm2-135m", ev)
            runs.append({"ppl": out["perplexity"]["ppl"], "kld": out["perplexity"]["kld"]["mean"],
                         "same_top": out["perplexity"]["kld"]["same_top"], "cache": out["base"]["perplexity_cache"]["state"],
                         "loader": out["loader"], "seconds": time.perf_counter() - t0})
            print(json.dumps({"artefact": str(path), **runs[-1]}), flush=True)
        rows.append({"artefact": str(path.relative_to(ROOT)), "runs": runs,
                     "identical": runs[0]["ppl"] == runs[1]["ppl"] and runs[0]["kld"] == runs[1]["kld"],
                     "pipeline_float32_store": {"ppl": pipeline["ppl"], "kld": pipeline["kld"]["mean"]},
                     "kld_rel_diff_vs_pipeline": runs[0]["kld"] / pipeline["kld"]["mean"] - 1})
    result = {"protocol": "bundled:wiki eval, n_ctx 512, 32 chunks, fp32 (as the recipes' eval)",
              "base": "bundled:smollm2-135m", "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "eval_cache_check.json").write_text(json.dumps(result, indent=2))
    lines = [f"`quantize eval` twice per artefact against one cached base ({result['protocol']}); pipeline = the "
             "KLD measured at build time with a float32 base store (no cache)", "",
             "| artefact | loader | eval 1 (base cache) PPL / KLD | eval 2 (base cache) PPL / KLD | identical | "
             "pipeline PPL / KLD | KLD cache vs pipeline |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b, p = r["runs"][0], r["runs"][1], r["pipeline_float32_store"]
        lines.append(f"| {r['artefact']} | {a['loader']} | {a['ppl']:.6f} / {a['kld']:.6f} ({a['cache']}) | "
                     f"{b['ppl']:.6f} / {b['kld']:.6f} ({b['cache']}) | {'yes' if r['identical'] else 'NO'} | "
                     f"{p['ppl']:.6f} / {p['kld']:.6f} | {100 * r['kld_rel_diff_vs_pipeline']:+.3f}% |")
    (HERE / "results" / "eval_cache_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
