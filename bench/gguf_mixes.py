"""Every GGUF mix llama.cpp's quantiser makes, side by side on the real models: the k-quants, the i-quants, the
legacy types (and Q1_0, until its Gemma row here showed it useless on a model not trained for 1 bit: it is refused
now), with and without an importance matrix where llama.cpp allows both; size, bits per weight,
the size our type table predicted from config.json alone, PPL, KLD, same-top and tg speed on llama.cpp. Then the
KV cache table: chosen files scored with an f16, q8_0 and q4_0 K/V cache (flash attention on for all).

    python bench/gguf_mixes.py [--models smollm2-135m gemma3-270m] [--chunks 16] [--mixes Q4_K_M IQ4_XS …]
        → bench/results/gguf_mixes.{md,json}

Protocol: one F16 GGUF per model converted by quantize (llama.cpp's converter for Gemma 3); one importance matrix
per model from 32 × 512 tokens of bundled:wiki/calibration (seed 0), as the gguf method computes it; each mix made
by llama.cpp's llama_model_quantize from that F16 file. PPL and KLD on `--chunks` × 512 tokens of
bundled:wiki/eval against the base's float32 log-probabilities (transformers, the shared base store), llama.cpp
runtime with its default F16 KV cache and flash attention off, 2 threads; tg: llama-bench semantics, 32 tokens
after a 64-token prompt, median of 3, 2 threads. The KV table: flash attention on in every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantize.common.files import versions  # noqa: E402
from quantize.common.errors import QuantizeError  # noqa: E402
from quantize.fit.footprint import check_mix, mix_bytes, mix_tensors  # noqa: E402
from quantize.fit.shape import param_counts  # noqa: E402
from quantize.formats import gguf_convert  # noqa: E402
from quantize.formats.gguf_types import IMATRIX_BY_DEFAULT, MIXES, UNQUANTIZED, requires_imatrix  # noqa: E402
from quantize.formats.tensors import gguf_stats  # noqa: E402
from quantize.measure import kv_cache, quality, scorecard, speed  # noqa: E402
from quantize.methods import gguf as gguf_method  # noqa: E402
from quantize.recipe import Speed  # noqa: E402
from quantize.runtimes.llamacpp import LlamaCppModel, quantize  # noqa: E402
from quantize.sources.models import load_tokenizer, resolve_model, tokenizer_adds_bos  # noqa: E402
from quantize.sources.texts import calibration_batches, load_text  # noqa: E402

ALL = [m for m in MIXES if m not in UNQUANTIZED and m != "MXFP4_MOE"]
# the mixes also made without an importance matrix (where llama.cpp allows it), to show what it buys
WITHOUT = ["Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ3_M", "IQ3_S", "Q2_K"]
KV_FILES = ["Q8_0", "Q4_K_M"]  # scored with each KV cache type (Q8_0: the cache's cost nearly alone)
KV_TYPES = ["f16", "q8_0", "q4_0"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--mixes", nargs="+", default=ALL)
    ap.add_argument("--without", nargs="*", default=WITHOUT, help="also made without an importance matrix")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf_mixes"))
    ap.add_argument("--work", default="/tmp/gguf_mixes")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"protocol": __doc__.split("Protocol: ")[1].strip(), "versions": versions(), "models": {}}
    if Path(args.out + ".json").is_file():  # another model's run: keep its rows
        results["models"] = json.loads(Path(args.out + ".json").read_text())["models"]
    for name in args.models:
        def save(entry, name=name):  # after every row: an interrupted run keeps what it measured
            results["models"][name] = entry
            Path(args.out + ".json").write_text(json.dumps(results, indent=2))

        run_model(name, args, work / name, results["models"].get(name), save)
    Path(args.out + ".md").write_text(render(results))
    print(Path(args.out + ".md").read_text())


def run_model(name: str, args, work: Path, done: dict | None, save) -> None:
    """Measure every case of `name` not already in `done` (a previous, interrupted run's entry)."""
    work.mkdir(exist_ok=True)
    base = resolve_model(f"bundled:{name}")
    tok = load_tokenizer(base.path)
    chunks = quality.make_chunks(tok, load_text("bundled:wiki", "eval"), 512, args.chunks)
    store, base_scores, _ = scorecard.base_store(base.path, chunks, "float32", base.config["vocab_size"], False,
                                                 "cpu")
    counts = param_counts(base.config)
    source = work / "f16.gguf"
    if not source.exists():
        gguf_convert.convert(base.path, source, "F16", name=name)
    text = load_text("bundled:wiki", "calibration")
    import torch

    ids = torch.tensor(tok(text.text, add_special_tokens=False).input_ids)
    bos = tok.bos_token_id if tokenizer_adds_bos(tok) else None
    calib = calibration_batches(ids, 32, 512, 0, bos)
    t0 = time.perf_counter()
    imatrix, _ = gguf_method.importance(base, source, calib, {"source": "bundled:wiki"}, work)
    out = done or {"chunks": args.chunks, "base_ppl": base_scores["ppl"], "rows": [], "kv_cache": {},
                   "refused": {}}
    out["base_ppl"] = out.get("base_ppl") or base_scores["ppl"]  # (rows recovered from an interrupted run's log)
    assert out["chunks"] == args.chunks and abs(out["base_ppl"] - base_scores["ppl"]) < 1e-9, "another protocol"
    out["imatrix_s"] = time.perf_counter() - t0
    sp = Speed(prompt_tokens=64, gen_tokens=32, repetitions=3, threads=[2])
    # each mix as the gguf method makes it by default (an importance matrix for the k-quants at 4 bits and below
    # and the i-quants), then the WITHOUT ones the other way
    cases = [(m, m in IMATRIX_BY_DEFAULT) for m in args.mixes] + [(m, False) for m in args.without if m in args.mixes]
    for mix, has in cases:
        if any(r["mix"] == mix and r["imatrix"] == has for r in out["rows"]) or mix in out["refused"]:
            continue
        try:  # what `quantize plan` refuses (a row no type and no fallback holds), llama.cpp would refuse too
            check_mix(base.config, mix, has)
        except QuantizeError as exc:
            out["refused"][mix] = str(exc)
            save(out)
            continue
        label = f"{name} {mix}{' imat' if has else ''}"
        target = work / f"{mix}{'-imat' if has else ''}.gguf"
        t0 = time.perf_counter()
        quantize(source, target, mix, imatrix if has else None, threads=2)
        build_s = time.perf_counter() - t0
        stats = gguf_stats(target)
        model = LlamaCppModel(target, n_ctx=512, threads=2)
        scores = quality.score(model, chunks, store, label)
        tg = speed.bench_speed(model, sp, label, 0, None)["rows"][0]["tg"]["median"]  # closes the model
        row = {"mix": mix, "imatrix": has, "bytes": stats["bytes"], "bpw": stats["bits_per_weight"],
               "predicted_bytes": mix_bytes(counts, mix, has),
               "tensor_types": stats["tensor_types"], "ppl": scores["ppl"], "ppl_unc": scores["ppl_unc"],
               "kld": scores["kld"]["mean"], "kld_unc": scores["kld"]["unc"], "kld_p99": scores["kld"]["p99"],
               "same_top": scores["kld"]["same_top"], "tg": tg, "build_s": build_s}
        out["rows"].append(row)
        save(out)
        print(json.dumps({k: v for k, v in row.items() if k != "tensor_types"}), flush=True)
        if mix in KV_FILES and has == (mix in IMATRIX_BY_DEFAULT):
            kv = kv_cache.score_kv_types(target, chunks, store, KV_TYPES, label)
            out["kv_cache"][mix] = {t: {"ppl": e["perplexity"]["ppl"], "kld": e["perplexity"]["kld"]["mean"],
                                        "kld_unc": e["perplexity"]["kld"]["unc"],
                                        "same_top": e["perplexity"]["kld"]["same_top"]} for t, e in kv.items()}
            save(out)
            print(json.dumps({mix: out["kv_cache"][mix]}), flush=True)
        target.unlink()
    out["refused_without_imatrix"] = [m for m in args.mixes if m not in out["refused"] and any(
        requires_imatrix(n, k, m) for n, _, k in mix_tensors(counts, m, False))]
    save(out)


def render(results: dict) -> str:
    lines = ["# Every GGUF mix on the real models (bench/gguf_mixes.py)", "", f"Protocol: {results['protocol']}", ""]
    for name, m in results["models"].items():
        lines += [f"## {name} (base PPL {m['base_ppl']:.4f}, float32 transformers; {m['chunks']} × 512 tokens)", "",
                  "| mix | imatrix | bytes | bits/weight | predicted bytes | PPL | KLD mean ± | KLD p99 | same top % "
                  "| tg t/s (2 threads) | tensors by type |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(m["rows"], key=lambda r: -r["bytes"]):
            pred = "= measured" if r["predicted_bytes"] == r["bytes"] else f"{r['predicted_bytes']}"
            types = ", ".join(f"{k} {n}" for k, n in sorted(r["tensor_types"].items(), key=lambda x: -x[1])) \
                if "tensor_types" in r else "– (not kept: run interrupted before this field was saved)"
            lines.append(f"| {r['mix']} | {'yes' if r['imatrix'] else 'no'} | {r['bytes']} | {r['bpw']:.3f} | {pred} "
                         f"| {r['ppl']:.4f} ± {r['ppl_unc']:.4f} | {r['kld']:.5f} ± {r['kld_unc']:.5f} "
                         f"| {r['kld_p99']:.4f} | {100 * r['same_top']:.2f} | {r['tg']:.1f}{'†' if 'tg_note' in r else ''} "
                         f"| {types} |")
        noted = sorted({r["tg_note"] for r in m["rows"] if "tg_note" in r})
        lines += [""] + [f"† tg {n}." for n in noted]
        lines += ["", "Refused by llama.cpp without an importance matrix on this model (and by `quantize plan`): "
                  + ", ".join(m["refused_without_imatrix"]) + "."]
        lines += [f"Refused outright on this model (`quantize plan`'s message): {k}: {v}" for k, v in
                  m.get("refused", {}).items()] + [""]
        if m["kv_cache"]:
            lines += ["KV cache types (flash attention on in every row):", "",
                      "| file | KV cache | PPL | KLD mean ± | same top % |", "|---|---|---|---|---|"]
            for mix, by_kv in m["kv_cache"].items():
                for kv, e in by_kv.items():
                    lines.append(f"| {mix} | {kv} | {e['ppl']:.4f} | {e['kld']:.5f} ± {e['kld_unc']:.5f} "
                                 f"| {100 * e['same_top']:.2f} |")
            lines.append("")
    lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
