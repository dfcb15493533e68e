"""The GPU end-to-end check (run by bench/gpu_check.sh on a lent GPU): GPTQ, AWQ and RTN of a random-init Llama of
~1 B parameters (TinyLlama-1.1B's shape, a BPE vocabulary of 8192 trained on the bundled text) built on the GPU,
then evaluated on the GPU (perplexity, KLD against the base, speed), through `quantize run` with `device: cuda`.

    python bench/gpu_check.py --out DIR            → DIR/gpu_check.{md,json}
    python bench/gpu_check.py --out DIR --dry      → the same with a 2-layer 256-wide model on the CPU (checks the
                                                     script itself where no GPU is)

Per variant: build wall time, the GPU memory torch's allocator peaked at during the build (`peak_vram_bytes`),
perplexity, KLD, generation speed; protocol: calibration 32 × 512 tokens of bundled:wiki/calibration, evaluation
8 × 512 tokens of bundled:wiki/eval, float32 evaluation.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
           num_key_value_heads=4, max_position_embeddings=2048)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry", action="store_true", help="a tiny model on the CPU: checks this script")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu-check"))
    args = ap.parse_args()

    import torch

    from conftest import build_tiny_llama
    from quantize import pipeline
    from quantize.recipe import Recipe

    device = "cpu" if args.dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device")
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / ("tiny" if args.dry else "llama-1b")
    start = time.perf_counter()
    if not (model_dir / "config.json").is_file():
        build_tiny_llama(model_dir, vocab_size=512 if args.dry else 8192, **({} if args.dry else BIG))
    made_s = time.perf_counter() - start
    seq = 128 if args.dry else 512
    recipe = Recipe.model_validate({
        "name": "gpu-check", "model": str(model_dir), "device": device,
        "methods": [{"name": "gptq", "bits": 4, "group_size": 128, "sym": True},
                    {"name": "awq", "bits": 4, "group_size": 128},
                    {"name": "rtn", "bits": 4, "group_size": 128}],
        "calibration": {"source": "bundled:wiki", "samples": 8 if args.dry else 32, "seq_len": seq, "seed": 0},
        "eval": {"perplexity": {"source": "bundled:wiki", "n_ctx": seq, "max_chunks": 8},
                 "speed": {"prompt_tokens": 128, "gen_tokens": 32, "repetitions": 3, "threads": [1]},
                 "serve": {"enabled": False}},
        "fit": {"gpus": ["H100 SXM"], "contexts": [4096]},
        "output": str(args.work / "run")})
    start = time.perf_counter()
    out = pipeline.run(recipe, force=True)
    run_s = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    rows = []
    for name, v in results["variants"].items():
        made = json.loads((out / name / "manifest.json").read_text())["result"]
        speed = (v.get("speed") or {}).get("rows") or [{}]
        rows.append({"variant": name, "device": made.get("device"), "forward_dtype": made.get("forward_dtype"),
                     "build_s": v["build_s"], "peak_vram_bytes": made.get("peak_vram_bytes"),
                     "ppl": v["perplexity"]["ppl"], "kld": v["perplexity"]["kld"]["mean"],
                     "loader": v["loader"], "tg_median": speed[0].get("tg", {}).get("median"),
                     "pp_median": speed[0].get("pp", {}).get("median")})
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "CPU"
    summary = {"device": device, "gpu": gpu, "torch": torch.__version__, "model": str(model_dir),
               "model_built_s": made_s, "shape": None if args.dry else BIG, "run_s": run_s,
               "protocol": results["protocol"], "base_ppl": results["base"]["perplexity"]["ppl"], "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    gib = lambda b: "–" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
    fmt = lambda x, f: "–" if x is None else format(x, f)  # noqa: E731
    lines = [f"# GPU check ({'dry run on the CPU' if args.dry else gpu}, torch {torch.__version__})", "",
             f"`bash bench/gpu_check.sh` → `python bench/gpu_check.py`. Random-init Llama in {model_dir.name} "
             f"(built in {made_s:.0f} s), base PPL {summary['base_ppl']:.2f} (a random model: only the agreement "
             f"between variants means anything); the whole run {run_s:.0f} s.", "",
             "| variant | device | forward dtype | build s | peak VRAM (build) | PPL | KLD | pp t/s | tg t/s | loader |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['device']} | {r['forward_dtype']} | {r['build_s']:.1f} | "
                     f"{gib(r['peak_vram_bytes'])} | {r['ppl']:.3f} | {r['kld']:.5f} | {fmt(r['pp_median'], '.1f')} | "
                     f"{fmt(r['tg_median'], '.1f')} | {r['loader']} |")
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
