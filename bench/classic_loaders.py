"""The classic `gptq` and `awq` layouts loaded by the real loader of that format: transformers with GPTQModel
(the backend transformers 5 uses for both), in its own environment, against our own unpacking of the same files.

    python3 -m venv /tmp/gpmenv && /tmp/gpmenv/bin/pip install torch==2.13.0 \
        && /tmp/gpmenv/bin/pip install -c constraints.txt -e . \
        && /tmp/gpmenv/bin/pip install --no-deps gptqmodel==7.7.0 \
        && /tmp/gpmenv/bin/pip install -c <(echo torch==2.13.0; echo transformers==5.23.0; echo numpy==2.4.6) \
           threadpoolctl device-smi protobuf pillow requests pypcre tokenicer logbar ninja maturin dill defuser torchao \
           optimum
    python bench/classic_loaders.py --loader-python /tmp/gpmenv/bin/python

(GPTQModel 7.7.0 asks for torch>=2.14.1, hence --no-deps; it imports and runs on 2.13.0 CPU. transformers' GPTQ
path also imports optimum.) Builds SmolLM2 AWQ
(asym g64, `format: awq`) and GPTQ (sym g64 and asym g64, `format: gptq`; asym is written as gptq_v2) from 16 × 512 calibration tokens, loads each both
ways, and compares logits on a held-out chunk. Writes bench/results/classic_loaders.{json,md}.
"""

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from quantize.formats import classic
from quantize.methods.registry import METHODS
from quantize.sources.models import load_tokenizer, resolve_model
from quantize.methods.configs import AwqMethod, GptqMethod
from quantize.sources.texts import bundled_wiki, calibration_batches

HERE = Path(__file__).resolve().parent
LOAD = """
import json, sys, numpy as np, torch, transformers, gptqmodel
from transformers import AutoModelForCausalLM
folder, ids_file, out = sys.argv[1], sys.argv[2], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map="cpu")
ids = torch.tensor(np.load(ids_file))
with torch.no_grad():
    logits = model(ids).logits[0].float().numpy()
np.save(out, logits)
q = model.model.layers[0].self_attn.q_proj
print(json.dumps({"q_proj_class": type(q).__module__ + "." + type(q).__name__, "gptqmodel": gptqmodel.__version__,
                  "transformers": transformers.__version__, "torch": torch.__version__, "dtype": "float16"}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loader-python", required=True)
    ap.add_argument("--only", choices=["awq", "gptq", "gptq-asym"],
                    help="build and check one layout (rows of the others are kept)")
    args = ap.parse_args()
    base = resolve_model("bundled:smollm2-135m")
    tok = load_tokenizer(base.path)
    ids_all = torch.tensor(tok(bundled_wiki("calibration").text, add_special_tokens=False).input_ids)
    calib = calibration_batches(ids_all, 16, 512, seed=0)
    eval_ids = np.array([tok(bundled_wiki("eval").text[:6000], add_special_tokens=False).input_ids[:256]])
    work = Path(tempfile.mkdtemp(prefix="classic-"))
    np.save(work / "ids.npy", eval_ids)
    previous = HERE / "results" / "classic_loaders.json"
    rows = json.loads(previous.read_text()) if args.only and previous.is_file() else {}
    for method in [AwqMethod(name="awq", bits=4, group_size=64, sym=False, format="awq"),
                   GptqMethod(name="gptq", bits=4, group_size=64, sym=True, format="gptq"),
                   GptqMethod(name="gptq", bits=4, group_size=64, sym=False, format="gptq")]:  # written as gptq_v2
        kind = method.name + ("" if method.sym or method.name == "awq" else "-asym")
        if args.only and kind != args.only:
            continue
        folder = work / method.default_variant()
        folder.mkdir()
        METHODS[method.name].build(method, base, folder, calib)
        proc = subprocess.run([args.loader_python, "-c", LOAD, str(folder), str(work / "ids.npy"),
                               str(work / "theirs.npy")], capture_output=True, text=True)
        if proc.returncode != 0:
            rows[folder.name] = {"error": proc.stderr[-3000:]}
            continue
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        theirs = torch.tensor(np.load(work / "theirs.npy"))
        with torch.no_grad():
            ours = classic.load_dense(folder)(torch.tensor(eval_ids)).logits[0]
        ids = torch.tensor(eval_ids[0])
        nll = lambda lg: torch.nn.functional.cross_entropy(lg[:-1], ids[1:]).item()  # noqa: E731
        rows[folder.name] = {**info, "max_abs_logit_diff": (theirs - ours).abs().max().item(),
                             "top1_agreement": (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item(),
                             "ppl_theirs": float(np.exp(nll(theirs))), "ppl_ours": float(np.exp(nll(ours))),
                             "tokens": int(ids.numel())}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "classic_loaders.json").write_text(json.dumps(rows, indent=2))
    lines = ["Classic layouts: transformers + GPTQModel (fp16, CPU) vs quantize's unpacking (fp32), SmolLM2-135M, "
             "one held-out chunk of 256 tokens", "",
             "| artefact | loaded as | max abs Δlogit | top-1 agreement | PPL GPTQModel | PPL ours |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | FAILED: {r['error'].strip().splitlines()[-1][:200]} | | | | |")
        else:
            lines.append(f"| {name} | {r['q_proj_class']} | {r['max_abs_logit_diff']:.4f} | {100 * r['top1_agreement']:.1f}% "
                         f"| {r['ppl_theirs']:.3f} | {r['ppl_ours']:.3f} |")
    (HERE / "results" / "classic_loaders.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
