"""Crash safety of `quantize run`: a GPTQ run killed with SIGKILL at random moments, each time continued by the same
command, must end with the same artefact bytes as an uninterrupted run.

1. The recipe runs once uninterrupted (the reference): wall time T0 and the sha256 of every artefact file.
2. The same recipe (another output folder, its own cache) is started, killed with SIGKILL after a random delay,
   started again, and so on, --kills times; then it runs to the end. The delays are uniform in
   [--min-delay, T0 / 3] s, seeded: a kill can land anywhere, from the start-up to the last variant. The chain
   gets the reference's converted base model (bundled GGUF → HF), not its cached base evaluation.
3. The final files are compared with the reference, and the time each interruption cost is measured from the
   work folder's file times: the work lost (kill moment − the newest file the killed run had written) plus the
   restart (start of the next run − its first write to the work folder).

    python bench/resume_check.py [--kills 10] [--seed 0]   → bench/results/resume_check.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = {
    "name": "resume",
    "model": "bundled:smollm2-135m",
    "method": {"name": "gptq", "bits": 4, "group_size": 64, "sym": False},
    "calibration": {"source": "bundled:wiki", "samples": 32, "seq_len": 512, "seed": 0},
    "eval": {"perplexity": {"source": "bundled:wiki", "n_ctx": 512, "max_chunks": 4}, "speed": {"enabled": False}},
    "fit": {"gpus": ["RTX 4090"], "contexts": [4096]},
}


def newest_write(folder: Path) -> float:
    times = [p.stat().st_mtime for p in folder.rglob("*") if p.is_file()]
    return max(times, default=0.0)


def run(tmp: Path, name: str, kill_after: float | None = None) -> dict:
    """One `quantize run` of the recipe into tmp/name; killed after kill_after seconds when given."""
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "output": str(tmp / name)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QUANTIZE_CACHE": str(tmp / f"cache-{name}")}
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "quantize.cli", "run", str(recipe)], cwd=tmp, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=kill_after)
        killed = None
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.time()
    stderr = proc.stderr.read()
    if killed is None and proc.returncode != 0:
        raise SystemExit(f"run {name} failed with exit code {proc.returncode}:\n{stderr[-3000:]}")
    return {"start": start, "end": time.time(), "killed_at": killed, "rc": proc.returncode,
            "stage": [line for line in stderr.splitlines() if line.startswith("›")][-1:]}


def files(out: Path) -> dict:
    manifest = json.loads(next(out.glob("*/manifest.json")).read_text())
    return {name: f["sha256"] for name, f in manifest["files"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-delay", type=float, default=3.0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference = run(tmp, "reference")
        assert reference["rc"] == 0, reference
        t0 = reference["end"] - reference["start"]
        print(f"uninterrupted: {t0:.1f} s")
        # the chain starts with the bundled model already converted (as any second run on this machine would), but
        # with no cached base evaluation: kills land in start-up, base evaluation, GPTQ layers and evaluation
        shutil.copytree(tmp / "cache-reference" / "models", tmp / "cache-chain" / "models")
        segments, lost = [], []
        for k in range(args.kills):
            delay = rng.uniform(args.min_delay, t0 / 3)
            work = next(iter(tmp.glob(".chain.work-*")), None)
            seg = run(tmp, "chain", kill_after=delay)
            work = next(iter(tmp.glob(".chain.work-*")), work)
            seg["delay"] = delay
            seg["newest_write_before_kill"] = newest_write(work) if work is not None and work.exists() else None
            segments.append(seg)
            print(f"kill {k + 1}: after {delay:.1f} s, rc {seg['rc']}, last step {seg['stage']}")
            if seg["killed_at"] is None:
                print("the run finished before the kill")
                break
        if segments[-1]["killed_at"] is not None:
            final = run(tmp, "chain")
            segments.append(final)
            assert final["rc"] == 0, final
        # cost of each interruption: work lost since the last write + the restart until the next first write
        for seg, nxt in zip(segments, segments[1:]):
            if seg["killed_at"] is None:
                continue
            work_lost = seg["killed_at"] - seg["newest_write_before_kill"] if seg["newest_write_before_kill"] else \
                seg["killed_at"] - seg["start"]
            seg["work_lost_s"] = max(0.0, work_lost)
            lost.append(seg["work_lost_s"])
        chain_total = sum(s["end"] - s["start"] for s in segments)
        same = files(tmp / "reference") == files(tmp / "chain")
        result = {
            "recipe": RECIPE, "kills": sum(1 for s in segments if s["killed_at"]), "uninterrupted_s": t0,
            "chain_total_s": chain_total, "overhead_s": chain_total - t0,
            "overhead_per_interruption_s": (chain_total - t0) / max(1, len(lost)),
            "work_lost_median_s": statistics.median(lost) if lost else None,
            "identical": same, "reference_files": files(tmp / "reference"), "chain_files": files(tmp / "chain"),
            "segments": [{k: v for k, v in s.items() if k in ("delay", "rc", "stage", "work_lost_s")}
                         for s in segments],
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resume_check.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Resume after SIGKILL (bench/resume_check.py)", "",
             f"Recipe: bundled SmolLM2-135M-Instruct, GPTQ W4 asym g64, calibration 32 × 512, evaluation 4 × 512 "
             f"tokens, on this 2-core CPU. Seed {args.seed}.", "",
             f"- uninterrupted run: {t0:.1f} s",
             f"- {result['kills']} kills with SIGKILL at random moments, each followed by the same command: "
             f"{chain_total:.1f} s in all, {result['overhead_s']:.1f} s more than uninterrupted "
             f"({result['overhead_per_interruption_s']:.1f} s per interruption: the restart and the work redone)",
             f"- work lost per interruption (kill moment − the killed run's last write), median: "
             f"{result['work_lost_median_s']:.1f} s",
             f"- final artefact identical to the uninterrupted run's, file by file: **{same}**", "",
             "| # | killed after s | last step before the kill | work lost s |", "|---|---|---|---|"]
    for k, s in enumerate(result["segments"], 1):
        lines.append(f"| {k} | {s.get('delay', float('nan')):.1f} | {' '.join(s['stage'])} | "
                     f"{s.get('work_lost_s', float('nan')):.1f} |")
    lines += ["", "| file | sha256 (both runs) |", "|---|---|"]
    lines += [f"| {n} | `{h[:16]}…` |" for n, h in result["reference_files"].items()]
    (RESULTS / "resume_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))


if __name__ == "__main__":
    main()
