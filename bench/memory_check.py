"""Predicted against measured memory on this machine (CPU).

llama.cpp: for each GGUF artefact of a run, the resident memory
llama.cpp's runtime adds when it loads the file with a context of N tokens and decodes over a full cache, next
to quantize's prediction (weights from the GGUF tensor infos + KV cache from the shape + compute buffer
estimate from quantize.fit, without the fixed 512 MiB CUDA allowance, which a CPU process does not pay).

torch (--torch RUN...): each artefact folder loaded by its loader (quantize.backends) in fp32, then a prefill of
--torch-ctx tokens with the KV cache kept and only the last position's logits (as generation does). Predicted:
the dense weights it holds in memory (4 bytes × parameters: transformers decompresses on CPU) + the fp32 KV
cache + the MLP's widest activation and one layer's attention scores (CPU sdpa materialises heads × ctx²)
for the prefill batch.

Each artefact runs in a fresh process: RSS before loading (Python + libraries) is subtracted from the peak
(VmHWM) after filling the context, so the figure is what the model costs, as a GPU's memory would be charged.

Usage: python bench/memory_check.py outputs/smollm2-gguf [--ctx 8192] [--torch outputs/smollm2-int8 ...]
Writes bench/results/memory_check.{json,md}.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MEASURE = """
import json, sys
from pathlib import Path
from quantize import memory
path, n_ctx = Path(sys.argv[1]), int(sys.argv[2])
import llama_cpp, numpy  # libraries in before the baseline
memory.reset_peak()
before = memory.peak_rss_bytes()
from quantize.llamacpp import LlamaCppModel
m = LlamaCppModel(path, n_ctx=n_ctx, threads=2, logits_all=False, n_batch=512)  # llama.cpp's default batch
tokens = numpy.random.default_rng(0).integers(0, m.vocab_size, n_ctx - 1).tolist()
m.llm.eval(tokens)  # touches every weight and fills the KV cache
peak = memory.peak_rss_bytes()
print(json.dumps({"baseline_rss": before, "peak_rss": peak}))
"""
MEASURE_TORCH = """
import json, sys, torch
from pathlib import Path
from quantize import memory
from quantize.backends import load
path, n_ctx = Path(sys.argv[1]), int(sys.argv[2])
import transformers, compressed_tensors  # libraries in before the baseline
memory.reset_peak()
before = memory.peak_rss_bytes()
model, loader, dtype = load(path, "float32", n_ctx)
ids = torch.randint(0, model.config.vocab_size, (1, n_ctx), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    model(ids, use_cache=True, logits_to_keep=1)
weights = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.parameters()}.values())
print(json.dumps({"baseline_rss": before, "peak_rss": memory.peak_rss_bytes(), "weights_in_memory": weights,
                  "loader": loader}))
"""


def main() -> None:
    from quantize import fit

    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--torch", nargs="*", type=Path, default=[], help="run folders whose torch artefacts to load")
    ap.add_argument("--torch-ctx", type=int, default=2048)
    args = ap.parse_args()
    results = json.loads((args.run / "results.json").read_text())
    shape = fit.ModelShape(**results["base"]["fit"]["protocol"]["shape"])
    rows = {}
    for name in results["variants"]:
        gguf_file = args.run / name / "model.gguf"
        if not gguf_file.is_file():
            continue
        out = subprocess.run([sys.executable, "-c", MEASURE, str(gguf_file), str(args.ctx)], capture_output=True,
                             text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        weights = sum(fit.weight_bytes_gguf(gguf_file).values())
        kv = fit.kv_cache_bytes(shape, args.ctx, 1, "f16")
        compute = fit.overhead_bytes(shape) - fit.RUNTIME_OVERHEAD_BYTES
        predicted = weights + kv + compute
        measured = m["peak_rss"] - m["baseline_rss"]
        rows[name] = {"weights": weights, "kv": kv, "compute": compute, "predicted": predicted, "measured": measured,
                      "error": (predicted - measured) / measured, **m}
    torch_rows = {}
    for run in args.torch:
        res = json.loads((run / "results.json").read_text())
        shape_t = fit.ModelShape(**res["base"]["fit"]["protocol"]["shape"])
        for name in list(res["variants"])[:2]:
            out = subprocess.run([sys.executable, "-c", MEASURE_TORCH, str(run / name), str(args.torch_ctx)],
                                 capture_output=True, text=True, check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            kv = fit.kv_cache_bytes(shape_t, args.torch_ctx, 1, "f32")
            heads = shape_t.hidden_size // shape_t.head_dim
            activations = args.torch_ctx * (3 * shape_t.intermediate_size + 4 * shape_t.hidden_size) * 4 \
                + heads * args.torch_ctx**2 * 4
            predicted = m["weights_in_memory"] + kv + activations
            measured = m["peak_rss"] - m["baseline_rss"]
            torch_rows[f"{run.name}/{name}"] = {"weights": m["weights_in_memory"], "kv": kv, "compute": activations,
                                               "predicted": predicted, "measured": measured, "loader": m["loader"],
                                               "error": (predicted - measured) / measured, **m}
    result = {"run": str(args.run), "ctx": args.ctx, "runtime": "llama.cpp (llama-cpp-python), CPU, KV F16",
              "torch": {"ctx": args.torch_ctx, "rows": torch_rows,
                        "prediction": "dense weights in memory + fp32 KV + prefill activations (3×MLP width + "
                                      "4×hidden per token, fp32) + one layer's attention scores (heads × ctx²)"},
              "prediction": "GGUF tensor bytes + KV (fit.kv_cache_bytes, f16) + compute buffer (fit.overhead_bytes "
                            "minus the fixed 512 MiB GPU allowance)", "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "memory_check.json").write_text(json.dumps(result, indent=2))
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    lines = [f"Predicted vs measured memory, llama.cpp CPU runtime, context {args.ctx}, KV F16 ({args.run})", "",
             "| artefact | weights | KV | compute est. | predicted | measured (peak RSS − baseline) | error |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {mib(r['weights'])} | {mib(r['kv'])} | {mib(r['compute'])} | {mib(r['predicted'])} "
                     f"| {mib(r['measured'])} | {100 * r['error']:+.1f}% |")
    if torch_rows:
        lines += ["", f"torch runtime (fp32 on CPU), prefill of {args.torch_ctx} tokens with KV cache", "",
                  "| artefact | loader | weights in memory | KV | activations est. | predicted | measured | error |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in torch_rows.items():
            lines.append(f"| {name} | {r['loader'].split(' (')[0]} | {mib(r['weights'])} | {mib(r['kv'])} | "
                         f"{mib(r['compute'])} | {mib(r['predicted'])} | {mib(r['measured'])} | {100 * r['error']:+.1f}% |")
    (HERE / "results" / "memory_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
