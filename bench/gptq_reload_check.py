"""The GPTQ compressed-tensors artefact, reloaded by plain `transformers.from_pretrained` on the CPU, against the
in-process quantized model: SmolLM2-135M with each decoder layer exactly as the streamed GPTQ left it (its linears
hold the dequantized codes, (q − zero)·scale, in float32) before it was packed and written.

Both are evaluated in float32 on the same held-out chunks (bundled:wiki eval); transformers decompresses the packed
weights to dense ones at load. Symmetric only: asymmetric pack-quantized checkpoints do not reload in transformers
5.23 + compressed-tensors 0.20 (llm-compressor#1618; the README's known limits).

Usage: python bench/gptq_reload_check.py [--samples 32] [--seq-len 512] [--group-size 64] [--chunks 4]
Writes bench/results/gptq_reload_check.{json,md}.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import compressed_tensors
import torch
import transformers

from quantize.methods import weight_only
from quantize.methods.registry import METHODS
from quantize.sources.models import load_model, load_tokenizer, resolve_model
from quantize.methods.configs import GptqMethod
from quantize.sources.texts import bundled_wiki, calibration_batches

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--chunks", type=int, default=4, help="held-out chunks of 512 tokens in the batch")
    args = ap.parse_args()
    base = resolve_model("bundled:smollm2-135m")
    tok = load_tokenizer(base.path)
    ids = torch.tensor(tok(bundled_wiki("calibration").text, add_special_tokens=False).input_ids)
    calib = calibration_batches(ids, args.samples, args.seq_len, seed=0)
    method = GptqMethod(name="gptq", bits=4, group_size=args.group_size, sym=True, device="cpu")

    in_process = {}  # every decoder layer's tensors as GPTQ left them, taken as the writer receives the layer
    write = weight_only.write_streamed

    def keep_layers(method, base, out_dir, meta, layers, pending, log, pack=True, checkpoint=None):
        def teed():
            for i, layer in layers:
                in_process.update({f"model.layers.{i}.{k}": v.clone() for k, v in layer.state_dict().items()})
                yield i, layer
        return write(method, base, out_dir, meta, teed(), pending, log, pack, checkpoint)

    weight_only.write_streamed = keep_layers
    out = Path(tempfile.mkdtemp(prefix="gptq-reload-")) / "artefact"
    out.mkdir()
    start = time.perf_counter()
    METHODS["gptq"].build(method, base, out, calib)
    build_s = time.perf_counter() - start
    weight_only.write_streamed = write

    model = load_model(base.path, "float32")
    missing, unexpected = model.load_state_dict(in_process, strict=False)
    assert not unexpected and all(".layers." not in k for k in missing), (missing, unexpected)
    reloaded = load_model(out, "float32")  # plain transformers; compressed-tensors decompresses at load
    text_ids = torch.tensor(tok(bundled_wiki("eval").text, add_special_tokens=False).input_ids)
    batch = text_ids[: args.chunks * 512].reshape(args.chunks, 512)
    with torch.no_grad():
        expected = model(batch).logits
        got = reloaded(batch).logits
    diff = (got - expected).abs()
    same_top = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    result = {"model": "bundled:smollm2-135m", "method": method.model_dump(), "calibration": [args.samples, args.seq_len],
              "build_seconds": build_s, "eval_dtype": "float32", "batch": list(batch.shape),
              "loader": f"transformers {transformers.__version__} from_pretrained + compressed-tensors "
                        f"{compressed_tensors.__version__}",
              "max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
              "max_logit_magnitude": expected.abs().max().item(), "same_top_token": same_top}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "gptq_reload_check.json").write_text(json.dumps(result, indent=2))
    line = (f"GPTQ W4A16 sym g{args.group_size} on SmolLM2-135M ({args.samples}×{args.seq_len} calibration, seed 0): the "
            f"compressed-tensors artefact reloaded by {result['loader']} against the in-process quantized model, both "
            f"float32, on {args.chunks}×512 held-out tokens: max |Δlogit| {result['max_abs_logit_diff']:.3g} (mean "
            f"{result['mean_abs_logit_diff']:.3g}, logits up to {result['max_logit_magnitude']:.1f}), same top token "
            f"{100 * same_top:.2f}%")
    (HERE / "results" / "gptq_reload_check.md").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
