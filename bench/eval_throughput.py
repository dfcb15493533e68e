"""Evaluation throughput: our perplexity + KLD scoring against a bare forward pass over the same tokens, on
llama.cpp (GGUF) and on transformers (float32), and what asking for the scored half's logits only saves.

    python bench/eval_throughput.py [--chunks 8] [--repeats 3]   → bench/results/eval_throughput.{md,json}

Per model, on the same chunks (n_ctx 512 of bundled:wiki/eval, the second half scored, as llama-perplexity), each
mode timed over all chunks, the modes alternated, `--repeats` rounds, medians:
    forward      the model's forward for each chunk with the output layer on the scored half only (no scoring)
    score        quality.score: that forward, then log-softmax, NLL, KLD against a base file (made once from the
                 same model: the KLD is 0, its cost is not), top-1 agreement: what `quantize run` does per variant
    all-logits   the forward with the output layer on every position (what the scorer did before), no scoring
Threads: 2 (this machine's cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantize.measure import quality  # noqa: E402
from quantize.runtimes.llamacpp import LlamaCppModel  # noqa: E402
from quantize.sources.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from quantize.sources.texts import load_text  # noqa: E402


def models():
    """(label, runtime, loader) for each model measured."""
    smollm2, gemma = resolve_model("bundled:smollm2-135m"), resolve_model("bundled:gemma3-270m")
    return [("Gemma-3-270m Q4_K_M GGUF", "llama.cpp", gemma, lambda: LlamaCppModel(gemma.source_file, n_ctx=512)),
            ("SmolLM2-135M Q4_1 GGUF", "llama.cpp", smollm2, lambda: LlamaCppModel(smollm2.source_file, n_ctx=512)),
            ("SmolLM2-135M float32", "transformers", smollm2, lambda: load_model(smollm2.path, "float32"))]


@torch.inference_mode()
def forward_all(model, chunks, first: int) -> float:
    start = time.perf_counter()
    for i in range(chunks.ids.shape[0]):
        quality.forward_logits(model, chunks.ids[i : i + 1], first)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for label, runtime, base, make in models():
        chunks = quality.make_chunks(load_tokenizer(base.path), load_text("bundled:wiki", "eval"), 512, args.chunks)
        model = make()
        with tempfile.TemporaryDirectory() as tmp:
            base_file, _ = quality.base_file(model, chunks, Path(tmp) / "base.kld")
            times = {"forward": [], "score": [], "all-logits": []}
            for _ in range(args.repeats):
                times["forward"].append(forward_all(model, chunks, chunks.first))
                start = time.perf_counter()
                quality.score(model, chunks, base_file, label)
                times["score"].append(time.perf_counter() - start)
                times["all-logits"].append(forward_all(model, chunks, 0))
        if hasattr(model, "close"):
            model.close()
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"model": label, "runtime": runtime, "chunks": args.chunks, "times_s": times, "median_s": med,
                     "score_over_forward": med["score"] / med["forward"],
                     "all_logits_over_forward": med["all-logits"] / med["forward"]})
        print(rows[-1])
    dest = ROOT / "bench" / "results"
    (dest / "eval_throughput.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Evaluation throughput: scoring against a bare forward pass", "",
             f"`python bench/eval_throughput.py` (protocol in its docstring): {args.chunks} chunks × 512 tokens of "
             f"bundled:wiki/eval, second half scored, 2 threads, medians of {args.repeats} alternated rounds "
             "(seconds for all chunks).", "",
             "| model | runtime | forward (scored half's logits) | score (forward + PPL/KLD) | score / forward | "
             "forward with every position's logits | that / forward |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["median_s"]
        lines.append(f"| {r['model']} | {r['runtime']} | {m['forward']:.2f} | {m['score']:.2f} | "
                     f"{r['score_over_forward']:.3f} | {m['all-logits']:.2f} | {r['all_logits_over_forward']:.3f} |")
    (dest / "eval_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
