"""Side by side on the same model, calibration tokens and evaluation: our GPTQ or AWQ vs llm-compressor's
GPTQModifier or AWQModifier (run in its own environment by bench/reference_llmcompressor.py) and, for GPTQ,
GPTQModel's quantizer (bench/reference_gptqmodel.py, in its own environment). Wall time, peak RSS, and
KLD/perplexity of every artefact against the base on the held-out text. Each build runs in its own process, one
after the other.

Usage: python bench/reference.py --method gptq|awq --ref-python /tmp/refenv/bin/python
       [--gptqmodel-python /tmp/gpmenv/bin/python] [--samples 32] [--seq-len 512] [--group-size 64] [--asym]
       [--toy] [--repeats 3]
Round k of --repeats calibrates every tool on the calibration draw of seed k: GPTQ's result on this model moves
with the draw (and with rounding-level changes) by more than its ± suggests, so one draw cannot rank two tools.
Writes bench/results/<method>_reference.{json,md} (with --asym: <method>_asym_reference.*; with --toy:
<method>_toy_reference.*). --toy replaces SmolLM2 by a random-init 4-layer Llama of 9.4 M parameters (vocab 4096,
hidden 384, MLP 1024, heads 6/2) with a BPE tokenizer trained on the calibration text, built by tests/conftest.py:
the kind of toy on which the reference tools' fixed costs dominate.
"""

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from quantize.measure import quality
from quantize.runtimes import load
from quantize.fit.vram import gib
from quantize.formats.tensors import weight_bytes_safetensors
from quantize.sources.models import load_model, load_tokenizer, resolve_model
from quantize.measure.speed import cpu_model
from quantize.sources.texts import bundled_wiki, calibration_batches

HERE = Path(__file__).resolve().parent

OURS = """
import json, sys, time, torch
from pathlib import Path
from quantize.measure import memory
from quantize.methods.registry import METHODS
from quantize.sources.models import resolve_model
from quantize.methods.configs import AwqMethod, GptqMethod
name, base, calib, out, gs, sym = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6] == "sym"
true_sequential, forward_dtype = sys.argv[7] == "1", sys.argv[8]
ids = torch.load(calib)
if name == "gptq":
    method = GptqMethod(name="gptq", bits=4, group_size=gs, sym=sym, damp=0.01, block_size=128, true_sequential=true_sequential,
                        device="cpu", forward_dtype=forward_dtype)
else:
    method = AwqMethod(name="awq", bits=4, group_size=gs, sym=sym)
start = time.perf_counter()
m = resolve_model(base)
METHODS[name].build(method, m, Path(out), ids)
seconds = time.perf_counter() - start
tool = f"quantize {name}" + (" (true sequential)" if true_sequential else "") + (f" ({forward_dtype} forward)" if forward_dtype != "float32" else "")
open(out + "/bench.json", "w").write(json.dumps({"tool": tool, "seconds": seconds,
    "peak_rss_bytes": memory.peak_rss_bytes(), "threads": torch.get_num_threads(), "method": method.model_dump()}))
"""
SCHEMES = {
    "gptq": "damp 0.01, block 128, no act-order; ours with true_sequential off (like llm-compressor, every linear "
            "of a layer calibrated from one pass of the unquantized layer) and on (our default, and GPTQModel's), and "
            "on with forward_dtype bfloat16 (calibration forward under bfloat16 autocast; Hessians and solve float32)",
    "awq": "duo scaling, n_grid 20 (ours α = k/20 plus s = 1; llm-compressor α = k/18 for k ≤ 18 plus s = 1), "
           "ours with the clip search (AutoAWQ's), llm-compressor 0.14 has none; then min/max round-to-nearest",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["gptq", "awq"], default="gptq")
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--ref-python", required=True, help="python of the llm-compressor environment")
    ap.add_argument("--gptqmodel-python", help="python of the GPTQModel environment (gptq only)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds; round k calibrates every tool on the calibration draw of seed k (median reported)")
    ap.add_argument("--reuse", type=Path, help="score the builds already in this work folder (no new builds)")
    ap.add_argument("--toy", action="store_true", help="a random-init 4-layer toy instead of SmolLM2")
    args = ap.parse_args()
    work = args.reuse or Path(tempfile.mkdtemp(prefix=f"{args.method}-ref-"))
    spec = "bundled:smollm2-135m"
    if args.toy:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from conftest import build_tiny_llama

        spec = str(work / "toy")
        if not (work / "toy" / "config.json").is_file():
            build_tiny_llama(work / "toy", vocab_size=4096, hidden_size=384, intermediate_size=1024,
                             num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2)
    base = resolve_model(spec)
    tok = load_tokenizer(base.path)
    grid = "sym" if not args.asym else "asym"
    ids = torch.tensor(tok(bundled_wiki("calibration").text, add_special_tokens=False).input_ids)
    settings = {k: getattr(args, k) for k in ("method", "samples", "seq_len", "group_size", "asym", "toy")}
    if args.reuse:  # the builds there must be of this very setup
        built = json.loads((work / "settings.json").read_text())
        if built != settings:
            raise SystemExit(f"{work} was built with {built}, not {settings}")
    else:
        (work / "settings.json").write_text(json.dumps(settings))

    def command(name: str, out: Path, calib: Path) -> list[str]:
        if name == "llmcompressor":
            return [args.ref_python, str(HERE / "reference_llmcompressor.py"), str(base.path), str(calib),
                    str(out), "--method", args.method, "--group-size", str(args.group_size)] + (
                        ["--asym"] if args.asym else [])
        if name == "gptqmodel":
            return [args.gptqmodel_python, str(HERE / "reference_gptqmodel.py"), str(base.path), str(calib),
                    str(out), "--group-size", str(args.group_size)] + (["--asym"] if args.asym else [])
        return [sys.executable, "-c", OURS, args.method, spec, str(calib), str(out), str(args.group_size),
                grid, str(int(name != "quantize")), "bfloat16" if name == "quantize-bf16" else "float32"]

    if args.gptqmodel_python and args.method != "gptq":
        raise SystemExit("--gptqmodel-python: GPTQModel is a reference for --method gptq only")
    references = ["llmcompressor", *(["gptqmodel"] if args.gptqmodel_python else [])]
    names = ["quantize", *(["quantize-true-sequential", "quantize-bf16"] if args.method == "gptq" else []),
             *references]
    builds: dict[str, list[dict]] = {name: [] for name in names}
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(torch.get_num_threads())}  # one worker per thread, as advised
    repeats = len(list((work / names[0]).glob("run*"))) if args.reuse else args.repeats
    for k in range(repeats):  # round robin, so drift in the machine's speed hits every tool alike
        calib = work / f"calib-seed{k}.pt"  # round k: every tool gets the same draw, a new one each round
        if not args.reuse:
            torch.save(calibration_batches(ids, args.samples, args.seq_len, seed=k), calib)
        for name in names:
            out = work / name / f"run{k}"
            if not args.reuse:
                out.mkdir(parents=True)
                start = time.perf_counter()
                subprocess.run(command(name, out, calib), check=True, env=env)
                (out / "process.json").write_text(json.dumps({"process_seconds": time.perf_counter() - start}))
            process = json.loads((out / "process.json").read_text()) if (out / "process.json").is_file() else {}
            builds[name].append({**json.loads((out / "bench.json").read_text()), **process, "folder": str(out)})

    chunks = quality.make_chunks(tok, bundled_wiki("eval"), 512, args.chunks)
    store, base_q = quality.base_file(load_model(base.path, "float32"), chunks, work / "base.kld", "base")
    runs, scored = {}, {}
    for name, reps in builds.items():
        for rep in reps:  # every distinct artefact is scored once
            folder = Path(rep["folder"])
            digest = hashlib.sha256()
            for f in sorted(folder.glob("*.safetensors")):
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 24), b""):
                        digest.update(block)
            digest = digest.hexdigest()
            if digest not in scored:  # the evaluation's own loader per format (load.load)
                model, loader, _ = load.load(folder, "float32")
                scored[digest] = {**quality.score(model, chunks, store, f"{name} {folder.name}"),
                                  "loader": loader}
            rep["eval"], rep["sha256"] = scored[digest], digest
        klds = [r["eval"]["kld"]["mean"] for r in reps]
        middle = sorted(range(len(reps)), key=lambda j: klds[j])[len(reps) // 2]  # the run with the median KLD
        runs[name] = {**reps[middle], "seconds_runs": [r["seconds"] for r in reps],
                      "seconds": statistics.median(r["seconds"] for r in reps), "kld_runs": klds,
                      "distinct_artefacts": len({r["sha256"] for r in reps}),
                      "peak_rss_bytes": max(r["peak_rss_bytes"] for r in reps)}
    params = sum(b // {"F16": 2, "BF16": 2, "F32": 4}[dt] for dt, b in weight_bytes_safetensors(base.path).items())
    cpu = cpu_model()
    result = {"model": "a random-init toy (--toy)" if args.toy else spec, "parameters": params, "cpu": cpu,
              "threads": torch.get_num_threads(), "repeats": repeats, "calibration": {"samples": args.samples, "seq_len": args.seq_len,
              "source": "bundled:wiki/calibration", "seeds": list(range(repeats))}, "scheme": f"{args.method.upper()} W4A16 {grid} g{args.group_size}, {SCHEMES[args.method]}",
              "protocol": chunks.protocol(), "base": base_q, "runs": runs,
              "speedup": {ref: {n: runs[ref]["seconds"] / r["seconds"] for n, r in runs.items() if n not in references}
                          for ref in references},
              # median KLD over the rounds against the reference's median, and round by round (same tokens)
              "kld_ratio": {ref: {n: statistics.median(r["kld_runs"]) / statistics.median(runs[ref]["kld_runs"])
                                  for n, r in runs.items() if n not in references} for ref in references},
              "kld_ratio_per_round": {ref: {n: [a / b for a, b in zip(r["kld_runs"], runs[ref]["kld_runs"])]
                                            for n, r in runs.items() if n not in references} for ref in references}}
    (HERE / "results").mkdir(exist_ok=True)
    stem = f"{args.method}{'_asym' if args.asym else ''}{'_toy' if args.toy else ''}_reference"
    (HERE / "results" / f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [f"{args.method.upper()} side by side on {result['model']} ({params / 1e6:.1f} M parameters): {result['scheme']}, {args.samples}×{args.seq_len} calibration tokens, "
             f"{chunks.protocol()['tokens_scored']} held-out tokens scored; base PPL {base_q['ppl']:.4f}", "",
             f"build seconds: median of {repeats} rounds (round robin, one process per build, {torch.get_num_threads()} "
             f"threads on {cpu}); round k calibrates every tool on the same draw of seed k (seeds "
             f"{', '.join(map(str, range(repeats)))}), so the KLD per run shows how much the result moves with the "
             "calibration sample; peak RSS: the largest; PPL, KLD ±, same top: the run with the median KLD; every "
             "distinct artefact is scored", "",
             "| tool | build s | runs s | peak RSS | distinct artefacts | KLD per run | PPL | KLD mean ± | same top % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        e = r["eval"]
        lines.append(f"| {r['tool']} | {r['seconds']:.1f} | {', '.join(f'{x:.1f}' for x in r['seconds_runs'])} | "
                     f"{gib(r['peak_rss_bytes'])} | {r['distinct_artefacts']} | "
                     f"{', '.join(f'{x:.5f}' for x in r['kld_runs'])} | {e['ppl']:.4f} | "
                     f"{e['kld']['mean']:.5f} ± {e['kld']['unc']:.5f} | {100 * e['kld']['same_top']:.2f} |")
    lines += [""] + [f"{r['tool']} artefact evaluated through: {r['eval']['loader']}" for r in runs.values()]
    lines += [""] + [f"{runs[n]['tool']} vs {runs[ref]['tool']}: speed-up {result['speedup'][ref][n]:.2f}×, "
                     f"KLD ratio ours/theirs {result['kld_ratio'][ref][n]:.3f} (median over median; per round "
                     f"{', '.join(f'{x:.3f}' for x in result['kld_ratio_per_round'][ref][n])})"
                     for ref in references for n in result["speedup"][ref]]
    (HERE / "results" / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
