"""What serving costs: the real SmolLM2-135M-Instruct through one artefact per engine, each behind its engine's
OpenAI-compatible server (the run's serve check, eval.serve), next to the same artefact's in-process decode rate.

    int8 W8A16 and RTN W4 g64 (compressed-tensors)  → transformers serve
    RTN W4 g64 as MLX                                → mlx-lm's server where MLX has Metal; on this CPU the
                                                       check says why it is skipped (float16 on MLX's CPU backend)
    GGUF Q8_0 and Q4_K_M (imatrix)                   → llama-cpp-python's server

One `quantize run` of the recipe below (2 threads for the in-process tg and llama.cpp's server; 8 requests at
concurrency 4, 64 tokens each; 5 streamed completions for TTFT and the API decode rate, medians), then a table:
TTFT, API decode t/s, in-process tg t/s (llama-bench semantics, median of 5), their ratio, and the aggregate
t/s at concurrency 4 with its ratio to one stream.

Usage: python bench/serve_check.py [--output DIR]   Writes bench/results/serve_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

RECIPE = {
    "name": "serve-check",
    "model": "bundled:smollm2-135m",
    "methods": [
        {"name": "int8", "scheme": "w8a16"},
        {"name": "rtn", "bits": 4, "group_size": 64, "sym": True},
        {"name": "rtn", "bits": 4, "group_size": 64, "sym": True, "format": "mlx"},
        {"name": "gguf", "type": "Q8_0"},
        {"name": "gguf", "type": "Q4_K_M", "imatrix": True},
    ],
    "calibration": {"samples": 32, "seq_len": 512},
    "eval": {"perplexity": {"n_ctx": 512, "max_chunks": 8},
             "speed": {"prompt_tokens": 128, "gen_tokens": 64, "repetitions": 5, "threads": [2]},
             "serve": {"enabled": True, "requests": 8, "concurrency": 4, "max_tokens": 64, "repetitions": 5}},
    "fit": {"gpus": ["RTX 4090"], "contexts": [4096]},
}


def main() -> None:
    from quantize.common.files import versions
    from quantize.measure import serving
    from quantize.measure.speed import cpu_model
    from quantize.recipe import load_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--output", type=Path, default=Path(tempfile.mkdtemp(prefix="serve-check-")) / "run")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (args.output / "results.json").is_file():
        recipe_file = args.output.parent / "serve-check.yaml"
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(json.dumps({**RECIPE, "output": str(args.output)}))
        done = subprocess.run([sys.executable, "-m", "quantize.cli", "run", str(recipe_file)], cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"quantize run failed ({done.returncode})")
    results = json.loads((args.output / "results.json").read_text())
    recipe = load_recipe(args.output / "recipe.yaml")

    rows = []
    for name, v in results["variants"].items():
        s, tg_rows = v["serve"], v["speed"]["rows"]
        row = {"variant": name, "format": v["format"], "loader": v["loader"], "status": s["status"],
               "engine": s.get("engine"), "kld": v["perplexity"]["kld"]["mean"],
               "tg_in_process": max(r["tg"]["median"] for r in tg_rows)}
        if s["status"] == "ok":
            st, cc = s["stream"], s["concurrent"]
            row.update(ttft_ms=1000 * st["ttft_s"], api_decode=st["decode_tokens_per_s"],
                       tokens_from=st["tokens_from"], concurrent=cc["tokens_per_s"], requests=cc["requests"],
                       concurrency=cc["concurrency"], answer=s["answer"][:80])
            row["api_over_in_process"] = row["api_decode"] / row["tg_in_process"]
            row["concurrent_over_one"] = row["concurrent"] / row["api_decode"]
            again = serving.check(args.output / name, recipe.eval.serve, threads=2,
                                  dtype="float32" if v["eval_dtype"] == "float32" else None)  # the same check again
            row["again"] = {"ttft_ms": 1000 * again["stream"]["ttft_s"],
                            "api_decode": again["stream"]["decode_tokens_per_s"],
                            "concurrent": again["concurrent"]["tokens_per_s"]} if again["status"] == "ok" else again
        else:
            row["reason"] = s.get("reason")
        rows.append(row)

    out = {"recipe": RECIPE, "cpu": cpu_model(), "cpu_count": os.cpu_count(), "versions": versions(),
           "protocol": results["variants"][rows[0]["variant"]]["serve"].get("prompt"), "rows": rows}
    (HERE / "results" / "serve_check.json").write_text(json.dumps(out, indent=1))
    lines = ["# Serve check: SmolLM2-135M-Instruct behind each engine's OpenAI-compatible server", "",
             f"`python bench/serve_check.py` on {out['cpu']} ({out['cpu_count']} cores). One `quantize run` (recipe in "
             "serve_check.json): each variant's server on a free loopback port, the official `openai` client; greedy "
             "answers of at most 64 tokens to one fixed prompt. TTFT and API decode (tokens − 1 over first to last "
             "streamed chunk): medians of 5 streamed completions. In-process tg: llama-bench semantics (64 random "
             "tokens one by one from an empty cache), median of 5, on the runtime the artefact loads into, 2 threads "
             "(llama.cpp's server also runs 2 threads; transformers, mlx-lm and torch use their defaults). "
             "Concurrent: 8 completions 4 at a time, completion tokens over the wall time. \"Again\": the same serve check "
             "run a second time on the same artefact after the run, a fresh server.", "",
             "| variant | engine | status | KLD | TTFT ms | API decode t/s | in-process tg t/s | API / in-process "
             "| t/s at concurrency 4 | concurrent / one stream | again: TTFT ms, API decode, concurrent |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['engine']} | {r['status']}: {r.get('reason')} | {r['kld']:.4f} "
                         f"| – | – | {r['tg_in_process']:.1f} | – | – | – | – |")
            continue
        lines.append(f"| {r['variant']} | {r['engine']} | ok | {r['kld']:.4f} | {r['ttft_ms']:.0f} | "
                     f"{r['api_decode']:.1f} | {r['tg_in_process']:.1f} | {r['api_over_in_process']:.2f} | "
                     f"{r['concurrent']:.1f} | {r['concurrent_over_one']:.2f} | "
                     f"{r['again']['ttft_ms']:.0f}, {r['again']['api_decode']:.1f}, {r['again']['concurrent']:.1f} |")
    lines += ["", "Answers (first 80 characters):", ""]
    lines += [f"- {r['variant']}: {r.get('answer', r.get('reason'))!r}" for r in rows]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items() if v), ""]
    (HERE / "results" / "serve_check.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
