"""The arithmetic floor of GPTQ calibration on this machine: how fast any GPTQ implementation could be.

GPTQ needs, per decoder layer, at least one forward pass of the calibration tokens (to get each linear's inputs
and the next layer's inputs) and the Hessians 2·XᵀX of the four distinct linear inputs (q/k/v share one, gate/up
share one). XᵀX is symmetric, so half its products suffice (a syrk). This script counts those FLOPs for a model
config and calibration size, measures this machine's matmul throughput on the same shapes (torch, all threads,
median of 5), and divides: once with the forward in float32, once with the forward in bfloat16 (forward_dtype
bfloat16); the Hessians are float32 in both.

Usage: python bench/gptq_floor.py [--samples 32] [--seq-len 512] [--reference bench/results/gptq_reference.json]
Writes bench/results/gptq_floor.{json,md}.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from quantize.sources.models import resolve_model
from quantize.measure.speed import cpu_model

HERE = Path(__file__).resolve().parent


def layer_flops(cfg: dict, tokens: int, seq_len: int) -> dict[str, float]:
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    linears = 2 * tokens * (hidden * (q + 2 * kv) + q * hidden + 2 * hidden * inter + inter * hidden)
    # causal attention: QKᵀ and PV over half the (seq_len x seq_len) square, per head
    attention = 2 * 2 * tokens * (seq_len / 2) * heads * head_dim
    # inputs of q/k/v, o, gate/up, down; each d×d product is symmetric: d(d+1)/2 dot products of length tokens
    hessians = 2 * tokens * sum(d * (d + 1) / 2 for d in (hidden, q, hidden, inter))
    return {"linears": linears, "attention": attention, "hessians": hessians}


def matmul_gflops(m: int, k: int, n: int, dtype=torch.float32, repeats: int = 5) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--reference", type=Path, default=HERE / "results" / "gptq_reference.json")
    args = ap.parse_args()
    base = resolve_model("bundled:smollm2-135m")
    cfg = json.loads((base.path / "config.json").read_text())
    tokens = args.samples * args.seq_len
    per_layer = layer_flops(cfg, tokens, args.seq_len)
    total = {k: v * cfg["num_hidden_layers"] for k, v in per_layer.items()}
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    rows = 4096  # one timing block of tokens; the rate, not the total, is what is measured
    f32, bf16 = torch.float32, torch.bfloat16
    shapes = {f"X·Wᵀ ({rows} tokens, {hidden} → {inter}), float32": (rows, hidden, inter, f32),
              f"X·Wᵀ ({rows} tokens, {inter} → {hidden}), float32": (rows, inter, hidden, f32),
              f"X·Wᵀ ({rows} tokens, {hidden} → {inter}), bfloat16": (rows, hidden, inter, bf16),
              f"X·Wᵀ ({rows} tokens, {inter} → {hidden}), bfloat16": (rows, inter, hidden, bf16),
              f"XᵀX ({inter} x {rows} x {inter}), float32": (inter, rows, inter, f32)}
    gflops = {name: matmul_gflops(*shape) for name, shape in shapes.items()}
    best = {dtype: max(v for k, v in gflops.items() if k.endswith(dtype)) for dtype in ("float32", "bfloat16")}
    forward = total["linears"] + total["attention"]
    floors = {f"{dtype} forward": forward / best[dtype] / 1e9 + total["hessians"] / best["float32"] / 1e9
              for dtype in ("float32", "bfloat16")}
    floor_s = min(floors.values())
    result = {"model": "bundled:smollm2-135m", "samples": args.samples, "seq_len": args.seq_len,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_model(), "tflop": {k: v / 1e12 for k, v in total.items()},
              "matmul_gflops": gflops, "floor_seconds_by_forward_dtype": floors, "floor_seconds": floor_s}
    lines = [f"GPTQ arithmetic floor, SmolLM2-135M ({cfg['num_hidden_layers']} layers), {args.samples}×{args.seq_len} "
             f"calibration tokens, {torch.get_num_threads()} threads on {cpu_model()}, torch {torch.__version__}", "",
             "| work (one forward + the Hessians, all layers) | TFLOP |", "|---|---|"]
    lines += [f"| {k}{' (the symmetric half)' if k == 'hessians' else ''} | {v / 1e12:.2f} |" for k, v in total.items()]
    lines += [f"| total | {sum(total.values()) / 1e12:.2f} |", "", "| matmul on this machine (median of 5) | GFLOP/s |",
              "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in gflops.items()]
    lines += [""] + [f"floor with the {name} = forward FLOPs ÷ the best {name.split()[0]} matmul rate + Hessian FLOPs ÷ "
                     f"the best float32 rate = {secs:.1f} s" for name, secs in floors.items()]
    lines += ["(no real implementation reaches a floor: norms, rotary, softmax, the GPTQ column loop and memory "
              f"traffic come on top); the lower one, {floor_s:.1f} s, is used below"]
    if args.reference.is_file():
        ref = json.loads(args.reference.read_text())
        if (ref["calibration"]["samples"], ref["calibration"]["seq_len"]) != (args.samples, args.seq_len):
            raise SystemExit(f"{args.reference} used {ref['calibration']['samples']}×{ref['calibration']['seq_len']} "
                             f"calibration tokens, not {args.samples}×{args.seq_len}")
        result["reference_seconds"] = {}
        for name in (n for n in ref["runs"] if not n.startswith("quantize")):  # the references that run has
            theirs = ref["runs"][name]["seconds"]
            result["reference_seconds"][name] = theirs
            below = floor_s / (theirs / 20)
            lines.append(f"{ref['runs'][name]['tool']} on the same work: {theirs:.1f} s ({args.reference.name}); 20× "
                         f"faster would be {theirs / 20:.1f} s, " + (f"{below:.1f}× below the floor" if below > 1 else
                                                                      f"{1 / below:.1f}× above the floor")
                         + f"; the most any implementation can gain over it here is {theirs / floor_s:.1f}×")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "gptq_floor.json").write_text(json.dumps(result, indent=2))
    (HERE / "results" / "gptq_floor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
