"""Run a recipe and write its method comparison (quality, build time, build peak RSS, size) to
bench/results/<recipe>.md and .json. Usage: python bench/methods.py recipes/smollm2-gptq.yaml [--force]"""

import json
import sys
from pathlib import Path

from quantize import pipeline
from quantize.fit.vram import gib
from quantize.recipe import load_recipe


def main(recipe_path: str, force: bool) -> None:
    recipe = load_recipe(recipe_path)
    out = pipeline.run(recipe, force=force)
    results = json.loads((out / "results.json").read_text())
    base = results["base"]["perplexity"]
    rows = [f"# {recipe.name}", "", f"Base PPL {base['ppl']:.4f} ± {base['ppl_unc']:.4f}; protocol: "
            + json.dumps(results["protocol"]["perplexity"]), "",
            "| variant | size | bpw | PPL | KLD mean ± | KLD p99 | same top % | pp t/s | tg t/s | build s | build peak RSS |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for name, v in results["variants"].items():
        p, k = v["perplexity"], v["perplexity"]["kld"]
        size = sum(v["fit"]["weight_bytes_by_dtype"].values())
        made = json.loads((out / name / "manifest.json").read_text())["result"]
        bpw = made.get("bits_per_weight")  # measured from the GGUF's tensors; not recorded for other formats
        speed = (v.get("speed") or {}).get("rows") or [{}]
        pp, tg = (speed[0].get(x, {}).get("median") for x in ("pp", "tg"))
        fmt = lambda x, f: "–" if x is None else format(x, f)  # noqa: E731
        rows.append(f"| {name} | {gib(size)} | {fmt(bpw, '.3f')} | {p['ppl']:.4f} ± {p['ppl_unc']:.4f} "
                    f"| {k['mean']:.5f} ± {k['unc']:.5f} | {k['p99']:.4f} | {100 * k['same_top']:.2f} | {fmt(pp, '.1f')} "
                    f"| {fmt(tg, '.1f')} | {v['build_s']:.1f} | {gib(v['build_peak_rss_bytes'])} |")
        summary[name] = {"bytes": size, "bits_per_weight": bpw, "ppl": p["ppl"], "kld": k["mean"], "kld_unc": k["unc"],
                         "same_top": k["same_top"], "pp_median": pp, "tg_median": tg, "threads": speed[0].get("threads"),
                         "tensor_types": made.get("tensor_types"), "loader": v["loader"],
                         "build_s": v["build_s"], "build_peak_rss": v["build_peak_rss_bytes"]}
    dest = Path(__file__).parent / "results"
    dest.mkdir(exist_ok=True)
    (dest / f"{recipe.name}.md").write_text("\n".join(rows) + "\n")
    (dest / f"{recipe.name}.json").write_text(json.dumps({"base_ppl": base["ppl"], "variants": summary}, indent=2))
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1], "--force" in sys.argv)
