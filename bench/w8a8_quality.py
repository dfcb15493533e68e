"""W8A8 and FP8 against the weight-only schemes on a real model, one evaluation protocol for all (issue 32 §3):

    W8A16 (int8 RTN) · W8A8-INT8 (SmoothQuant α + GPTQ; α = none, 0.5, 0.65, 0.8, 0.9) · W8A8 RTN without
    smoothing · FP8 dynamic · FP8 block (where every linear is whole 128 × 128 blocks) · FP8 W8A16 · NVFP4A16 · MXFP4A16 ·
    W4A16 GPTQ g128 (per channel where the input is not a multiple of 128) and g64

each built from the same calibration draw (seed 0) and scored with its engine's activation rounding (our kernel
reference, runtimes/kernels.py) against one base store: KLD mean, same-top, PPL, size. The default α is run on
`--seeds` calibration draws (median reported). With `--ref-python` (an environment with llm-compressor 0.14, see
bench/reference_llmcompressor.py) llm-compressor's W8A8 recipe (SmoothQuantModifier(0.8) + GPTQModifier W8A8)
runs on the same draws and is scored the same way.

Usage: python bench/w8a8_quality.py [--model bundled:smollm2-135m] [--samples 32] [--seq-len 512] [--chunks 16]
       [--seeds 3] [--ref-python /tmp/refenv/bin/python]
Writes bench/results/w8a8_quality_<model>.{json,md}.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from quantize.formats.tensors import weight_bytes_safetensors
from quantize.measure import scorecard
from quantize.methods.configs import CONFIGS
from quantize.methods.fp8 import check_blocks
from quantize.methods.registry import METHODS
from quantize.recipe import Eval
from quantize.common.errors import QuantizeError
from quantize.sources.models import load_tokenizer, meta_model, resolve_model, tokenizer_adds_bos
from quantize.sources.texts import bundled_wiki, calibration_batches

HERE = Path(__file__).resolve().parent

VARIANTS = {  # name → method settings (built on the seed-0 draw; the α = 0.8 row on every seed)
    "int8-w8a16": {"name": "int8", "scheme": "w8a16"},
    "int8-w8a8 (α 0.8)": {"name": "int8", "scheme": "w8a8"},
    "int8-w8a8 (α 0.9)": {"name": "int8", "scheme": "w8a8", "smoothing_strength": 0.9},
    "int8-w8a8 (α 0.65)": {"name": "int8", "scheme": "w8a8", "smoothing_strength": 0.65},
    "int8-w8a8 (α 0.5)": {"name": "int8", "scheme": "w8a8", "smoothing_strength": 0.5},
    "int8-w8a8 (no smoothing)": {"name": "int8", "scheme": "w8a8", "smoothing_strength": None},
    "int8-w8a8 rtn (no smoothing)": {"name": "int8", "scheme": "w8a8", "weights": "rtn", "smoothing_strength": None},
    "fp8-dynamic": {"name": "fp8", "scheme": "dynamic"},
    "fp8-block": {"name": "fp8", "scheme": "block"},
    "fp8-w8a16": {"name": "fp8", "scheme": "w8a16"},
    "fp4-nvfp4a16": {"name": "fp4", "scheme": "nvfp4a16"},
    "fp4-mxfp4a16": {"name": "fp4", "scheme": "mxfp4a16"},
    "gptq-w4a16-g128": {"name": "gptq", "bits": 4, "group_size": 128, "sym": True, "on_indivisible": "channel"},
    "gptq-w4a16-g64": {"name": "gptq", "bits": 4, "group_size": 64, "sym": True},
}
DEFAULT = "int8-w8a8 (α 0.8)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bundled:smollm2-135m")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ref-python")
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all; none: only the reference)")
    args = ap.parse_args()

    base = resolve_model(args.model)
    tok = load_tokenizer(base.path)
    text_ids = tok(bundled_wiki("calibration").text, return_tensors="pt").input_ids[0]
    bos = tok.bos_token_id if tokenizer_adds_bos(tok) else None
    draws = {seed: calibration_batches(text_ids, args.samples, args.seq_len, seed, bos) for seed in range(args.seeds)}
    ev = Eval.model_validate({"perplexity": {"source": "bundled:wiki", "n_ctx": 512, "max_chunks": args.chunks},
                              "speed": {"enabled": False}, "serve": {"enabled": False}})
    meta = meta_model(base.path)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="w8a8-bench-"))

    def score(name: str, folder: Path, seconds: float, seed: int | None, tool: str) -> None:
        r = scorecard.evaluate_artefact(folder, args.model, ev)
        p = r["perplexity"]
        rows.append({"variant": name, "tool": tool, "seed": seed, "build_seconds": round(seconds, 1),
                     "bytes": sum(weight_bytes_safetensors(folder).values()), "ppl": p["ppl"],
                     "kld": p["kld"]["mean"], "kld_unc": p["kld"]["unc"],
                     "same_top": p["kld"]["same_top"], "loader": r["loader"]})
        print(json.dumps(rows[-1]), flush=True)

    for name, settings in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        method = CONFIGS[settings["name"]].model_validate(settings)
        if settings["name"] == "fp8":
            try:
                check_blocks(meta, method)
            except QuantizeError as exc:
                rows.append({"variant": name, "skipped": str(exc)})
                continue
        for seed in range(args.seeds) if name == DEFAULT else [0]:
            folder = work / f"{len(rows)}"
            folder.mkdir()
            start = time.perf_counter()
            METHODS[method.name].build(method, base, folder, draws[seed] if method.needs_calibration else None)
            score(name, folder, time.perf_counter() - start, seed if method.needs_calibration else None, "quantize")

    if args.ref_python:  # llm-compressor's W8A8 recipe on the same draws, in its own environment
        for seed, ids in draws.items():
            calib, folder = work / f"calib-{seed}.pt", work / f"llmc-{seed}"
            torch.save(ids, calib)
            start = time.perf_counter()
            subprocess.run([args.ref_python, str(HERE / "reference_llmcompressor.py"), str(base.path), str(calib),
                            str(folder), "--method", "w8a8"], check=True)
            score("int8-w8a8 (α 0.8)", folder, time.perf_counter() - start, seed,
                  json.loads((folder / "bench.json").read_text())["tool"])

    write(args, base, rows)


def write(args, base, rows) -> None:
    """The results file, merged with the rows an earlier run of the same protocol wrote (a row re-run replaces
    its earlier self: same variant, tool and seed), so `--only` and `--ref-python` runs add to one table."""
    slug = args.model.split(":")[-1].replace("/", "_")
    out = HERE / "results" / f"w8a8_quality_{slug}"
    key = lambda r: (r["variant"], r.get("tool"), r.get("seed"))  # noqa: E731
    seeds = args.seeds  # the draws of the merged table: the most any run of it used
    if out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        same = old["calibration"]["samples"] == args.samples and old["eval"]["chunks"] == args.chunks
        if same:
            new = {key(r) for r in rows}
            rows = [r for r in old["rows"] if key(r) not in new] + rows
            seeds = max(seeds, old["calibration"]["seeds"])
    info = {"model": args.model, "base": base.describe(), "calibration": {"source": "bundled:wiki/calibration",
            "samples": args.samples, "seq_len": args.seq_len, "seeds": seeds},
            "eval": {"text": "bundled:wiki/eval", "n_ctx": 512, "chunks": args.chunks, "dtype": "float32",
                     "kld": "KL(base ‖ variant) per scored position, nats; activation-quantized schemes evaluated "
                            "with the engine's input rounding (runtimes/kernels.py)"},
            "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2))
    lines = [f"# W8A8 / FP8 / weight-only on {args.model}", "",
             f"Calibration: bundled wiki, {args.samples} × {args.seq_len} tokens, seeded draws 0..{seeds - 1} "
             f"(seed 0 for every single-draw row). Evaluation: bundled wiki eval text, {args.chunks} × 512 tokens, "
             "float32, KLD against the base's float32 log-probabilities; W8A8 and FP8 dynamic/block with the inputs "
             "rounded as vLLM's kernels round them. Build times are in the JSON only (other jobs shared the 2 cores). "
             "`python bench/w8a8_quality.py` "
             f"(torch {torch.__version__}, {torch.get_num_threads()} threads).", "",
             "| variant | tool | KLD mean (median over draws) | draws | same top % | PPL | size MiB |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | – | skipped: {r['skipped']} | | | | |")
            continue
        groups.setdefault((r["variant"], r["tool"]), []).append(r)
    for (variant, tool), rs in groups.items():
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        klds = ", ".join(f"{r['kld']:.5f}" for r in rs)
        lines.append(f"| {variant} | {tool} | {med('kld'):.5f} ({klds}) | {len(rs)} | {100 * med('same_top'):.2f} | "
                     f"{med('ppl'):.3f} | {rs[0]['bytes'] / 2**20:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
