"""Peak RSS of streamed GPTQ on a random-init Llama of ~1.8 B parameters (built here, saved as sharded fp16
safetensors), against the model's own size. Writes bench/results/streaming_rss.json.

Usage: python bench/streaming_rss.py [--samples 8] [--seq-len 256] [--workdir /tmp/quantize-rss] [--tag _x]
(e.g. MALLOC_MMAP_THRESHOLD_=131072 python bench/streaming_rss.py --tag _fixed_mmap_threshold: glibc then returns
freed large blocks at once instead of keeping them in the heap.)
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from quantize.measure import memory
from quantize.methods import gptq
from quantize.sources.models import BaseModel
from quantize.methods.configs import GptqMethod

CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=28,
              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False)


def build_model(folder: Path) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.float16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim == 2 else p.fill_(1.0)
    model.save_pretrained(folder, max_shard_size="500MB")
    del model
    # a tokenizer is part of every artefact; the bundled SmolLM2 one stands in (ids are random anyway)
    from quantize.sources.models import load_tokenizer, resolve_model

    load_tokenizer(resolve_model("bundled:smollm2-135m").path).save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def estimate(tokens: int) -> dict:
    """What the streamed build should hold, in bytes (fp32), at its largest: one decoder layer and its integer
    codes waiting to be written (int32, one per weight), the largest Hessian with the solver's copies of it (the
    caller's H, the solver's H, its Cholesky factor, the inverse and Hinv: 5 matrices), the calibration
    activations of one layer (input, x2, the stage inputs, output), and the embedding while it is used. Python,
    torch and the allocator's own slack are not in it."""
    h, inter, heads, kv_heads = (CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_attention_heads"],
                                 CONFIG["num_key_value_heads"])
    kv = h // heads * kv_heads
    layer = 4 * (2 * h * h + 2 * h * kv + 3 * h * inter)
    codes = layer  # int32 codes: 4 bytes per weight, like the fp32 layer
    hessian = 5 * 4 * max(h, inter) ** 2
    activations = 4 * tokens * (5 * h + inter)
    embedding = 4 * CONFIG["vocab_size"] * h
    return {"layer": layer, "codes": codes, "hessian_and_solver": hessian, "activations": activations,
            "embedding": embedding, "total": layer + codes + hessian + activations + embedding}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--workdir", default="/tmp/quantize-rss")
    ap.add_argument("--tag", default="", help="suffix of the result file, e.g. for a run under another allocator setting")
    args = ap.parse_args()
    work = Path(args.workdir)
    base_dir, out_dir = work / "llama-1.8b", work / "gptq"
    model_bytes = build_model(base_dir)
    n_params = json.loads((base_dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    calib = torch.randint(0, CONFIG["vocab_size"], (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    method = GptqMethod(name="gptq", bits=4, group_size=128, sym=True)
    memory.reset_peak()
    start_rss = memory.rss_bytes()
    start = time.perf_counter()
    gptq.build(method, BaseModel("random-llama", base_dir, "local"), out_dir, calib)
    seconds = time.perf_counter() - start
    result = {
        "model": {"params": n_params, "fp16_bytes_on_disk": model_bytes, "fp32_bytes": n_params * 4, "config": CONFIG},
        "calibration": {"samples": args.samples, "seq_len": args.seq_len, "tokens": "random ids, seed 0"},
        "method": method.model_dump(mode="json"),
        "peak_rss_bytes": memory.peak_rss_bytes(),
        "estimate": estimate(args.samples * args.seq_len),
        "rss_before_bytes": start_rss,
        "artefact_bytes": sum(p.stat().st_size for p in out_dir.glob("*.safetensors")),
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    dest = Path(__file__).parent / "results"
    dest.mkdir(exist_ok=True)
    (dest / f"streaming_rss{args.tag}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
