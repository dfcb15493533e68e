"""AWQ's build time against GPTQ's, and what each of AWQ's speed settings costs in quality.

    python bench/awq_speed.py [--repeats 3] [--chunks 32] [--full]
        → bench/results/awq_speed.{md,json}
    python bench/awq_speed.py --times-only [--repeats 3]
        → bench/results/awq_speed_times.{md,json} (part 2 alone)

1. Quality: one `quantize run` of SmolLM2-135M, W4 asym g64 (bench/results/smollm2-awq.md's recipe), calibration
   32 × 512 tokens of bundled:wiki/calibration (seed 0), KLD/PPL on `--chunks` × 512 tokens of bundled:wiki/eval
   against the float32 base, with GPTQ and these AWQ variants (VARIANTS): the whole α grid (coarse_grid 1, the
   default until coarse_grid), the default, `propagate: full-precision`, and `search_samples: 4`; `--full` adds the
   search of AutoAWQ and llm-compressor (every α on every sequence, about 20 min on 2 cores). Each AWQ variant's KLD
   is paired with the whole grid's (the same positions).
2. Time: GPTQ and the AWQ variants of TIMED, each build alone in a fresh process (`--time-one`), alternated
   `--repeats` times; medians (min, max) and the ratios of the medians to GPTQ's. Build = the method's own `build`
   (streamed calibration, the search or solve, writing the artefact), not the evaluation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CALIB = {"source": "bundled:wiki", "samples": 32, "seq_len": 512, "seed": 0}
GPTQ = {"name": "gptq", "bits": 4, "group_size": 64, "sym": False}
AWQ = {"name": "awq", "bits": 4, "group_size": 64, "sym": False}
WHOLE_GRID = "awq-w4-asym-g64-coarse1"
VARIANTS = {  # variant name (the method's own default_variant) → the AWQ options
    WHOLE_GRID: {"coarse_grid": 1},
    "awq-w4-asym-g64": {},
    "awq-w4-asym-g64-fp-propagate": {"propagate": "full-precision"},
    "awq-w4-asym-g64-search4": {"search_samples": 4},
}
TIMED = [WHOLE_GRID, "awq-w4-asym-g64", "awq-w4-asym-g64-fp-propagate"]


def recipe(chunks: int, out: Path, full: bool = False) -> dict:
    methods = [GPTQ] + [{**AWQ, **options} for options in VARIANTS.values()]
    if full:
        methods.append({**AWQ, "search_samples": None, "coarse_grid": 1})
    return {"name": "awq-speed", "model": "bundled:smollm2-135m", "methods": methods, "calibration": CALIB,
            "eval": {"perplexity": {"source": "bundled:wiki", "n_ctx": 512, "max_chunks": chunks},
                     "speed": {"enabled": False}, "serve": {"enabled": False}},
            "fit": {"gpus": ["RTX 3060"], "contexts": [4096]}, "output": str(out)}


def time_one(method: dict) -> None:
    """Build one method on the recipe's calibration in this process; print its seconds as JSON."""
    from quantize import pipeline
    from quantize.methods.registry import METHODS
    from quantize.recipe import Recipe
    from quantize.sources.models import load_tokenizer, resolve_model

    r = Recipe.model_validate({**recipe(1, Path(tempfile.mkdtemp())), "methods": [method]})
    base = resolve_model(r.model)
    calib, info = pipeline._calibration(r, load_tokenizer(base.path))
    out = Path(tempfile.mkdtemp(prefix="awq-speed-"))
    try:
        start = time.perf_counter()
        METHODS[method["name"]].build(r.methods[0], base, out, calib, info)
        print(json.dumps({"seconds": time.perf_counter() - start}))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def timed(method: dict) -> float:
    done = subprocess.run([sys.executable, __file__, "--time-one", json.dumps(method)], cwd=ROOT, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def timed_methods() -> dict[str, dict]:
    return {"gptq": GPTQ, **{name: {**AWQ, **VARIANTS[name]} for name in TIMED}}


def alternated(repeats: int) -> dict[str, list[float]]:
    """Each method of timed_methods built alone in a fresh process, in turn, `repeats` times."""
    methods = timed_methods()
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            times[name].append(timed(method))
            print(json.dumps({name: times[name][-1]}), flush=True)
    return times


def machine() -> dict:
    import platform

    from quantize.common.files import versions

    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return {"threads": torch_threads(), "cpu": platform.processor() or platform.machine(), "isa": isa,
            "versions": versions()}


def time_lines(times: dict[str, list[float]], repeats: int, facts: dict) -> tuple[list[str], dict]:
    med = {k: statistics.median(v) for k, v in times.items()}
    fmt = lambda v: f"{statistics.median(v):.1f} s (min {min(v):.1f}, max {max(v):.1f})"  # noqa: E731
    lines = [f"Each build alone in a fresh process (the method's own build: streamed calibration, the search or "
             f"solve, writing the artefact), alternated, {repeats} runs each; SmolLM2-135M W4 asym g64, calibration "
             f"{CALIB['samples']} × {CALIB['seq_len']} tokens of {CALIB['source']}; {facts['threads']} threads, CPU "
             f"flags {', '.join(facts['isa'])}.", "", "| build | median (min, max) | / GPTQ |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(v)} | {med[name] / med['gptq']:.2f} |" for name, v in times.items()]
    return lines, {k: med[k] / med["gptq"] for k in med}


def times_only(repeats: int) -> None:
    times = alternated(repeats)
    facts = machine()
    lines, ratios = time_lines(times, repeats, facts)
    out = {"protocol": {"model": "bundled:smollm2-135m", "methods": timed_methods(), "calibration": CALIB, **facts},
           "times_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()}, "over_gptq": ratios}
    dest = ROOT / "bench" / "results"
    (dest / "awq_speed_times.json").write_text(json.dumps(out, indent=1))
    lines = ["# AWQ's build time against GPTQ's", "", f"`python bench/awq_speed.py --times-only --repeats {repeats}`.",
             ""] + lines + [""]
    (dest / "awq_speed_times.md").write_text("\n".join(lines))
    print("\n".join(lines))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--full", action="store_true", help="also AWQ with every α judged on every sequence (AutoAWQ's "
                    "and llm-compressor's search; about 20 min on 2 cores)")
    ap.add_argument("--output", type=Path, default=ROOT / "outputs" / "bench-awq-speed")
    ap.add_argument("--times-only", action="store_true", help="only the alternated build timings (no quality "
                    "run): bench/results/awq_speed_times.{json,md}")
    ap.add_argument("--time-one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_one:
        return time_one(json.loads(args.time_one))
    if args.times_only:
        return times_only(args.repeats)

    path = args.output.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe(args.chunks, args.output, args.full), sort_keys=False))
    if not (args.output / "report.md").is_file():
        subprocess.run([sys.executable, "-m", "quantize.cli", "run", str(path)], check=True, cwd=ROOT)
    results = json.loads((args.output / "results.json").read_text())
    variants, paired = results["variants"], results["paired_kld"]
    rows = []
    for name, v in variants.items():
        k = v["perplexity"]["kld"]
        d = paired.get(f"{WHOLE_GRID} − {name}")
        rows.append({"variant": name, "kld": k["mean"], "kld_unc": k["unc"], "ppl": v["perplexity"]["ppl"],
                     "same_top": k["same_top"], "build_s": v["build_s"],
                     "kld_minus_whole_grid": None if d is None else -d["difference"],
                     "kld_minus_whole_grid_unc": None if d is None else d["unc"]})
    times = alternated(args.repeats) if args.repeats else {}
    facts = machine()
    out = {"protocol": {**results["protocol"], **facts}, "calibration": CALIB, "variants": VARIANTS, "rows": rows,
           "times_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()}}
    p = results["protocol"]["perplexity"]
    lines = ["# AWQ's speed settings: quality and build time against GPTQ's", "",
             f"`python bench/awq_speed.py{' --full' if args.full else ''}` (protocol in its docstring). SmolLM2-135M, "
             f"W4 asym g64, calibration 32 × 512 tokens; KLD on {p['chunks']} × {p['n_ctx']} tokens of "
             f"{p['text']['source']} against the float32 base, ± standard error; Δ vs whole grid: the paired "
             "difference of per-position KLD against AWQ judging every α (coarse_grid 1; search_samples 8 in both), "
             "± its standard error. Build s (one run): the build inside that run, one variant after another, "
             "nothing else running: a record; the alternated builds below are the timing.", "",
             "| variant | KLD | Δ vs whole grid | PPL | same top % | build s (one run) |", "|---|---|---|---|---|---|"]
    for r in rows:
        delta = "–" if r["kld_minus_whole_grid"] is None else \
            f"{r['kld_minus_whole_grid']:+.5f} ± {r['kld_minus_whole_grid_unc']:.5f}"
        lines.append(f"| {r['variant']} | {r['kld']:.5f} ± {r['kld_unc']:.5f} | {delta} | {r['ppl']:.4f} | "
                     f"{100 * r['same_top']:.2f} | {r['build_s']:.1f} |")
    if times:
        tl, ratios = time_lines(times, args.repeats, facts)
        out["over_gptq"] = ratios
        lines += [""] + tl
    lines.append("")
    dest = ROOT / "bench" / "results"
    (dest / "awq_speed.json").write_text(json.dumps(out, indent=1))
    (dest / "awq_speed.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
