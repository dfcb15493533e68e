"""AWQ's build time against GPTQ's, and what each of AWQ's speed settings costs in quality.

    python bench/awq_speed.py [--repeats 3] [--chunks 32] [--full] [--before DIR]
        → bench/results/awq_speed.{md,json}
    python bench/awq_speed.py --times-only [--repeats 3]
        → bench/results/awq_speed_times.{md,json} (part 2 alone)

1. Quality: one `quantize run` of SmolLM2-135M, W4 asym g64 (bench/results/smollm2-awq.md's recipe), calibration
   32 × 512 tokens of bundled:wiki/calibration (seed 0), KLD/PPL on `--chunks` × 512 tokens of bundled:wiki/eval
   against the float32 base, with GPTQ and these AWQ variants (VARIANTS): the reference search (every α of the
   grid, coarse_grid 1, and every token for the blocks that treat each token alone, search_tokens null), the
   default, search_tokens 1024 and null, `propagate: full-precision`, and `search_samples: 4`; `--full` adds the
   search of AutoAWQ and llm-compressor (every α on every sequence, about 20 min on 2 cores). Each AWQ variant's KLD
   is paired with the reference's (the same positions).
2. Time: GPTQ and the AWQ variants of TIMED, each build alone in a fresh process (`--time-one`), alternated
   `--repeats` times; medians (min, max) and the ratios of the medians to GPTQ's. Build = the method's own `build`
   (streamed calibration, the search or solve, writing the artefact), not the evaluation. `--before DIR` (a
   checkout of an earlier commit, e.g. a git worktree) also times that checkout's default AWQ in the same rounds.
3. With `--before DIR`, that checkout's default AWQ is also built and evaluated by its own `quantize run` on the
   same protocol (outputs/bench-awq-speed-before) and its per-position KLD paired with this default's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
CALIB = {"source": "bundled:wiki", "samples": 32, "seq_len": 512, "seed": 0}
GPTQ = {"name": "gptq", "bits": 4, "group_size": 64, "sym": False}
AWQ = {"name": "awq", "bits": 4, "group_size": 64, "sym": False}
REFERENCE = "awq-w4-asym-g64-tokensall-coarse1"  # the reference search: every α, every token of per-token blocks
VARIANTS = {  # variant name (the method's own default_variant) → the AWQ options
    REFERENCE: {"coarse_grid": 1, "search_tokens": None},
    "awq-w4-asym-g64": {},
    "awq-w4-asym-g64-tokens1024": {"search_tokens": 1024},
    "awq-w4-asym-g64-tokensall": {"search_tokens": None},
    "awq-w4-asym-g64-fp-propagate": {"propagate": "full-precision"},
    "awq-w4-asym-g64-search4": {"search_samples": 4},
}
TIMED = ["awq-w4-asym-g64", "awq-w4-asym-g64-tokensall", "awq-w4-asym-g64-fp-propagate"]


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


def timed(method: dict, tree: Path = ROOT) -> float:
    """Seconds of one build in a fresh process, from the checkout `tree` (this one, or --before's)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, str(tree / "bench" / "awq_speed.py"), "--time-one", json.dumps(method)],
                          cwd=tree, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def timed_methods(before: Path | None = None, names: list[str] = TIMED) -> dict[str, tuple[dict, Path]]:
    methods = {"gptq": (GPTQ, ROOT), **{name: ({**AWQ, **VARIANTS[name]}, ROOT) for name in names}}
    if before is not None:
        methods[f"awq-w4-asym-g64 @ {commit(before)}"] = (AWQ, before)
    return methods


def commit(tree: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                          check=True).stdout.strip()


def alternated(repeats: int, before: Path | None = None, names: list[str] = TIMED) -> dict[str, list[float]]:
    """Each method of timed_methods built alone in a fresh process, in turn, `repeats` times."""
    methods = timed_methods(before, names)
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, (method, tree) in methods.items():
            times[name].append(timed(method, tree))
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


def times_only(repeats: int, before: Path | None, names: list[str]) -> None:
    times = alternated(repeats, before, names)
    facts = machine()
    lines, ratios = time_lines(times, repeats, facts)
    methods = {name: method for name, (method, _) in timed_methods(before, names).items()}
    out = {"protocol": {"model": "bundled:smollm2-135m", "methods": methods, "calibration": CALIB, **facts},
           "times_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()}, "over_gptq": ratios}
    dest = ROOT / "bench" / "results"
    (dest / "awq_speed_times.json").write_text(json.dumps(out, indent=1))
    command = f"python bench/awq_speed.py --times-only --repeats {repeats}" + \
        (f" --timed {' '.join(names)}" if names != TIMED else "") + (" --before DIR" if before else "")
    lines = ["# AWQ's build time against GPTQ's", "", f"`{command}`.", ""] + lines + [""]
    (dest / "awq_speed_times.md").write_text("\n".join(lines))
    print("\n".join(lines))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def before_quality(before: Path, chunks: int, output: Path) -> dict:
    """The default AWQ of the checkout `before`, built and evaluated by that checkout's own `quantize run` on this
    protocol; its KLD, and the paired difference of this run's default against it (the same positions)."""
    from quantize.measure.quality import paired_difference

    out = output.with_name(output.name + "-before")
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump({**recipe(chunks, out), "methods": [AWQ]}, sort_keys=False))
    if not (out / "report.md").is_file():
        subprocess.run([sys.executable, "-m", "quantize.cli", "run", str(path)], check=True, cwd=before,
                       env={**os.environ, "PYTHONPATH": str(before)})
    name = "awq-w4-asym-g64"
    then, now = (np.load(d / "kld-positions" / f"{name}.npy") for d in (out, output))
    k = json.loads((out / "results.json").read_text())["variants"][name]["perplexity"]
    return {"commit": commit(before), "kld": k["kld"]["mean"], "kld_unc": k["kld"]["unc"], "ppl": k["ppl"],
            "now_minus_before": paired_difference(now, then)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--full", action="store_true", help="also AWQ with every α judged on every sequence (AutoAWQ's "
                    "and llm-compressor's search; about 20 min on 2 cores)")
    ap.add_argument("--output", type=Path, default=ROOT / "outputs" / "bench-awq-speed")
    ap.add_argument("--times-only", action="store_true", help="only the alternated build timings (no quality "
                    "run): bench/results/awq_speed_times.{json,md}")
    ap.add_argument("--before", type=Path, help="a checkout of an earlier commit: its default AWQ timed alongside")
    ap.add_argument("--timed", nargs="+", choices=list(VARIANTS), default=TIMED,
                    help="the AWQ variants timed against GPTQ (default: %(default)s)")
    ap.add_argument("--time-one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_one:
        return time_one(json.loads(args.time_one))
    if args.times_only:
        return times_only(args.repeats, args.before, args.timed)

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
        d = paired.get(f"{REFERENCE} − {name}")
        rows.append({"variant": name, "kld": k["mean"], "kld_unc": k["unc"], "ppl": v["perplexity"]["ppl"],
                     "same_top": k["same_top"], "build_s": v["build_s"],
                     "kld_minus_whole_grid": None if d is None else -d["difference"],
                     "kld_minus_whole_grid_unc": None if d is None else d["unc"]})
    before = before_quality(args.before, args.chunks, args.output) if args.before else None
    times = alternated(args.repeats, args.before, args.timed) if args.repeats else {}
    facts = machine()
    out = {"protocol": {**results["protocol"], **facts}, "calibration": CALIB, "variants": VARIANTS, "rows": rows,
           "before": before, "times_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()}}
    p = results["protocol"]["perplexity"]
    lines = ["# AWQ's speed settings: quality and build time against GPTQ's", "",
             f"`python bench/awq_speed.py{' --full' if args.full else ''}` (protocol in its docstring). SmolLM2-135M, "
             f"W4 asym g64, calibration 32 × 512 tokens; KLD on {p['chunks']} × {p['n_ctx']} tokens of "
             f"{p['text']['source']} against the float32 base, ± standard error; Δ vs reference: the paired "
             "difference of per-position KLD against the reference search (every α, coarse_grid 1; every token for "
             "the blocks that treat each token alone, search_tokens null; search_samples 8), ± its standard error. "
             "Build s (one run): the build inside that run, one variant after another, "
             "nothing else running: a record; the alternated builds below are the timing.", "",
             "| variant | KLD | Δ vs reference | PPL | same top % | build s (one run) |", "|---|---|---|---|---|---|"]
    for r in rows:
        delta = "–" if r["kld_minus_whole_grid"] is None else \
            f"{r['kld_minus_whole_grid']:+.5f} ± {r['kld_minus_whole_grid_unc']:.5f}"
        lines.append(f"| {r['variant']} | {r['kld']:.5f} ± {r['kld_unc']:.5f} | {delta} | {r['ppl']:.4f} | "
                     f"{100 * r['same_top']:.2f} | {r['build_s']:.1f} |")
    if before:
        d = before["now_minus_before"]
        lines += ["", f"The default before (commit {before['commit']}, its own `quantize run` on this protocol): KLD "
                  f"{before['kld']:.5f} ± {before['kld_unc']:.5f}, PPL {before['ppl']:.4f}; this default − that one, "
                  f"paired per position: {d['difference']:+.5f} ± {d['unc']:.5f}."]
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
