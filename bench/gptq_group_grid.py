"""GPTQ group grids, ours against the reference's (issue 20): where a group's scale and zero come from when groups
are not static. "updated" (our default) takes the weights with every column's error feedback so far; "reference"
takes W as IST-DASLab's fasterquant and llm-compressor do, whose columns in the current block lack that block's
feedback. They differ when group_size < block_size (128).

SmolLM2-135M-Instruct (bundled), 128 × 512 calibration tokens of bundled:wiki, three calibration draws (seeds 0, 1,
2, as bench/reference.py), W4 asym g64 (the bundled recipes' group size) with both grids; KLD to the base on the
held-out text (16 chunks × 512). Medians over the draws, and the per-draw differences (paired: the same draw, the
same positions). At g128 the two grids are the same by construction: with block_size 128 every group starts at a
block's first column, where W and the block's copy are equal (tests/test_gptq.py checks the codes are identical).

    python bench/gptq_group_grid.py   → bench/results/gptq_group_grid.{md,json}
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = [
    {"name": "gptq", "bits": 4, "group_size": 64, "sym": False},
    {"name": "gptq", "bits": 4, "group_size": 64, "sym": False, "group_grid": "reference"},
]


def main() -> None:
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (0, 1, 2):
            recipe = {"name": f"grid-{seed}", "model": "bundled:smollm2-135m", "methods": VARIANTS,
                      "calibration": {"source": "bundled:wiki", "samples": 128, "seq_len": 512, "seed": seed},
                      "eval": {"perplexity": {"source": "bundled:wiki", "n_ctx": 512, "max_chunks": 16},
                               "speed": {"enabled": False}},
                      "fit": {"gpus": ["RTX 4090"], "contexts": [4096]}, "output": str(Path(tmp) / f"grid-{seed}")}
            path = Path(tmp) / f"grid-{seed}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            subprocess.run([sys.executable, "-m", "quantize.cli", "run", str(path)], check=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
            results = json.loads((Path(tmp) / f"grid-{seed}" / "results.json").read_text())
            runs[seed] = {"variants": {n: {"kld": v["perplexity"]["kld"]["mean"], "kld_unc": v["perplexity"]["kld"]["unc"],
                                           "ppl": v["perplexity"]["ppl"], "build_s": v["build_s"]}
                                       for n, v in results["variants"].items()},
                          "paired": results["paired_kld"], "noise_floor": results["base"]["perplexity"]["noise_floor"],
                          "base_ppl": results["base"]["perplexity"]["ppl"]}
    pairs = [("gptq-w4-asym-g64", "gptq-w4-asym-g64-refgrid")]
    lines = ["# GPTQ group grids: ours (updated) against the reference's (bench/gptq_group_grid.py)", "",
             "SmolLM2-135M-Instruct, 128 × 512 calibration tokens (draws seed 0, 1, 2), KLD on 16 × 512 held-out "
             "tokens of bundled:wiki (7,920 positions); this 2-core CPU.", "",
             "| variant | KLD seed 0 | seed 1 | seed 2 | median |", "|---|---|---|---|---|"]
    summary = {}
    for name in runs[0]["variants"]:
        klds = [runs[s]["variants"][name]["kld"] for s in (0, 1, 2)]
        summary[name] = statistics.median(klds)
        lines.append(f"| {name} | " + " | ".join(f"{k:.5f}" for k in klds) + f" | {summary[name]:.5f} |")
    lines += ["", "Paired differences, updated − reference, on the same draw and positions (± paired standard "
              "error, z):", "", "| pair | seed 0 | seed 1 | seed 2 |", "|---|---|---|---|"]
    for ours, ref in pairs:
        cells = []
        for s in (0, 1, 2):
            d = runs[s]["paired"].get(f"{ours} − {ref}") or runs[s]["paired"].get(f"{ref} − {ours}")
            sign = 1 if f"{ours} − {ref}" in runs[s]["paired"] else -1
            z = "–" if d["z"] is None else f"{sign * d['z']:+.1f}"
            cells.append(f"{sign * d['difference']:+.5f} ± {d['unc']:.5f} (z {z})")
        lines.append(f"| {ours} − reference grid | " + " | ".join(cells) + " |")
    floors = [runs[s]["noise_floor"]["kld_mean"] for s in (0, 1, 2)]
    lines += ["", f"Noise floor (base vs base with bf16-rounded logits): {statistics.median(floors):.2e}.", ""]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gptq_group_grid.json").write_text(json.dumps({"runs": runs, "median_kld": summary}, indent=1) + "\n")
    (RESULTS / "gptq_group_grid.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
