"""Predicted against measured memory on this machine (CPU).

llama.cpp: GGUF artefacts of a run loaded by llama.cpp's runtime (llama-cpp-python) at a context of N tokens,
with flash attention off and on, then N-1 tokens decoded in 512-token batches with only the last logits kept
(as generation does). Three figures per row:
  predicted   quantize.fit: GGUF tensor bytes + KV cache (f16) + compute buffer + f16 scores copy (no flash
              attention), i.e. context_memory.overhead_bytes without the fixed 512 MiB GPU allowance a CPU process does not pay
  llama.cpp   the buffers llama.cpp itself reports in its log (model, repack, KV, compute, output): what the
              runtime allocates, i.e. what a GPU would be charged (the f16 scores copy is not in its log)
  resident    quantize.fit.cpu_resident: the same with what a CPU process really touches (repacked weight copies; the
              attention phase of the compute buffer only), against RSS: peak resident memory (VmHWM) after
              decoding minus the RSS before loading (Python, torch and llama_cpp already imported). A vocab_only
              load measures llama.cpp's host-side vocabulary tables, which the prediction leaves out.

torch (--torch RUN...): artefact folders loaded by their loader (quantize.runtimes.load), then a prefill of --torch-ctx
tokens with the KV cache kept and only the last position's logits (as generation does). Predicted:
quantize.fit.cpu_resident.torch_resident_bytes (tensors held, the checkpoint's mmap'd pages, KV, prefill activations).

Each measurement runs in a fresh process.

Usage: python bench/memory_check.py outputs/smollm2-gguf [--ctx 2048 8192] [--only gguf-f16 ...]
       [--torch outputs/smollm2-int8 ...] [--torch-variants NAME ...] [--torch-only]
Writes bench/results/memory_check.{json,md}.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MEASURE = """
import ctypes, json, re, sys
from pathlib import Path
from quantize.measure import memory
from quantize.runtimes.llamacpp import LlamaCppModel  # imports llama_cpp, numpy and torch: in before the baseline
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
from quantize.measure import memory
from quantize.common.heap import release_free_heap
from quantize.runtimes.load import load
import transformers, compressed_tensors  # libraries in before the baseline
path, n_ctx = Path(sys.argv[1]), int(sys.argv[2])
memory.reset_peak()
before = memory.rss_bytes()
model, loader, dtype = load(path, "float32", n_ctx)  # decompresses and trims the heap (load.load)
load_peak = memory.peak_rss_bytes()
ids = torch.randint(0, model.config.vocab_size, (1, n_ctx), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    model(ids[:, :16], use_cache=False, logits_to_keep=1)  # warm-up: lazy kernels and buffers
gc.collect()
untrimmed = memory.rss_bytes()
release_free_heap()
steady = memory.rss_bytes()
memory.reset_peak()
with torch.inference_mode():
    out = model(ids, use_cache=True, logits_to_keep=1)
peak = memory.peak_rss_bytes()
held = {t.data_ptr(): t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())}
print(json.dumps({"baseline_rss": before, "load_peak_rss": load_peak, "untrimmed_rss": untrimmed,
                  "steady_rss": steady, "prefill_peak_rss": peak, "tensor_bytes": sum(held.values()),
                  "checkpoint_rss": memory.mapped_file_rss_bytes(path), "dtype_bytes": next(model.parameters()).element_size(),
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "loader": loader}))
"""
# glibc raises its mmap threshold each time a large mmap'd block is freed (up to 32 MiB), after which large tensors
# come from the heap and freed ones stay in the process. Fixing the threshold at glibc's initial 128 KiB turns that
# off: every large tensor is mmap'd and returned when freed.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
VOCAB_ONLY = """
import json, sys
from quantize.measure import memory
from quantize.runtimes.llamacpp import binding
lib = binding()
before = memory.rss_bytes()
m = lib.Llama(sys.argv[1], vocab_only=True, verbose=False)
print(json.dumps({"vocab_rss": memory.rss_bytes() - before}))
del m
"""


def main() -> None:
    from quantize.fit import context_memory, cpu_resident
    from quantize.fit.shape import ModelShape
    from quantize.formats.tensors import weight_bytes_gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--ctx", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--only", nargs="*", default=["gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "gguf-q2_k"],
                    help="variant names (default: three sizes and Q2_K, whose Q4_0 fallbacks are repacked); "
                    "empty for every GGUF variant")
    ap.add_argument("--torch", nargs="*", type=Path, default=[], help="run folders whose torch artefacts to load")
    ap.add_argument("--torch-ctx", type=int, default=2048)
    ap.add_argument("--torch-variants", nargs="*", default=[], help="variant names (default: the first two of each run)")
    ap.add_argument("--torch-only", action="store_true", help="keep the llama.cpp rows of the last results")
    args = ap.parse_args()
    results = json.loads((args.run / "results.json").read_text())
    shape = ModelShape(**results["base"]["fit"]["protocol"]["shape"])
    rows = []
    for name in [] if args.torch_only else results["variants"]:
        gguf_file = args.run / name / "model.gguf"
        if not gguf_file.is_file() or (args.only and name not in args.only):
            continue
        weights = sum(weight_bytes_gguf(gguf_file).values())
        repack = cpu_resident.repack_bytes_gguf(gguf_file)
        out = subprocess.run([sys.executable, "-c", VOCAB_ONLY, str(gguf_file)], capture_output=True, text=True,
                             check=True)
        vocab = json.loads(out.stdout.strip().splitlines()[-1])["vocab_rss"]
        for ctx in args.ctx:
            for flash_attn in (False, True):
                out = subprocess.run([sys.executable, "-c", MEASURE, str(gguf_file), str(ctx), str(int(flash_attn))],
                                     capture_output=True, text=True, check=True)
                m = json.loads(out.stdout.strip().splitlines()[-1])
                kv = context_memory.kv_cache_bytes(shape, ctx, 1, "f16")
                compute = context_memory.compute_buffer_bytes(shape, ctx, flash_attn)
                work = context_memory.attention_work_bytes(shape, ctx, flash_attn)
                predicted = weights + kv + compute + work
                resident = cpu_resident.llamacpp_resident_bytes(weights, repack, shape, ctx, flash_attn)
                measured = m["peak_rss"] - m["baseline_rss"]
                allocated = sum(m["llamacpp_buffers"].values())
                rows.append({"artefact": name, "ctx": ctx, "flash_attn": flash_attn, "weights": weights, "kv": kv,
                             "compute": compute, "work": work, "predicted": predicted, "repack": repack,
                             "resident": resident, "vocab_rss": vocab,
                             "llamacpp_compute": m["llamacpp_buffers"].get("CPU compute", 0.0),
                             "llamacpp_allocated": allocated, "measured": measured,
                             "error_vs_llamacpp": (predicted + repack - work - allocated) / allocated,
                             "error_resident": (resident - measured) / measured,
                             "error_resident_vocab": (resident + vocab - measured) / measured, **m})
                print(json.dumps(rows[-1]), flush=True)
    torch_rows = {}
    for run in args.torch:
        res = json.loads((run / "results.json").read_text())
        shape_t = ModelShape(**res["base"]["fit"]["protocol"]["shape"])
        for name in args.torch_variants or list(res["variants"])[:2]:
            if not (run / name).is_dir():
                continue
            m, fixed = [json.loads(subprocess.run([sys.executable, "-c", MEASURE_TORCH, str(run / name),
                                                   str(args.torch_ctx)], capture_output=True, text=True, check=True,
                                                  env={**os.environ, **env}).stdout.strip().splitlines()[-1])
                        for env in ({}, FIXED_MMAP_THRESHOLD)]
            checkpoint = sum(f.stat().st_size for f in (run / name).glob("*.safetensors"))
            dtype_bytes = m["dtype_bytes"]
            kv = cpu_resident.torch_kv_bytes(shape_t, args.torch_ctx, dtype_bytes)
            activations = cpu_resident.torch_activation_bytes(shape_t, args.torch_ctx, dtype_bytes)
            predicted = cpu_resident.torch_resident_bytes(m["tensor_bytes"], checkpoint, shape_t, args.torch_ctx,
                                                        dtype_bytes)
            measured = {}
            for label, r in (("default", m), ("fixed", fixed)):
                steady, prefill = r["steady_rss"] - r["baseline_rss"], r["prefill_peak_rss"] - r["steady_rss"]
                measured[label] = {"steady": steady, "prefill": prefill, "total": steady + prefill,
                                   "error": (predicted - steady - prefill) / (steady + prefill),
                                   "untrimmed": r["untrimmed_rss"] - r["baseline_rss"]}
            torch_rows[f"{run.name}/{name}"] = {
                "loader": m["loader"], "checkpoint_bytes": checkpoint, "kv": kv, "activations": activations,
                "prefill_predicted": kv + activations, "predicted": predicted, "measured": measured,
                "load_peak": m["load_peak_rss"] - m["baseline_rss"], "raw": {"default": m, "fixed": fixed}}
            print(json.dumps(torch_rows[f"{run.name}/{name}"]), flush=True)
    if args.torch_only:
        old = json.loads((HERE / "results" / "memory_check.json").read_text())
        rows = old["rows"]
    result = {"run": str(args.run), "runtime": "llama.cpp (llama-cpp-python 0.3.36), CPU, 2 threads, KV F16, "
              "n_batch = n_ubatch = 512, last logits only",
              "torch": {"ctx": args.torch_ctx, "rows": torch_rows,
                        "prediction": "quantize.fit.cpu_resident.torch_resident_bytes: tensors the model holds after "
                                      "loading (decompressed to dense for compressed-tensors) + the checkpoint's "
                                      "safetensors bytes (transformers keeps the file mmap'd, its pages stay "
                                      "resident) + KV (model dtype) + prefill activations ctx x (3 x intermediate "
                                      "+ 4 x hidden) x dtype bytes (CPU sdpa's flash kernel keeps no ctx² scores)"},
              "prediction": "GGUF tensor bytes + KV (context_memory.kv_cache_bytes, f16) + compute_buffer_bytes + "
                            "attention_work_bytes (= overhead_bytes minus the fixed 512 MiB GPU allowance)",
              "resident_prediction": "quantize.fit.cpu_resident.llamacpp_resident_bytes: GGUF tensor bytes + repacked "
                                     "copies (cpu_resident.REPACKED_TYPES) + KV + the compute buffer's attention "
                                     "phase + f16 scores copy without flash attention",
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
             "- llama.cpp alloc. = the buffers llama.cpp's log reports (model + CPU_REPACK + KV + compute + output); "
             "its error compares predicted + repack − f16 scores copy (which llama.cpp does not log) with it",
             "- resident pred. = " + result["resident_prediction"].split(": ", 1)[1] + " (decoding with one output "
             "row never writes the f32 logits phase, so those pages are not resident on CPU)",
             "- RSS = peak RSS after decoding ctx−1 tokens − RSS before loading (fresh process, libraries imported); "
             "'load' = RSS right after loading, before any decode",
             "- vocab = RSS of a vocab_only load of the same GGUF (fresh process): llama.cpp's host-side vocabulary "
             "tables, which no GPU is charged and the prediction leaves out; the last column adds it", "",
             "| artefact | ctx | flash attn | weights | repack | KV | compute pred. / llama.cpp | f16 scores | predicted "
             "| llama.cpp alloc. | error vs alloc. | resident pred. | RSS (load) | error vs RSS | vocab | error vs RSS "
             "with vocab |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['artefact']} | {r['ctx']} | {'on' if r['flash_attn'] else 'off'} | {mib(r['weights'])} "
                     f"| {mib(r['repack'])} | {mib(r['kv'])} | {mib(r['compute'])} / {mib(r['llamacpp_compute'])} "
                     f"| {mib(r['work'])} | {mib(r['predicted'])} | {mib(r['llamacpp_allocated'])} "
                     f"| {100 * r['error_vs_llamacpp']:+.1f}% | {mib(r['resident'])} | {mib(r['measured'])} "
                     f"({mib(r['loaded_rss'] - r['baseline_rss'])}) | {100 * r['error_resident']:+.1f}% "
                     f"| {mib(r['vocab_rss'])} | {100 * r['error_resident_vocab']:+.1f}% |")
    if torch_rows:
        lines += ["", f"torch runtime on CPU: load (compressed-tensors decompressed, freed heap handed back), a "
                  f"16-token warm-up forward, then a prefill of {result['torch']['ctx']} tokens with the KV cache "
                  "kept (logits of the last position only). Prediction: " + result["torch"]["prediction"], "",
                  "- steady = RSS after the warm-up and malloc_trim − RSS before loading (in brackets: before that "
                  "second malloc_trim; load.load already trimmed once after decompressing); checkpoint mapped = resident pages of the artefact's mmap'd safetensors (smaps)",
                  "- measured twice per artefact, fresh processes: glibc's default allocator, and with "
                  "MALLOC_MMAP_THRESHOLD_=131072 (glibc's dynamic mmap threshold off: large tensors are mmap'd and "
                  "returned when freed instead of staying in the heap)", "",
                  "| artefact | loader | dtype | tensors held | checkpoint file / mapped | steady (before the 2nd trim) | "
                  "KV + activations pred. | prefill peak − steady: default / fixed threshold | predicted | measured: "
                  "default / fixed threshold | error: default / fixed threshold |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in torch_rows.items():
            d, f, raw = r["measured"]["default"], r["measured"]["fixed"], r["raw"]["default"]
            lines.append(f"| {name} | {r['loader'].split(' (')[0]} | {raw['dtype']} "
                         f"| {mib(raw['tensor_bytes'])} | {mib(r['checkpoint_bytes'])} / {mib(raw['checkpoint_rss'])} "
                         f"| {mib(d['steady'])} ({mib(d['untrimmed'])}) | {mib(r['prefill_predicted'])} "
                         f"| {mib(d['prefill'])} / {mib(f['prefill'])} | {mib(r['predicted'])} "
                         f"| {mib(d['total'])} / {mib(f['total'])} | {100 * d['error']:+.1f}% / {100 * f['error']:+.1f}% |")
    (HERE / "results" / "memory_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
