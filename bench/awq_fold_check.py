"""AWQ's folding is exact: on SmolLM2-135M in fp32, search the AWQ scales (4-bit asym g64 grid, no clipping,
nothing rounded), fold them into the norms / previous linears and the linears, and compare the logits of the
folded model with the original's on held-out chunks. Writes bench/results/awq_fold_check.{json,md}.

Usage: python bench/awq_fold_check.py [--samples 8] [--seq-len 512]
"""

import argparse
import json
from pathlib import Path

import torch

from quantize.methods.engine import stream_layers
from quantize.sources.architectures import LLAMA
from quantize.methods.awq import awq_layer
from quantize.sources.models import load_model, load_tokenizer, resolve_model
from quantize.methods.configs import AwqMethod
from quantize.sources.texts import bundled_wiki, calibration_batches

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    base = resolve_model("bundled:smollm2-135m")
    tok = load_tokenizer(base.path)
    ids = torch.tensor(tok(bundled_wiki("calibration").text, add_special_tokens=False).input_ids)
    calib = calibration_batches(ids, args.samples, args.seq_len, seed=0)
    method = AwqMethod(name="awq", bits=4, group_size=64, sym=False, clip=False, export="scaled-fp16")
    folded, log = {}, []

    def process(i, layer, acts):
        awq_layer(i, layer, acts, LLAMA.awq, method, lambda name, cols: 64, lambda name: False, {}, log,
                  quantize=False)

    for i, layer in stream_layers(base.path, calib, process):
        folded.update({f"model.layers.{i}.{k}": v.clone() for k, v in layer.state_dict().items()})
    model = load_model(base.path, "float32")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    firsts = {names[0] for _, names, _ in LLAMA.awq}
    folds = sum(1 for r in log if r["alpha"] is not None and r["module"] in firsts)
    moved = max((folded[k] - original[k]).abs().max().item() for k in folded)
    eval_ids = torch.tensor(tok(bundled_wiki("eval").text, add_special_tokens=False).input_ids[: 4 * 512]).reshape(4, 512)
    with torch.no_grad():
        before = model(eval_ids).logits
        model.load_state_dict(folded, strict=False)
        after = model(eval_ids).logits
    diff = (after - before).abs()
    result = {"model": "bundled:smollm2-135m", "dtype": "float32", "calibration": [args.samples, args.seq_len],
              "grid": "4-bit asym g64 (scale search only)", "eval_tokens": int(eval_ids.numel()),
              "max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
              "max_logit_magnitude": before.abs().max().item(), "max_weight_change": moved, "folds": folds,
              "alphas": sorted({r["alpha"] for r in log if r["alpha"] is not None}, key=str)}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "awq_fold_check.json").write_text(json.dumps(result, indent=2))
    line = (f"AWQ folding on SmolLM2-135M fp32 ({args.samples}×{args.seq_len} calibration, scales of the 4-bit asym g64 "
            f"search, {folds} folds into norms / previous linears): max |Δlogit| {result['max_abs_logit_diff']:.3g} (mean "
            f"{result['mean_abs_logit_diff']:.3g}) over {result['eval_tokens']} held-out positions, logits up to "
            f"{result['max_logit_magnitude']:.1f}; weights moved by up to {moved:.3g}")
    (HERE / "results" / "awq_fold_check.md").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
