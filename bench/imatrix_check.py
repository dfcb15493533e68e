"""Our imatrix.gguf read by llama.cpp's own `llama-quantize`: quantize our F16 GGUF with it and compare every tensor
with the variant our pipeline built in-process (llama_model_quantize + the same importance matrix).

Usage: python bench/imatrix_check.py --llama-quantize <llama.cpp build>/bin/llama-quantize
       [--run outputs/smollm2-gguf] [--types Q4_K_M Q2_K Q3_K_M]
(llama-quantize is built from the llama-cpp-python sdist; see bench/llama_perplexity_check.py.)
Writes bench/results/imatrix_check.{json,md}.
"""

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import gguf
import numpy as np

HERE = Path(__file__).resolve().parent


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-quantize", required=True)
    ap.add_argument("--run", type=Path, default=Path("outputs/smollm2-gguf"))
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q2_K", "Q3_K_M"])
    args = ap.parse_args()
    f16 = args.run / "gguf-f16" / "model.gguf"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types:
            ours = args.run / f"gguf-{kind.lower()}-imat"
            out = Path(tmp) / f"{kind}.gguf"
            log = subprocess.run([args.llama_quantize, "--imatrix", str(ours / "imatrix.gguf"), str(f16), str(out),
                                  kind, "2"], capture_output=True, text=True, check=True)
            loaded = [line.strip() for line in (log.stdout + log.stderr).splitlines() if "load_imatrix: loaded" in line]
            a, b = tensors(out), tensors(ours / "model.gguf")
            same = sum(a[n] == b.get(n) for n in a)
            rows.append({"type": kind, "tensors": len(a), "identical": same, "llama_quantize_log": loaded,
                         "differing": [n for n in a if a[n] != b.get(n)][:10]})
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "imatrix_check.json").write_text(json.dumps(rows, indent=2))
    lines = [f"Our imatrix.gguf given to llama.cpp's llama-quantize on {f16}, against our in-process variant "
             f"({args.run}/gguf-<type>-imat/model.gguf)", "",
             "| type | tensors | identical (type and bytes) | llama-quantize says |", "|---|---|---|---|"]
    lines += [f"| {r['type']} | {r['tensors']} | {r['identical']} | {'; '.join(r['llama_quantize_log'])} |" for r in rows]
    (HERE / "results" / "imatrix_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
