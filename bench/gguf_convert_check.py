"""Our HF → GGUF converter against llama.cpp's own convert_hf_to_gguf.py and against transformers.

1. F16 GGUF of SmolLM2-135M from both converters: every tensor's name, type and bytes, and every metadata key
   llama.cpp's file has (values compared), listed where they differ.
2. Our F32 GGUF run by llama.cpp (F32 KV cache) vs transformers fp32 on the same 512 held-out tokens: max |Δlogit|.
3. Tokenisation of the whole held-out text by llama.cpp (from our GGUF's metadata) vs the HF tokenizer.

llama.cpp's converter runs in another environment (it needs sentencepiece; it is not a dependency):
    python bench/gguf_convert_check.py --ref-python /tmp/gpmenv/bin/python --llama-cpp-src DIR/vendor/llama.cpp
where DIR is the unpacked llama-cpp-python 0.3.36 sdist. Writes bench/results/gguf_convert_check.{json,md}.
"""

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from quantize.formats.gguf_convert import convert
from quantize.runtimes.llamacpp import LlamaCppModel
from quantize.sources.models import load_model, load_tokenizer, resolve_model
from quantize.sources.texts import bundled_wiki

HERE = Path(__file__).resolve().parent
SKIP_KEYS = {"general.name", "general.basename", "general.size_label", "general.type", "general.finetune",
             "general.organization", "general.license", "general.languages"}  # naming, not model content


def fields(path: Path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - unreadable value types are compared by name only
            meta[key] = None
    tensors = {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in reader.tensors}
    return meta, tensors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref-python", required=True)
    ap.add_argument("--llama-cpp-src", required=True, type=Path)
    args = ap.parse_args()
    base = resolve_model("bundled:smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="gguf-check-"))
    ours = convert(base.path, work / "ours-f16.gguf", "F16")
    subprocess.run([args.ref_python, str(args.llama_cpp_src / "convert_hf_to_gguf.py"), str(base.path),
                    "--outtype", "f16", "--outfile", str(work / "ref-f16.gguf")], check=True, capture_output=True)
    m_ours, t_ours = fields(ours)
    m_ref, t_ref = fields(work / "ref-f16.gguf")
    tensor_diffs = sorted(n for n in set(t_ours) | set(t_ref) if t_ours.get(n) != t_ref.get(n))
    key_diffs = {k: {"ours": str(m_ours.get(k))[:80], "llama.cpp": str(m_ref.get(k))[:80]}
                 for k in sorted(set(m_ref) | set(m_ours)) if k not in SKIP_KEYS and m_ours.get(k) != m_ref.get(k)}

    tok = load_tokenizer(base.path)
    text = bundled_wiki("eval").text
    hf_ids = tok(text, add_special_tokens=False).input_ids
    f32 = convert(base.path, work / "ours-f32.gguf", "F32")
    model = LlamaCppModel(f32, n_ctx=512, kv_type="F32")
    ref = LlamaCppModel(work / "ref-f16.gguf", n_ctx=64)
    try:
        cpp_ids = model.llm.tokenize(text.encode(), add_bos=False, special=False)
        ref_ids = ref.llm.tokenize(text.encode(), add_bos=False, special=False)
        paragraphs = [p for p in text.split("\n\n") if p]
        differing = [p for p in paragraphs if tok(p, add_special_tokens=False).input_ids
                     != model.llm.tokenize(p.encode(), add_bos=False, special=False)]
        a = model.logits(hf_ids[:512])
    finally:
        model.close()
        ref.close()
    with torch.no_grad():
        b = load_model(base.path, "float32")(torch.tensor([hf_ids[:512]])).logits[0]
    result = {
        "model": "bundled:smollm2-135m", "tensors": len(t_ref), "tensor_differences": tensor_diffs,
        "metadata_keys_llama_cpp": len(m_ref), "metadata_differences": key_diffs,
        "f32_max_abs_logit_diff": (a - b).abs().max().item(), "f32_top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "logit_tokens": 512, "heldout_tokens_hf": len(hf_ids), "heldout_tokens_llama_cpp": len(cpp_ids),
        "tokenisation_identical": cpp_ids == hf_ids, "llama_cpp_same_ids_from_ref_gguf": ref_ids == cpp_ids,
        "paragraphs": len(paragraphs), "paragraphs_tokenised_differently": len(differing),
        "examples": [p[:120] for p in differing[:4]],
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "gguf_convert_check.json").write_text(json.dumps(result, indent=2))
    lines = ["GGUF conversion check, SmolLM2-135M", "",
             f"- F16 GGUF, ours vs llama.cpp convert_hf_to_gguf.py: {len(t_ref)} tensors, "
             f"{len(tensor_diffs)} differ in name/type/bytes {tensor_diffs[:5]}; metadata keys that differ "
             f"(naming keys excluded): {json.dumps(key_diffs) if key_diffs else 'none'}",
             f"- our F32 GGUF on llama.cpp (F32 KV) vs transformers fp32, 512 held-out tokens: max |Δlogit| "
             f"{result['f32_max_abs_logit_diff']:.3g}, top-1 agreement {100 * result['f32_top1_agreement']:.1f}%",
             f"- held-out text tokenised by llama.cpp from our GGUF vs HF tokenizer: identical = "
             f"{result['tokenisation_identical']} ({len(cpp_ids)} vs {len(hf_ids)} tokens); "
             f"{len(differing)} of {len(paragraphs)} paragraphs differ; llama.cpp gives the same ids from llama.cpp's "
             f"own converted file: {ref_ids == cpp_ids}; examples: {json.dumps([p[:80] for p in differing[:2]])}"]
    (HERE / "results" / "gguf_convert_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
