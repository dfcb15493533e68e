"""Predicted against measured memory on this machine (CPU).

llama.cpp: GGUF artefacts of a run loaded by llama.cpp's runtime (llama-cpp-python) at a context of N tokens,
with flash attention off and on, then N-1 tokens decoded in 512-token batches with only the last logits kept
(as generation does). Three figures per row:
  predicted   quantize.fit: GGUF tensor bytes + KV cache (f16) + compute buffer + f16 scores copy (no flash
              attention), i.e. fit.overhead_bytes without the fixed 512 MiB GPU allowance a CPU process does not pay
  llama.cpp   the buffers llama.cpp itself reports in its log (model, repack, KV, compute, output): what the
              runtime allocates, i.e. what a GPU would be charged (the f16 scores copy is not in its log)
  RSS         peak resident memory (VmHWM) after decoding minus the RSS before loading (Python, torch and
              llama_cpp already imported). On CPU only touched pages count: with one output row the f32 logits
              part of the compute buffer is never touched, and mmap'd weights count once read.

torch (--torch RUN...): each artefact folder loaded by its loader (quantize.backends) in fp32, then a prefill of
--torch-ctx tokens with the KV cache kept and only the last position's logits (as generation does). Predicted:
the dense weights it holds in memory (4 bytes x parameters: transformers decompresses on CPU) + the fp32 KV
cache + the MLP's widest activation and one layer's attention scores (CPU sdpa materialises heads x ctx^2)
for the prefill batch.

Each measurement runs in a fresh process.

Usage: python bench/memory_check.py outputs/smollm2-gguf [--ctx 2048 8192] [--only gguf-f16 ...]
       [--torch outputs/smollm2-int8 ...]
Writes bench/results/memory_check.{json,md}.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MEASURE = """
import ctypes, json, re, sys
from pathlib import Path
from quantize import memory
from quantize.llamacpp import LlamaCppModel  # imports llama_cpp, numpy and torch: in before the baseline
import llama_cpp, numpy
path, n_ctx, flash_attn = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
buffers = {}
@llama_cpp.llama_log_callback
def on_log(level, text, user_data):  # llama.cpp's own accounting: "<name> buffer size = <x> MiB"
    hit = re.search(r"(\\S+ +\\S+) buffer size = +([0-9.]+) MiB", text.decode(errors="replace"))
    if hit:
        buffers[" ".join(hit.group(1).split())] = float(hit.group(2)) * 2**20
llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
memory.reset_peak()
before = memory.peak_rss_bytes()
m = LlamaCppModel(path, n_ctx=n_ctx, threads=2, logits_all=False, n_batch=512, flash_attn=flash_attn)
loaded = memory.peak_rss_bytes()
tokens = numpy.random.default_rng(0).integers(0, m.vocab_size, n_ctx - 1).tolist()
m.llm.eval(tokens)  # touches every weight and fills the KV cache
peak = memory.peak_rss_bytes()
m.close()
print(json.dumps({"baseline_rss": before, "loaded_rss": loaded, "peak_rss": peak, "llamacpp_buffers": buffers}))
"""
MEASURE_TORCH = """
import gc, json, sys, torch
from pathlib import Path
from quantize import memory
from quantize.backends import load
import transformers, compressed_tensors  # libraries in before the baseline
path, n_ctx = Path(sys.argv[1]), int(sys.argv[2])
memory.reset_peak()
before = memory.rss_bytes()
model, loader, dtype = load(path, "float32", n_ctx)
load_peak = memory.peak_rss_bytes()
ids = torch.randint(0, model.config.vocab_size, (1, n_ctx), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    model(ids[:, :16], use_cache=False, logits_to_keep=1)  # warm-up: loaders that decompress on first use do so now
gc.collect()
steady = memory.rss_bytes()
memory.reset_peak()
with torch.inference_mode():
    out = model(ids, use_cache=True, logits_to_keep=1)
peak = memory.peak_rss_bytes()
params = sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())
print(json.dumps({"baseline_rss": before, "load_peak_rss": load_peak, "steady_rss": steady, "prefill_peak_rss": peak,
                  "params": params, "loader": loader}))
"""


def main() -> None:
    from quantize import fit

    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--ctx", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--only", nargs="*", default=["gguf-f16", "gguf-q8_0", "gguf-q4_k_m"],
                    help="variant names (default: three sizes); empty for every GGUF variant")
    ap.add_argument("--torch", nargs="*", type=Path, default=[], help="run folders whose torch artefacts to load")
    ap.add_argument("--torch-ctx", type=int, default=2048)
    ap.add_argument("--torch-only", action="store_true", help="keep the llama.cpp rows of the last results")
    args = ap.parse_args()
    results = json.loads((args.run / "results.json").read_text())
    shape = fit.ModelShape(**results["base"]["fit"]["protocol"]["shape"])
    rows = []
    for name in [] if args.torch_only else results["variants"]:
        gguf_file = args.run / name / "model.gguf"
        if not gguf_file.is_file() or (args.only and name not in args.only):
            continue
        weights = sum(fit.weight_bytes_gguf(gguf_file).values())
        for ctx in args.ctx:
            for flash_attn in (False, True):
                out = subprocess.run([sys.executable, "-c", MEASURE, str(gguf_file), str(ctx), str(int(flash_attn))],
                                     capture_output=True, text=True, check=True)
                m = json.loads(out.stdout.strip().splitlines()[-1])
                kv = fit.kv_cache_bytes(shape, ctx, 1, "f16")
                compute = fit.compute_buffer_bytes(shape, ctx, flash_attn)
                work = fit.attention_work_bytes(shape, ctx, flash_attn)
                predicted = weights + kv + compute + work
                # on CPU only touched pages are resident: with one output row per batch the logits phase of the
                # compute buffer is never written, so the attention phase is what a decode touches
                resident = weights + kv + fit.compute_phases(shape, ctx, flash_attn)[1] + work
                measured = m["peak_rss"] - m["baseline_rss"]
                allocated = sum(m["llamacpp_buffers"].values())
                rows.append({"artefact": name, "ctx": ctx, "flash_attn": flash_attn, "weights": weights, "kv": kv,
                             "compute": compute, "work": work, "predicted": predicted, "resident": resident,
                             "llamacpp_compute": m["llamacpp_buffers"].get("CPU compute", 0.0),
                             "llamacpp_allocated": allocated, "measured": measured,
                             "error_vs_llamacpp": (predicted - work - allocated) / allocated,
                             "error": (predicted - measured) / measured,
                             "error_resident": (resident - measured) / measured, **m})
                print(json.dumps(rows[-1]), flush=True)
    torch_rows = {}
    for run in args.torch:
        res = json.loads((run / "results.json").read_text())
        shape_t = fit.ModelShape(**res["base"]["fit"]["protocol"]["shape"])
        for name in list(res["variants"])[:2]:
            out = subprocess.run([sys.executable, "-c", MEASURE_TORCH, str(run / name), str(args.torch_ctx)],
                                 capture_output=True, text=True, check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            dense = 4 * m["params"]  # fp32: transformers decompresses compressed-tensors checkpoints on CPU
            if "bitsandbytes" in m["loader"]:  # LLM.int8: linears int8 (+ fp32 row scales), the rest fp32
                linears = m["params"] - shape_t.vocab_size * shape_t.hidden_size
                dense = linears + 4 * (m["params"] - linears)
            kv = fit.kv_cache_bytes(shape_t, args.torch_ctx, 1, "f32")
            activations = args.torch_ctx * (3 * shape_t.intermediate_size + 4 * shape_t.hidden_size) * 4
            steady = m["steady_rss"] - m["baseline_rss"]
            prefill = m["prefill_peak_rss"] - m["steady_rss"]
            predicted, measured = dense + kv + activations, steady + prefill
            torch_rows[f"{run.name}/{name}"] = {
                "loader": m["loader"], "weights_predicted": dense, "steady_measured": steady, "kv": kv,
                "activations": activations, "prefill_predicted": kv + activations, "prefill_measured": prefill,
                "predicted": predicted, "measured": measured, "error": (predicted - measured) / measured,
                "load_peak": m["load_peak_rss"] - m["baseline_rss"], **m}
            print(json.dumps(torch_rows[f"{run.name}/{name}"]), flush=True)
    if args.torch_only:
        old = json.loads((HERE / "results" / "memory_check.json").read_text())
        rows = old["rows"]
    result = {"run": str(args.run), "runtime": "llama.cpp (llama-cpp-python 0.3.36), CPU, 2 threads, KV F16, "
              "n_batch = n_ubatch = 512, last logits only",
              "torch": {"ctx": args.torch_ctx, "rows": torch_rows,
                        "prediction": "weights after a warm-up forward: 4 bytes x parameters (transformers decompresses "
                                      "on CPU; LLM.int8: 1 byte per linear weight) + prefill: fp32 KV + "
                                      "activations ctx x (3 x intermediate + 4 x hidden) x 4 bytes (CPU sdpa's "
                                      "flash kernel keeps no ctx² scores)"},
              "prediction": "GGUF tensor bytes + KV (fit.kv_cache_bytes, f16) + fit.compute_buffer_bytes + "
                            "fit.attention_work_bytes (= fit.overhead_bytes minus the fixed 512 MiB GPU allowance)",
              "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "memory_check.json").write_text(json.dumps(result, indent=2))
    render(result)


def render(result: dict) -> None:
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    rows, torch_rows = result["rows"], result["torch"]["rows"]
    lines = [f"Predicted vs measured memory, {result['runtime']} ({result['run']})", "",
             "- predicted = weights + KV + compute buffer + f16 scores copy (quantize.fit, what a GPU is charged, "
             "minus the fixed 512 MiB GPU allowance)",
             "- llama.cpp alloc. = the buffers llama.cpp's log reports (model + repack + KV + compute + output)",
             "- resident pred. = the same with only the compute buffer's attention phase (decoding with one output "
             "row never writes the f32 logits phase, so those pages are not resident on CPU)",
             "- RSS = peak RSS after decoding ctx−1 tokens − RSS before loading (fresh process, libraries imported); "
             "'load' = RSS right after loading, before any decode", "",
             "| artefact | ctx | flash attn | weights | KV | compute pred. / llama.cpp | f16 scores | predicted "
             "| llama.cpp alloc. | error vs alloc. | resident pred. | RSS (load) | error vs RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['artefact']} | {r['ctx']} | {'on' if r['flash_attn'] else 'off'} | {mib(r['weights'])} "
                     f"| {mib(r['kv'])} | {mib(r['compute'])} / {mib(r['llamacpp_compute'])} | {mib(r['work'])} "
                     f"| {mib(r['predicted'])} | {mib(r['llamacpp_allocated'])} | {100 * r['error_vs_llamacpp']:+.1f}% "
                     f"| {mib(r['resident'])} | {mib(r['measured'])} ({mib(r['loaded_rss'] - r['baseline_rss'])}) "
                     f"| {100 * r['error_resident']:+.1f}% |")
    if torch_rows:
        lines += ["", f"torch runtime (fp32 on CPU): load, a 16-token warm-up forward, then a prefill of "
                  f"{result['torch']['ctx']} tokens with the KV cache kept (logits of the last position only). "
                  "Prediction: " + result["torch"]["prediction"], "",
                  "| artefact | loader | weights pred. | resident after warm-up | KV + activations pred. | "
                  "prefill peak − steady | predicted | measured | error | load peak |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in torch_rows.items():
            lines.append(f"| {name} | {r['loader'].split(' (')[0]} | {mib(r['weights_predicted'])} | "
                         f"{mib(r['steady_measured'])} | {mib(r['prefill_predicted'])} | {mib(r['prefill_measured'])} "
                         f"| {mib(r['predicted'])} | {mib(r['measured'])} | {100 * r['error']:+.1f}% | "
                         f"{mib(r['load_peak'])} |")
    (HERE / "results" / "memory_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
