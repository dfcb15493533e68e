"""Predicted against measured memory on this machine (CPU): for each GGUF artefact of a run, the resident memory
llama.cpp's runtime adds when it loads the file with a context of N tokens and decodes over a full cache, next
to quantize's prediction (weights from the GGUF tensor infos + KV cache from the shape + compute buffer
estimate from quantize.fit, without the fixed 512 MiB CUDA allowance, which a CPU process does not pay).

Each artefact runs in a fresh process: RSS before loading (Python + libraries) is subtracted from the peak
(VmHWM) after filling the context, so the figure is what the model costs, as a GPU's memory would be charged.

Usage: python bench/memory_check.py outputs/smollm2-gguf [--ctx 8192]
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


def main() -> None:
    from quantize import fit

    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--ctx", type=int, default=8192)
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
    result = {"run": str(args.run), "ctx": args.ctx, "runtime": "llama.cpp (llama-cpp-python), CPU, KV F16",
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
    (HERE / "results" / "memory_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
