"""A model bigger than this machine's memory, built and evaluated: GPTQ W4 of a random-init Llama with
Llama-3.1-8B's shape (8.03 B parameters, 16 GB of fp16 shards; in float32 it would need 32 GB, this machine has
24 GB), then its perplexity and KLD streamed layer by layer (`eval.stream`) against the base, also streamed.

    python bench/big_model.py [--samples 8] [--seq-len 128] [--chunks 2] → bench/results/big_model.{md,json}
    python bench/big_model.py --layers 2   → bench/results/big_model_2l.{md,json}: the same shape with 2 decoder
                                             layers (a few minutes: the memory terms per layer, checked quickly)

The model: hidden 4096, MLP 14336, 32 layers, 32 query / 8 KV heads, vocabulary 128256 (Llama 3's size; the text
is tokenized with SmolLM2's 49152-token tokenizer, so only those rows are ever read by the embedding, every row of
the output head is scored), weights N(0, 0.01) (norms 1), written shard by shard (one per layer) so that the
writer never holds more than one layer. One `quantize run` in a child process: GPTQ W4 g128 symmetric on
`--samples` × `--seq-len` tokens of bundled:wiki calibration, then the base and the artefact evaluated with
`eval.stream: true` on `--chunks` × 512 tokens of bundled:wiki/eval (second half scored), float32, 2 threads.

Measured by the run itself: the build's time and peak RSS (manifest), the base's and the artefact's evaluation time
and peak RSS (VmHWM reset before each step). Predicted: the run's own preflight estimate per step
(quantize/fit/build_memory.py via preflight.memory_needed: the process, plus one layer, the calibration
activations, the widest Hessian and the embedding for the build; the stream's largest tensor or layer and every
chunk's hidden states for the evaluation). Random weights: the PPL is near the vocabulary size and says nothing
of quality; the point is memory and time at this size, and that the numbers are finite and the KLD is small.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "outputs" / "bench-big-model"
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
             rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def layer_tensors(i: int) -> dict[str, tuple[int, ...]]:
    h, inter = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    kv = SHAPE["num_key_value_heads"] * h // SHAPE["num_attention_heads"]
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter)}


def build(folder: Path) -> int:
    """Write the random-init checkpoint shard by shard; the index last (its presence marks a finished folder)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from quantize.sources.models import resolve_model

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["metadata"]["total_size"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    h, vocab, layers = SHAPE["hidden_size"], SHAPE["vocab_size"], SHAPE["num_hidden_layers"]
    shards = [{"model.embed_tokens.weight": (vocab, h)}] + [layer_tensors(i) for i in range(layers)] \
        + [{"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}]
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape in shard.items():
            t = torch.empty(shape, dtype=torch.float16)
            t.fill_(1.0) if len(shape) == 1 else t.normal_(0, 0.01, generator=gen)
            tensors[key] = t
            weight_map[key] = name
            total += t.numel() * 2
        save_file(tensors, folder / name, metadata={"format": "pt"})
        del tensors
    AutoConfig.for_model("llama", **SHAPE).save_pretrained(folder)
    smollm2 = resolve_model("bundled:smollm2-135m").path
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2 / name).is_file():
            shutil.copy(smollm2 / name, folder / name)
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def mem_total() -> int:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal:"))
    return int(line.split()[1]) * 1024


def recipe(folder: Path, samples: int, seq_len: int, chunks: int, run_dir: Path) -> dict:
    return {"name": "big-model", "model": str(folder),
            "methods": [{"name": "gptq", "bits": 4, "group_size": 128, "sym": True}],
            "calibration": {"source": "bundled:wiki", "samples": samples, "seq_len": seq_len, "seed": 0},
            "eval": {"stream": True, "perplexity": {"source": "bundled:wiki", "n_ctx": 512, "max_chunks": chunks},
                     "speed": {"enabled": False}, "serve": {"enabled": False}},
            "fit": {"gpus": ["RTX 4090", "H100 SXM"], "contexts": [8192]}, "output": str(run_dir)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="decoder layers (Llama-3.1-8B: "
                    "32); fewer: the per-layer memory terms at this shape, quickly")
    ap.add_argument("--report-only", action="store_true", help="the table again from the finished run (the "
                    "predictions from the current code), keeping the times recorded by the run")
    args = ap.parse_args()
    from quantize import preflight
    from quantize.recipe import load_recipe

    full = args.layers == SHAPE["num_hidden_layers"]
    SHAPE["num_hidden_layers"] = args.layers
    tag = "" if full else f"_{args.layers}l"
    folder = OUT / f"llama-8b-random{tag}"
    dest = ROOT / "bench" / "results"
    path = OUT.with_name(OUT.name + tag + ".yaml")
    run_dir = OUT / f"run{tag}"
    if args.report_only:
        before = json.loads((dest / f"big_model{tag}.json").read_text())
        checkpoint_bytes, made_s, run_s = build(folder), before["checkpoint_written_s"], before["run_s"]
    else:
        start = time.perf_counter()
        checkpoint_bytes = build(folder)
        made_s = time.perf_counter() - start
        path.write_text(yaml.safe_dump(recipe(folder, args.samples, args.seq_len, args.chunks, run_dir),
                                       sort_keys=False))
    plan = preflight.plan(load_recipe(path))
    predicted = plan["memory_bytes"]
    if not args.report_only:
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "quantize.cli", "run", str(path)], check=True, cwd=ROOT)
        run_s = time.perf_counter() - start
    results = json.loads((run_dir / "results.json").read_text())
    (name, v), = results["variants"].items()
    base = results["base"]
    cache = base["perplexity_cache"]
    artefact = sum(f.stat().st_size for f in (run_dir / name).glob("*.safetensors"))
    params = plan["base"]["bytes"] // 2
    out = {
        "model": f"random-init Llama, Llama-3.1-8B's shape{'' if full else f' with {args.layers} layers'} {SHAPE}, "
                 f"{params / 1e9:.2f} B parameters, "
                 f"{checkpoint_bytes / 1e9:.2f} GB fp16 shards (one per layer)",
        "machine_memory_bytes": mem_total(),
        "calibration": f"{args.samples} × {args.seq_len} tokens of bundled:wiki (seed 0)",
        "eval": f"{args.chunks} chunks × 512 tokens of bundled:wiki/eval, second half scored, float32, streamed",
        "protocol": results["protocol"], "checkpoint_bytes": checkpoint_bytes, "checkpoint_written_s": made_s,
        "run_s": run_s,
        "artefact_bytes": artefact, "predicted_bytes": predicted,
        "steps": [
            {"step": f"build ({name})", "seconds": v["build_s"], "peak_rss_bytes": v["build_peak_rss_bytes"],
             "predicted_bytes": predicted["method"]},
            {"step": "base evaluation (streamed)", "seconds": cache.get("seconds"),
             "peak_rss_bytes": cache.get("peak_rss_bytes"), "predicted_bytes": predicted["eval.stream"]},
            {"step": f"{name} evaluation (streamed)", "seconds": v["eval_s"], "peak_rss_bytes": v["eval_peak_rss_bytes"],
             "predicted_bytes": predicted["eval.stream"]},
        ],
        "base_ppl": base["perplexity"]["ppl"], "variant_ppl": v["perplexity"]["ppl"],
        "kld": v["perplexity"]["kld"]["mean"], "kld_unc": v["perplexity"]["kld"]["unc"],
        "same_top": v["perplexity"]["kld"]["same_top"],
    }
    (dest / f"big_model{tag}.json").write_text(json.dumps(out, indent=1))
    gib = lambda b: "–" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
    title = "A model bigger than memory: GPTQ W4 and streamed evaluation of an 8 B Llama on a 24 GB machine" if full \
        else f"GPTQ W4 and streamed evaluation at Llama-3.1-8B's shape with {args.layers} layers (per-layer memory)"
    lines = [f"# {title}", "",
             f"`python bench/big_model.py --samples {args.samples} --seq-len {args.seq_len} --chunks {args.chunks}"
             f"{'' if full else f' --layers {args.layers}'}` "
             "(protocol in its docstring).", "",
             f"- model: {out['model']}; in float32 it would take {gib(4 * params)}, this machine has "
             f"{gib(out['machine_memory_bytes'])}",
             f"- calibration: {out['calibration']}; GPTQ W4 g128 symmetric (compressed-tensors), forward float32",
             f"- evaluation: {out['eval']}",
             f"- one `quantize run` in a child process, {run_s / 60:.1f} min in all (2 threads); the checkpoint "
             f"written beforehand in {made_s:.0f} s; the artefact: {artefact / 1e9:.2f} GB",
             "- peak RSS: the run's own VmHWM, reset before each step; predicted: the run's preflight estimate "
             "(quantize/fit/build_memory.py), the process included", "",
             "| step | seconds | peak RSS | predicted |", "|---|---|---|---|"]
    for s in out["steps"]:
        secs = "–" if s["seconds"] is None else f"{s['seconds']:.0f}"
        lines.append(f"| {s['step']} | {secs} | {gib(s['peak_rss_bytes'])} | {gib(s['predicted_bytes'])} |")
    lines += ["", f"Base PPL {out['base_ppl']:.2f}, artefact PPL {out['variant_ppl']:.2f} (random weights: near the "
              f"vocabulary size), KLD {out['kld']:.5f} ± {out['kld_unc']:.5f}, same top token "
              f"{100 * out['same_top']:.1f} %.", ""]
    (dest / f"big_model{tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
