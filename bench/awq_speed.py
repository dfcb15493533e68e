"""AWQ's build time against GPTQ's on the same model and calibration, and what judging the scale search on fewer
calibration sequences (`search_samples`) costs in quality.

    python bench/awq_speed.py [--search 1 2 4 8] [--repeats 3] [--chunks 12]
        → bench/results/awq_speed.{md,json}
    python bench/awq_speed.py --times-only [--repeats 3]
        → bench/results/awq_speed_times.{md,json} (part 2 alone)

1. Quality: one `quantize run` of SmolLM2-135M with GPTQ, AWQ with the full search, and AWQ with each
   `search_samples` value, W4 asym g64 (bench/results/smollm2-awq.md's recipe), calibration 32 × 512 tokens of
   bundled:wiki/calibration (seed 0), KLD/PPL on `--chunks` × 512 tokens of bundled:wiki/eval against the float32
   base; each AWQ subset's KLD paired with the full search's (the same positions).
2. Time: GPTQ and AWQ at the default `search_samples`, each build alone in a fresh process (`--time-one`),
   alternated `--repeats` times; medians (min, max) and the ratio of the medians. Build = the method's own
   `build` (streamed calibration, the solve, writing the artefact), not the evaluation.
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


def recipe(search: list[int], chunks: int, out: Path, full: bool = False) -> dict:
    methods = [GPTQ] + ([{**AWQ, "search_samples": None, "variant": "awq-w4-asym-g64-full"}] if full else [])
    methods += [{**AWQ, "search_samples": k, "variant": f"awq-w4-asym-g64-search{k}"} for k in search]
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

    r = Recipe.model_validate({**recipe([], 1, Path(tempfile.mkdtemp())), "methods": [method]})
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


def times_only(repeats: int) -> None:
    """GPTQ and AWQ (default search_samples) builds alternated, each in a fresh process; medians and their ratio,
    with the machine's facts (the forward dtype each build chose is in its own artefact; `auto` picks bfloat16 on a
    CPU with AVX512-BF16)."""
    import platform

    from quantize.common.files import versions

    times = {"gptq": [], "awq": []}
    for _ in range(repeats):
        times["gptq"].append(timed(GPTQ))
        times["awq"].append(timed(AWQ))
    med = {k: statistics.median(v) for k, v in times.items()}
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    out = {"protocol": {"model": "bundled:smollm2-135m", "methods": [GPTQ, AWQ], "calibration": CALIB,
                        "threads": torch_threads(), "cpu": platform.processor() or platform.machine(), "isa": isa,
                        "versions": versions()},
           "times_s": times, "median_s": med, "awq_over_gptq": med["awq"] / med["gptq"]}
    dest = ROOT / "bench" / "results"
    (dest / "awq_speed_times.json").write_text(json.dumps(out, indent=1))
    fmt = lambda v: f"{statistics.median(v):.1f} s (min {min(v):.1f}, max {max(v):.1f})"  # noqa: E731
    lines = ["# AWQ's build time against GPTQ's", "",
             f"`python bench/awq_speed.py --times-only --repeats {repeats}`: SmolLM2-135M W4 asym g64, calibration "
             f"{CALIB['samples']} × {CALIB['seq_len']} tokens of {CALIB['source']}, each build alone in a fresh "
             f"process (the method's own build: streamed calibration, the solve, writing the artefact), alternated; "
             f"{out['protocol']['threads']} threads, CPU flags {', '.join(isa)}.", "",
             f"GPTQ {fmt(times['gptq'])}; AWQ (default search_samples) {fmt(times['awq'])}; ratio of medians "
             f"AWQ / GPTQ {out['awq_over_gptq']:.2f}.", ""]
    (dest / "awq_speed_times.md").write_text("\n".join(lines))
    print("\n".join(lines))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--search", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--full", action="store_true", help="also AWQ with the full search in this run (about 20 min "
                    "on 2 cores); without it the table quotes bench/results/smollm2-awq.json's, same protocol")
    ap.add_argument("--output", type=Path, default=ROOT / "outputs" / "bench-awq-speed")
    ap.add_argument("--times-only", action="store_true", help="only the alternated build timings (no quality "
                    "run): bench/results/awq_speed_times.{json,md}")
    ap.add_argument("--time-one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_one:
        return time_one(json.loads(args.time_one))
    if args.times_only:
        return times_only(args.repeats)

    from quantize.methods.configs import AwqMethod

    default = AwqMethod(**AWQ).search_samples
    path = args.output.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe(args.search, args.chunks, args.output, args.full), sort_keys=False))
    if not (args.output / "report.md").is_file():
        subprocess.run([sys.executable, "-m", "quantize.cli", "run", str(path)], check=True, cwd=ROOT)
    results = json.loads((args.output / "results.json").read_text())
    variants, paired = results["variants"], results["paired_kld"]
    full = "awq-w4-asym-g64-full"
    rows = []
    for name, v in variants.items():
        k = v["perplexity"]["kld"]
        d = paired.get(f"{full} − {name}")
        rows.append({"variant": name, "kld": k["mean"], "kld_unc": k["unc"], "ppl": v["perplexity"]["ppl"],
                     "same_top": k["same_top"], "build_s": v["build_s"],
                     "kld_minus_full": None if d is None else -d["difference"],
                     "kld_minus_full_unc": None if d is None else d["unc"]})

    awq_timed = {**AWQ, **({"search_samples": default} if default else {})}
    times = {"gptq": [], "awq": []}
    for _ in range(args.repeats):  # alternated, each build in a fresh process
        times["gptq"].append(timed(GPTQ))
        times["awq"].append(timed(awq_timed))
    med = {k: statistics.median(v) for k, v in times.items()} if args.repeats else {}
    out = {"protocol": results["protocol"], "calibration": CALIB, "rows": rows, "default_search_samples": default,
           "times_s": times, "median_s": med, "awq_over_gptq": med["awq"] / med["gptq"] if med else None}
    dest = ROOT / "bench" / "results"
    (dest / "awq_speed.json").write_text(json.dumps(out, indent=1))
    p = results["protocol"]["perplexity"]
    lines = ["# AWQ's scale search on fewer sequences, and AWQ's build time against GPTQ's", "",
             f"`python bench/awq_speed.py` (protocol in its docstring). SmolLM2-135M, W4 asym g64, calibration "
             f"32 × 512 tokens; KLD on {p['chunks']} × {p['n_ctx']} tokens of {p['text']['source']} against the "
             "float32 base, ± standard error; Δ vs full: the paired difference of per-position KLD against AWQ with "
             "the full search, ± its standard error. Build s: the build inside that one run, one variant after "
             "another: a record, not a timing (in the committed run a second benchmark shared the two cores during "
             "all but the last variant); the alternated builds below are the timing.", "",
             "| variant | KLD | Δ vs full search | PPL | same top % | build s (one run) |", "|---|---|---|---|---|---|"]
    for r in rows:
        delta = "–" if r["kld_minus_full"] is None else f"{r['kld_minus_full']:+.5f} ± {r['kld_minus_full_unc']:.5f}"
        lines.append(f"| {r['variant']} | {r['kld']:.5f} ± {r['kld_unc']:.5f} | {delta} | {r['ppl']:.4f} | "
                     f"{100 * r['same_top']:.2f} | {r['build_s']:.1f} |")
    fmt = lambda v: f"{statistics.median(v):.1f} s (min {min(v):.1f}, max {max(v):.1f})"  # noqa: E731
    earlier = ROOT / "bench" / "results" / "smollm2-awq.json"
    if full not in variants and earlier.is_file() and args.chunks == 32:
        e = json.loads(earlier.read_text())["variants"]["awq-w4-asym-g64"]
        lines += ["", f"AWQ with the full search (every sequence judges each α), from bench/results/smollm2-awq.json: "
                  f"the same recipe, calibration and evaluation text, an earlier run (not paired with these "
                  f"positions): KLD {e['kld']:.5f} ± {e['kld_unc']:.5f}, PPL {e['ppl']:.4f}, same top "
                  f"{100 * e['same_top']:.2f} %, build {e['build_s']:.1f} s, by an earlier code (its sums over "
                  "tokens in float32, now float64: a few choices may differ)."]
        out["full_search_earlier"] = e
        (dest / "awq_speed.json").write_text(json.dumps(out, indent=1))
    if args.repeats:
        lines += ["", f"Build alone in a fresh process, alternated, {args.repeats} runs each: GPTQ {fmt(times['gptq'])}; "
                  f"AWQ (default search_samples = {default}) {fmt(times['awq'])}; ratio of medians AWQ / GPTQ "
                  f"{out['awq_over_gptq']:.2f}."]
    lines.append("")
    (dest / "awq_speed.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
