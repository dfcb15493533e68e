"""`quantize eval FILE.gguf` against llama.cpp's own `llama-perplexity` on the same file, text and chunks: wall time
end to end (each a fresh process, alternated, median of --reps), the perplexity each reports, and where our time
goes (tokenizer, chunks, model load, scoring) measured inside one process.

llama-perplexity is not in the llama-cpp-python wheel; build it from the same sdist (the same llama.cpp):
  tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
  cmake -S . -B build -G Ninja -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DGGML_NATIVE=ON
  cmake --build build --target llama-perplexity
Usage: python bench/gguf_eval_speed.py --binary PATH/llama-perplexity [--gguf F] [--chunks 32] [--reps 3]
                                      [--before DIR]
--before: a checkout of an earlier commit (git worktree add DIR COMMIT) whose `quantize eval` runs alternated with
this one's, the before/after pair measured side by side. Writes bench/results/gguf_eval_speed.{json,md} (--name).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def llama_perplexity(binary: Path, gguf: Path, text_file: Path, n_ctx: int, chunks: int, threads: int) -> dict:
    t0 = time.perf_counter()
    done = subprocess.run([str(binary), "-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx), "--chunks",
                           str(chunks), "-t", str(threads)], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    log = done.stdout + done.stderr
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    if done.returncode != 0 or not final:
        raise SystemExit(f"llama-perplexity failed:\n{log[-3000:]}")
    n_seq = re.search(r"n_seq=(\d+)", log)
    info = re.search(r"system_info: .*?CPU : (.*)", log)
    kernels = " ".join(k for k, v in re.findall(r"([A-Z0-9_]+) = (\d+)", info.group(1) if info else "")
                       if v != "0" and k not in ("LLAMAFILE", "OPENMP", "REPACK"))
    return {"seconds": seconds, "ppl": float(final.group(1)), "n_seq": int(n_seq.group(1)) if n_seq else None,
            "cpu_kernels": kernels}


def ours(gguf: Path, n_ctx: int, chunks: int, threads: int, root: Path = ROOT) -> dict:
    """`quantize eval` of the checkout at `root` (python -m from there imports that checkout's package)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "quantize.cli", "eval", str(gguf), "--no-speed", "--json",
                           "--set", f"eval.perplexity.max_chunks={chunks}", "--set", f"eval.perplexity.n_ctx={n_ctx}"],
                          capture_output=True, text=True, env=env, cwd=root)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"quantize eval failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    return {"seconds": seconds, "ppl": result["perplexity"]["ppl"], "loader": result["loader"]}


def phases(gguf: Path, n_ctx: int, chunks: int, threads: int) -> dict:
    """Where one in-process evaluation spends its time."""
    import torch

    from quantize.measure import quality, scorecard
    from quantize.runtimes.llamacpp import LlamaCppModel
    from quantize.sources.texts import load_text

    torch.set_num_threads(threads)
    out = {}
    t = time.perf_counter()
    tok = scorecard.tokenizer_for(gguf, None)
    out["tokenizer_load"] = time.perf_counter() - t
    t = time.perf_counter()
    text = load_text("bundled:wiki", "eval")
    c = quality.make_chunks(tok, text, n_ctx, chunks)
    out["tokenize_and_chunk"] = time.perf_counter() - t
    t = time.perf_counter()
    model = LlamaCppModel(gguf, n_ctx=n_ctx, threads=threads)
    out["model_load"] = time.perf_counter() - t
    t = time.perf_counter()
    decode = 0.0
    first = c.first
    for i in range(c.ids.shape[0]):
        t1 = time.perf_counter()
        model.logits(c.ids[i].tolist(), first, reuse=True)
        decode += time.perf_counter() - t1
    out["decode_only"] = decode
    t = time.perf_counter()
    quality.score_model(model, c, None, "gguf", floor=False)
    out["score_model (decode + statistics)"] = time.perf_counter() - t
    model.close()
    return out


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    from quantize.sources.models import bundled_gguf
    from quantize.sources.texts import load_text

    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", type=Path, required=True)
    ap.add_argument("--gguf", type=Path, default=None, help="default: the bundled Gemma-3-270m Q4_K_M")
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--name", default="gguf_eval_speed")
    ap.add_argument("--before", type=Path, default=None, help="an earlier checkout, run alternated as the baseline")
    args = ap.parse_args()
    gguf = args.gguf or bundled_gguf("gemma3-270m")
    text_file = Path(tempfile.mkdtemp()) / "wiki_eval.txt"
    text_file.write_text(load_text("bundled:wiki", "eval").text, encoding="utf-8")
    runs = {"llama-perplexity": [], "quantize eval": []}
    if args.before:
        before = subprocess.run(["git", "-C", str(args.before), "log", "-1", "--format=%h"], capture_output=True,
                                text=True).stdout.strip()
        runs[f"quantize eval at {before}"] = []
    for _ in range(args.reps):  # alternated, each a fresh process
        runs["llama-perplexity"].append(llama_perplexity(args.binary, gguf, text_file, args.n_ctx, args.chunks,
                                                         args.threads))
        runs["quantize eval"].append(ours(gguf, args.n_ctx, args.chunks, args.threads))
        if args.before:
            runs[f"quantize eval at {before}"].append(ours(gguf, args.n_ctx, args.chunks, args.threads, args.before))
        print(json.dumps({k: v[-1] for k, v in runs.items()}), flush=True)
    split = phases(gguf, args.n_ctx, args.chunks, args.threads)
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    result = {"protocol": {"cpu": cpu_name(), "gguf": str(gguf), "text": "bundled:wiki/eval", "n_ctx": args.n_ctx,
                           "chunks": args.chunks,
                           "threads": args.threads, "reps": args.reps, "binary": str(args.binary),
                           "llama-perplexity": "default batch (2048: n_seq chunks per decode), its own tokenizer",
                           "quantize eval": "`quantize eval GGUF --no-speed --json`, no base (perplexity only), the "
                                            "GGUF's tokenizer through transformers (converted once, kept in the "
                                            "cache folder)"},
              "runs": runs, "median_s": med, "ratio": med["quantize eval"] / med["llama-perplexity"],
              "phases_s": split}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"`quantize eval` against `llama-perplexity` (llama.cpp of llama-cpp-python 0.3.36, built from its sdist), "
             f"{gguf.name}, bundled:wiki/eval, {args.chunks} × {args.n_ctx}, {args.threads} threads, each a fresh "
             f"process, alternated, median of {args.reps}.", "",
             "| tool | median s | min–max s | PPL |", "|---|---|---|---|"]
    for k, v in runs.items():
        s = [r["seconds"] for r in v]
        lines.append(f"| {k} | {med[k]:.1f} | {min(s):.1f}–{max(s):.1f} | {v[-1]['ppl']:.4f} |")
    lines += ["", f"Ratio of medians, quantize eval / llama-perplexity: **{result['ratio']:.2f}×** (goal ≤ 1.1×)."]
    for k in runs:
        if k.startswith("quantize eval at "):
            lines.append(f"{k} / llama-perplexity: {med[k] / med['llama-perplexity']:.2f}× (the same machine, "
                         "alternated in this run).")
    lines += ["", f"CPU: {cpu_name()}. llama-perplexity's CPU kernels: {runs['llama-perplexity'][-1]['cpu_kernels']}; "
                  f"quantize eval's llama.cpp: {runs['quantize eval'][-1]['loader']}.", "",
              "Inside one process (one run, seconds): " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()) + "."]
    (HERE / "results" / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
