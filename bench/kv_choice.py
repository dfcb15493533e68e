"""The budgeted mix choosing llama.cpp's KV cache type with the weights (`budget.kv_dtype: auto`, what
`quantize fit-to --kv-dtype auto` writes), against each cache type fixed, at the same GPU, context and batch.

    python bench/kv_choice.py [--model smollm2-135m] [--gpu "RTX 3060"] [--chunks 12]
        → bench/results/kv_choice.{md,json}

Two operating points on `--gpu`, each a batch of sequences (64, 128) at the longest context (≤ the model's) at which
the trade is real:
  A: an f16 cache leaves the weights 38 % of their F16 bytes (about Q4_K_M's size on SmolLM2);
  B: a q8_0 cache leaves them 34 % (about Q3_K_M's); an f16 cache leaves nothing.
At each point: one budgeted mix per fixed cache type that leaves room (budget.kv_dtype f16 / q8_0 / q4_0: the bytes
fit leaves for weights with that cache) and one with kv_dtype auto; candidates: the default ones and IQ3_S,
IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS. Every variant is scored on llama.cpp with each
cache type (eval.kv_cache, flash attention on), so each fixed choice has its measured KLD with its own cache, and
the auto variant's prediction can be checked against the measured best.

Protocol: calibration 32 × 512 tokens of bundled:wiki/calibration (seed 0) for the importance matrix; the
sensitivity table and the cache's own KLD on the first 2 of those windows; PPL and KLD on `--chunks` × 512 tokens
of bundled:wiki/eval against the float32 HF base; llama.cpp, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantize.common.errors import QuantizeError  # noqa: E402
from quantize.common.files import versions  # noqa: E402
from quantize.fit.shape import param_counts, shape_from_config  # noqa: E402
from quantize.fit.vram import weight_budget  # noqa: E402
from quantize.methods.configs import MIX_CANDIDATES  # noqa: E402
from quantize.sources.models import resolve_model  # noqa: E402

KV = ["f16", "q8_0", "q4_0"]
# the default candidates and the lower i-quants (bench/budget_mix.py's i-quant budgets use the same list, so their
# sensitivity table is reused)
EXTRA = ["IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS"]
# the cache type, the share of the F16 weights' bytes it leaves them, and the concurrent sequences (each point's
# context is then chosen for that share)
POINTS = {"A": ("f16", 0.38, 64), "B": ("q8_0", 0.34, 128)}


def context_for(shape, gpu: str, batch: int, kv: str, target: int, cap: int) -> int:
    """The longest context ≤ cap at which `batch` sequences with `kv`'s cache leave at least `target` bytes for
    weights (the KV grows by one cell per token: finer than a step in batch)."""
    lo, hi = 1, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if left(shape, gpu, mid, batch, kv) >= target else (lo, mid - 1)
    return lo


def left(shape, gpu: str, ctx: int, batch: int, kv: str) -> int:
    try:
        return weight_budget(shape, gpu, ctx, batch, kv)[0]
    except QuantizeError:
        return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--gpu", default="RTX 3060")
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--output", type=Path, default=ROOT / "outputs" / "bench-kv-choice")
    args = ap.parse_args()
    config = json.loads((resolve_model(f"bundled:{args.model}").path / "config.json").read_text())
    shape = shape_from_config(config)
    f16_bytes = 2 * param_counts(config).total
    methods, points = [], {}
    for point, (kv, share, batch) in POINTS.items():
        ctx = context_for(shape, args.gpu, batch, kv, int(share * f16_bytes), config["max_position_embeddings"])
        room = {t: left(shape, args.gpu, ctx, batch, t) for t in KV}
        points[point] = {"batch": batch, "context": ctx, "weight_budget_bytes": room}
        for t in [*[t for t in KV if room[t] > 0], "auto"]:
            methods.append({"name": "auto", "variant": f"{point}-kv-{t}", "candidates": MIX_CANDIDATES + EXTRA,
                            "budget": {"gpu": args.gpu, "context": ctx, "batch": batch, "kv_dtype": t}})
    out = args.output / args.model
    recipe = {"name": f"kv-choice-{args.model}", "model": f"bundled:{args.model}", "methods": methods,
              "calibration": {"source": "bundled:wiki", "samples": 32, "seq_len": 512, "seed": 0},
              "eval": {"perplexity": {"source": "bundled:wiki", "n_ctx": 512, "max_chunks": args.chunks},
                       "kv_cache": KV, "speed": {"enabled": False}, "serve": {"enabled": False}},
              "fit": {"gpus": [args.gpu], "contexts": sorted({p["context"] for p in points.values()})},
              "output": str(out)}
    path = args.output / f"{args.model}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    if not (out / "report.md").is_file():
        subprocess.run([sys.executable, "-m", "quantize.cli", "run", str(path)], check=True, cwd=ROOT)
    results = json.loads((out / "results.json").read_text())
    rows = []
    for point, facts in points.items():
        auto = json.loads((out / f"{point}-kv-auto" / "manifest.json").read_text())["result"]
        choice = auto["kv_cache"]
        auto_types = [m["type"] for m in json.loads((out / f"{point}-kv-auto" / "mix.json").read_text())["tensors"]]
        for t in KV:
            o = choice["options"][t]
            row = {"point": point, "batch": facts["batch"], "context": facts["context"], "kv": t, "weight_budget_bytes": o["weight_budget_bytes"],
                   "fits": o["fits"], "chosen": t == choice["chosen"], "kv_kld_calibration": o["kv_kld"]}
            v = results["variants"].get(f"{point}-kv-{t}")
            if o["fits"] and v is not None:
                mine = json.loads((out / f"{point}-kv-{t}" / "mix.json").read_text())["tensors"]
                k = v["kv_cache"][t]["perplexity"]
                row.update(predicted_weights_kld=o["predicted_weights_kld"], predicted_kld=o["predicted_kld"],
                           weight_bytes=sum(v["fit"]["weight_bytes_by_dtype"].values()),
                           measured_kld=k["kld"]["mean"], measured_kld_unc=k["kld"]["unc"], ppl=k["ppl"],
                           same_top=k["kld"]["same_top"],
                           measured_kld_f16_cache=v["kv_cache"]["f16"]["perplexity"]["kld"]["mean"],
                           same_mix_as_auto=([m["type"] for m in mine] == auto_types) if row["chosen"] else None)
            rows.append(row)
    for point in points:  # the measured best among the fixed choices, and whether auto took it
        fixed = [r for r in rows if r["point"] == point and "measured_kld" in r]
        best = min(fixed, key=lambda r: r["measured_kld"])
        points[point]["measured_best"] = best["kv"]
        points[point]["auto_chose"] = next(r["kv"] for r in rows if r["point"] == point and r["chosen"])
    data = {"model": args.model, "gpu": args.gpu, "chunks": args.chunks, "points": points,
            "rows": rows, "protocol": results["protocol"], "versions": versions()}
    results_dir = ROOT / "bench" / "results"
    (results_dir / "kv_choice.json").write_text(json.dumps(data, indent=1))
    lines = [f"# The KV cache type chosen with the mix: {args.model} on {args.gpu}", "",
             "`python bench/kv_choice.py` (protocol in its docstring). Per operating point (a batch of sequences), "
             "each cache type fixed (the budgeted mix of the bytes it leaves) and `kv_dtype: auto`. Measured: the "
             f"variant on llama.cpp with its own cache type, flash attention on, {args.chunks} × 512 tokens, KLD "
             "against the float32 base; predicted: the mix's sum over tensors plus the cache's own KLD on 1024 "
             "calibration tokens.", "",
             "| point | batch × context | KV cache | bytes for weights | weights written | predicted weights KLD | cache's own "
             "KLD (calibration) | predicted sum | measured KLD | same top % | PPL | KLD with an f16 cache |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " **(auto)**" if r["chosen"] else ""
        if "measured_kld" not in r:
            lines.append(f"| {r['point']} | {r['batch']} × {r['context']} | {r['kv']}{mark} | {r['weight_budget_bytes']:,} | – | no "
                         f"mix fits | {r['kv_kld_calibration']:.4g} | – | – | – | – | – |")
            continue
        lines.append(f"| {r['point']} | {r['batch']} × {r['context']} | {r['kv']}{mark} | {r['weight_budget_bytes']:,} | "
                     f"{r['weight_bytes']:,} | {r['predicted_weights_kld']:.4g} | {r['kv_kld_calibration']:.4g} | "
                     f"{r['predicted_kld']:.4g} | {r['measured_kld']:.5f} ± {r['measured_kld_unc']:.5f} | "
                     f"{100 * r['same_top']:.2f} | {r['ppl']:.4f} | {r['measured_kld_f16_cache']:.5f} |")
    lines.append("")
    for point, facts in points.items():
        same = next((r["same_mix_as_auto"] for r in rows if r["point"] == point and r["chosen"]), None)
        lines.append(f"- Point {point} ({facts['batch']} sequences × {facts['context']} tokens): auto chose {facts['auto_chose']}; the measured best "
                     f"fixed choice is {facts['measured_best']}"
                     + ("" if same is None else f"; auto's mix {'is' if same else 'is NOT'} the fixed variant's, "
                        "tensor for tensor") + ".")
    (results_dir / "kv_choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
