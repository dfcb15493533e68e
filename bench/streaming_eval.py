"""Streamed evaluation (eval.stream) against the whole model in memory: peak RSS, time and perplexity, each in its
own process, on a random-init Llama of ~1.1B parameters (TinyLlama-1.1B's shape, SmolLM2's vocabulary) saved as
fp16 shards, 4 chunks × 512 tokens of the held-out wiki text, float32.

    python bench/streaming_eval.py [--layers 22] [--chunks 4]   → bench/results/streaming_eval.{md,json}

The bound predicted for the stream: one decoder layer in float32 + the embedding and the output head in float32
while they are used + the chunks' hidden states (and the layer's activations for one chunk batch) + one chunk's
logits, plus the process itself; for the whole model: every parameter in float32 + one chunk's logits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             max_position_embeddings=2048, vocab_size=49152, tie_word_embeddings=False)


def build(folder: Path, layers: int) -> None:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantize.sources.models import resolve_model

    config = AutoConfig.for_model("llama", num_hidden_layers=layers, bos_token_id=1, eos_token_id=2, **SHAPE)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    for p in model.parameters():  # a narrower init than transformers' 0.02, so 22 random layers stay finite
        p.data.normal_(0, 0.01) if p.dim() > 1 else p.data.fill_(1.0)
    model.save_pretrained(folder, max_shard_size="1GB")
    smollm2 = resolve_model("bundled:smollm2-135m").path
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2 / name).is_file():
            shutil.copy(smollm2 / name, folder / name)


def measure(folder: Path, mode: str, chunks: int) -> dict:
    """Runs in a child process: one evaluation, its time and the process's peak RSS."""
    import torch

    from quantize.measure import quality
    from quantize.measure.memory import peak_rss_bytes  # VmHWM: this process's own peak (getrusage's ru_maxrss
    from quantize.measure.streamed import StreamedModel  # would carry the parent's over fork + exec)
    from quantize.sources.models import load_model, load_tokenizer
    from quantize.sources.texts import load_text

    torch.set_num_threads(2)
    if mode == "imports":  # the process with everything imported: the baseline both modes pay
        return {"mode": mode, "peak_rss_bytes": peak_rss_bytes()}
    data = quality.make_chunks(load_tokenizer(folder), load_text("bundled:wiki", "eval"), 512, chunks)
    start = time.perf_counter()
    model = StreamedModel(folder) if mode == "streamed" else load_model(folder, "float32")
    scores = quality.score_model(model, data, None, mode)
    seconds = time.perf_counter() - start
    return {"mode": mode, "ppl": scores["ppl"], "seconds": round(seconds, 1),
            "peak_rss_bytes": peak_rss_bytes()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--child", nargs=2)  # folder, mode
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.child[1], args.chunks)))
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama-1.1b-random"
        build(folder, args.layers)
        runs = []
        for mode in ("imports", "streamed", "whole"):
            out = subprocess.run([sys.executable, __file__, "--chunks", str(args.chunks), "--child", str(folder), mode],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    h, inter, vocab = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = SHAPE["num_key_value_heads"] * h // SHAPE["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    total = args.layers * layer + 2 * vocab * h
    n_ctx = 512
    process = runs.pop(0)["peak_rss_bytes"]  # measured: the interpreter with torch, transformers and quantize
    logits = 4 * n_ctx * vocab * 4  # one chunk's logits, its log-softmax and their temporaries (float32)
    hidden = 4 * args.chunks * n_ctx * h * 2  # every chunk's hidden states, and one layer's output beside them
    # a tensor is read in fp16 and converted to float32: 6 bytes per parameter while both live
    streamed_stages = [6 * vocab * h + hidden,  # embedding
                       6 * layer + 4 * layer + hidden,  # one layer (the previous one is released after)
                       6 * vocab * h + hidden + logits]  # final norm and output head, per chunk
    predicted = {"streamed": process + max(streamed_stages), "whole": process + 4 * total + 2 * 2 * vocab * h + logits}
    for r in runs:
        r["predicted_bytes"] = int(predicted[r["mode"]])
    result = {"model": f"random-init Llama, {args.layers} layers, {SHAPE}, {total / 1e9:.2f} B parameters, fp16 shards",
              "text": f"bundled:wiki/eval, {args.chunks} chunks × {n_ctx}, float32, 2 threads", "runs": runs,
              "params": total, "process_baseline_bytes": process,
              "predicted": "process baseline (measured) + the largest stage: streamed = max(embedding, one layer in "
                           "fp16 and fp32 plus the next, output head) with every chunk's hidden states; whole = every "
                           "parameter in float32 + the fp16 embedding and head being converted + one chunk's logits"}
    (ROOT / "bench/results/streaming_eval.json").write_text(json.dumps(result, indent=2))
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines = ["# Streamed evaluation vs the whole model in memory", "", f"- model: {result['model']}",
             f"- text: {result['text']}", "- each run in its own process; peak RSS = its VmHWM",
             f"- process baseline (imports only): {gib(process)}; predicted = {result['predicted']}", "",
             "| mode | PPL | seconds | peak RSS | predicted bound |", "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['ppl']:.6f} | {r['seconds']} | {gib(r['peak_rss_bytes'])} | {gib(r['predicted_bytes'])} |"
              for r in runs]
    (ROOT / "bench/results/streaming_eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
