"""Our perplexity against llama.cpp's own `llama-perplexity` tool, on the same GGUF, text and protocol.

The protocol we claim is llama-perplexity's: the text tokenized whole, cut into non-overlapping n_ctx chunks,
the second half of each chunk scored, BOS in place of the first token only when the model adds one (SmolLM2
does not). Three figures per GGUF:
  1. llama-perplexity's "Final estimate" (its tokenizer, its scoring);
  2. ours on llama.cpp's runtime with llama.cpp's tokenization of the text (isolates our scoring code);
  3. ours as the pipeline runs it: the HF tokenizer's ids on llama.cpp's runtime.
1 and 2 should agree to rounding; 2 and 3 differ only by tokenization (see bench/results/gguf_convert_check.md:
llama.cpp's smollm pre-tokenizer splits a few paragraphs differently from the HF tokenizer).

llama-perplexity is not shipped by the llama-cpp-python wheel; build it from the same sdist (same llama.cpp):
  tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
  cmake -S . -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF
  cmake --build build --target llama-perplexity
Usage: python bench/llama_perplexity_check.py --binary PATH/llama-perplexity [GGUF ...] [--chunks 32]
Writes bench/results/llama_perplexity_check.{json,md}.
"""

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    from quantize.measure import quality
    from quantize.runtimes.llamacpp import LlamaCppModel
    from quantize.sources.models import bundled_gguf, load_tokenizer, resolve_model
    from quantize.sources.texts import load_text

    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="*", type=Path)
    ap.add_argument("--binary", type=Path, required=True)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ggufs = args.gguf or [bundled_gguf("smollm2-135m"), ROOT / "outputs/smollm2-gguf/gguf-q4_k_m/model.gguf"]
    text = load_text("bundled:wiki", "eval")
    text_file = Path(tempfile.mkdtemp()) / "wiki_eval.txt"
    text_file.write_text(text.text, encoding="utf-8")
    hf_tok = load_tokenizer(resolve_model("bundled:smollm2-135m").path)
    hf_chunks = quality.make_chunks(hf_tok, text, args.n_ctx, args.chunks)
    rows = []
    for g in [g for g in ggufs if g.is_file()]:
        t0 = time.perf_counter()
        out = subprocess.run([str(args.binary), "-m", str(g), "-f", str(text_file), "-c", str(args.n_ctx),
                              "--chunks", str(args.chunks), "-t", str(args.threads), "-b", str(args.n_ctx)],
                             capture_output=True, text=True)
        log = out.stdout + out.stderr
        final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
        if out.returncode != 0 or not final:
            raise SystemExit(f"llama-perplexity failed on {g}:\n{log[-3000:]}")
        tokenized = re.search(r"tokenizing the input \.\.\.\s*\n.*?tokenization took ([0-9.]+) ms", log, re.S)
        m = LlamaCppModel(g, n_ctx=args.n_ctx, threads=args.threads)
        try:
            ids = m.llm.tokenize(text.text.encode("utf-8"), add_bos=False, special=False)
            n = min(len(ids) // args.n_ctx, args.chunks)
            cpp_ids = torch.tensor(ids[: n * args.n_ctx], dtype=torch.long).reshape(n, args.n_ctx)
            cpp_chunks = quality.Chunks(cpp_ids, args.n_ctx, False, len(ids), text.describe(), "llama.cpp tokenizer")
            ours_cpp_tok = quality.score_model(m, cpp_chunks, None, f"{g.name} llama.cpp tokens")
            ours_hf_tok = quality.score_model(m, hf_chunks, None, f"{g.name} HF tokens")
        finally:
            m.close()
        same_ids = int((cpp_ids == hf_chunks.ids[:n]).all(dim=1).sum())
        rows.append({"gguf": str(g), "llama_perplexity": {"ppl": float(final.group(1)), "unc": float(final.group(2))},
                     "ours_llamacpp_tokens": ours_cpp_tok, "ours_hf_tokens": ours_hf_tok,
                     "text_tokens": {"llama.cpp": len(ids), "hf": hf_chunks.text_tokens},
                     "chunks_with_identical_ids": same_ids, "chunks": n, "tokenization_logged": bool(tokenized),
                     "seconds": time.perf_counter() - t0})
        ours = {"ours_cpp": ours_cpp_tok["ppl"], "ours_hf": ours_hf_tok["ppl"]}
        print(json.dumps(rows[-1]["llama_perplexity"] | ours), flush=True)
    result = {"protocol": {"text": text.describe(), "n_ctx": args.n_ctx, "chunks": args.chunks, "bos": "none",
                           "kv": "F16 (llama.cpp default, both)", "threads": args.threads, "binary": str(args.binary)},
              "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "llama_perplexity_check.json").write_text(json.dumps(result, indent=2))
    lines = [f"llama-perplexity (llama.cpp from the llama-cpp-python 0.3.36 sdist) against ours, text "
             f"{text.name} (sha256 {text.describe()['sha256'][:12]}), n_ctx {args.n_ctx}, {args.chunks} chunks, "
             "second half scored, no BOS, KV F16", "",
             "| GGUF | llama-perplexity | ours, llama.cpp tokens | Δ | ours, HF tokens (pipeline) | Δ | text tokens "
             "llama.cpp / HF | chunks with identical ids |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = r["llama_perplexity"]["ppl"]
        a, b = r["ours_llamacpp_tokens"]["ppl"], r["ours_hf_tokens"]["ppl"]
        lines.append(f"| {Path(r['gguf']).parent.name}/{Path(r['gguf']).name} | {ref:.4f} ± "
                     f"{r['llama_perplexity']['unc']:.4f} | {a:.4f} | {a - ref:+.4f} | {b:.4f} | {b - ref:+.4f} | "
                     f"{r['text_tokens']['llama.cpp']} / {r['text_tokens']['hf']} | "
                     f"{r['chunks_with_identical_ids']} / {r['chunks']} |")
    (HERE / "results" / "llama_perplexity_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
