"""The sha256 of every file each variant of a recipe writes, through the `quantize run` command only (so it runs
unchanged on any version of the code, e.g. before and after a refactor that must not change a byte).

The recipe's methods and calibration are kept as they are; evaluation is cut to one chunk without speed, KLD or
lm-eval tasks, which cannot change an artefact's bytes. The hashes are the ones `quantize run` records in each
variant's manifest.json (every file but manifest.json and results.json). The per-layer log quantize-log.jsonl
holds each solve's wall time, so it differs between any two runs; it is also hashed with its `seconds` fields
dropped ("quantize-log.jsonl without seconds"), which must not differ.

    python bench/artefact_hashes.py recipes/smollm2-gptq.yaml --out bench/results/artefact_hashes-gptq.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--only", nargs="*", help="keep only these method indexes (0-based)", type=int)
    parser.add_argument("--out", type=Path, required=True, help="JSON file: variant → file → sha256")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose `quantize` package runs")
    args = parser.parse_args()

    recipe = yaml.safe_load(args.recipe.read_text())
    methods = recipe.pop("methods", None) or [recipe.pop("method")]
    if args.only:
        methods = [methods[i] for i in args.only]
    recipe["methods"] = methods
    recipe["eval"] = {"perplexity": {**recipe.get("eval", {}).get("perplexity", {}), "max_chunks": 1},
                      "kld": False, "speed": {"enabled": False}}
    with tempfile.TemporaryDirectory() as tmp:
        recipe["output"] = str(Path(tmp) / "run")
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        start = time.perf_counter()
        subprocess.run([args.python, "-m", "quantize.cli", "run", str(path)], check=True)
        seconds = time.perf_counter() - start
        out = {}
        for manifest in sorted(Path(recipe["output"]).glob("*/manifest.json")):
            files = json.loads(manifest.read_text())["files"]
            out[manifest.parent.name] = {name: f["sha256"] for name, f in files.items()}
            log = manifest.parent / "quantize-log.jsonl"
            if log.is_file():
                rows = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in log.open()]
                digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
                out[manifest.parent.name]["quantize-log.jsonl without seconds"] = digest
    result = {"recipe": str(args.recipe), "methods": methods, "run_seconds": round(seconds, 1),
              "code": subprocess.run([args.python, "-c", "import quantize; print(quantize.__file__)"],
                                     capture_output=True, text=True).stdout.strip(),
              "variants": out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for variant, files in out.items():
        for name, digest in files.items():
            print(f"{variant}/{name}  {digest}")


if __name__ == "__main__":
    main()
