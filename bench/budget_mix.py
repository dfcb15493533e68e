"""The budgeted GGUF mix (method `auto`) against llama.cpp's standard mixes of the same size, on the two real
models: for each of Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M, Q6_K, llama.cpp's mix (with the importance matrix) and our
mix with `budget: {mix: <that mix>}` (at most the same bytes), both quantized by llama.cpp from the same F16 GGUF
with the same importance matrix, both evaluated on llama.cpp against the same base log-probs of the same text.

    python bench/budget_mix.py [--models smollm2-135m gemma3-270m] [--chunks 12] [--target gguf]
        → bench/results/budget_mix.{md,json}, bench/results/budget_mix_<model>.png (quantize compare's chart)
    python bench/budget_mix.py --models smollm2-135m --without Q5_1
        → the same table gains our mixes without Q5_1 among the candidates (SmolLM2's bundled weights are Q4_1,
          which Q5_1 holds exactly), against the main run's standard mixes
    python bench/budget_mix.py --models smollm2-135m --mixes IQ4_XS IQ3_M IQ2_M \
            --extra-candidates IQ3_S IQ3_XXS IQ2_S IQ2_XS IQ2_XXS
        → the i-quant budgets: llama.cpp's IQ4_XS / IQ3_M / IQ2_M against our mixes of the same bytes, which may
          also take the lower i-quants
    python bench/budget_mix.py --target compressed-tensors
        → bench/results/budget_mix_ct.{md,json}, …_ct_<model>.png: our mix against uniform RTN / GPTQ W4 (and
          RTN W8) at the uniform artefact's bytes, both by the same quantizer, calibration 16 × 512

Protocol: calibration 32 × 512 tokens of bundled:wiki/calibration (seed 0) for the importance matrix; the
sensitivity table on the first 2 of those windows (1024 tokens, the method's default); KLD and PPL on
`--chunks` × 512 tokens of bundled:wiki/eval (held out from both); llama.cpp runtime, KV cache F16, 2 threads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MIXES = ["Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K"]


# compressed-tensors: uniform schemes every linear of the model takes (SmolLM2's 576-wide inputs take no g128)
SCHEMES = {"smollm2-135m": ["w4g64", "w8ch"], "gemma3-270m": ["w4g128", "w8ch"]}
CT_QUANTIZERS = {"w8ch": ["rtn"]}  # at 8 bits GPTQ and RTN are within noise; the 4-bit budgets take both


def uniform(kind: str, quantizer: str) -> dict:
    bits, gs = int(kind[1]), (-1 if kind.endswith("ch") else int(kind.split("g")[1]))
    return {"name": quantizer, "bits": bits, "group_size": gs, "sym": True}


def recipe(model: str, chunks: int, out: Path, target: str = "gguf", without: list[str] = (),
           extra: list[str] = ()) -> dict:
    if target == "gguf" and without:  # our mixes only, from fewer candidate types; the standard ones: main run
        from quantize.methods.configs import MIX_CANDIDATES

        kinds = [k for k in MIX_CANDIDATES if k not in without]
        methods = [{"name": "auto", "budget": {"mix": m}, "candidates": kinds} for m in MIXES]
        samples = 32
    elif target == "gguf":
        methods = [{"name": "gguf", "type": m, "imatrix": True} for m in MIXES]
        if extra:  # our mixes may also take these types (e.g. the i-quants below 4 bits)
            from quantize.methods.configs import MIX_CANDIDATES

            methods += [{"name": "auto", "budget": {"mix": m}, "candidates": MIX_CANDIDATES + list(extra)}
                        for m in MIXES]
        else:
            methods += [{"name": "auto", "budget": {"mix": m}} for m in MIXES]
        samples = 32
    else:
        methods, samples = [], 16
        for kind in SCHEMES[model]:
            for q in CT_QUANTIZERS.get(kind, ["rtn", "gptq"]):
                methods.append(uniform(kind, q))
                methods.append({"name": "auto", "target": "compressed-tensors", "quantizer": q,
                                "budget": {"scheme": kind}})
    return {"name": f"budget-mix-{target}-{model}", "model": f"bundled:{model}", "methods": methods,
            "calibration": {"source": "bundled:wiki", "samples": samples, "seq_len": 512, "seed": 0},
            "eval": {"perplexity": {"source": "bundled:wiki", "n_ctx": 512, "max_chunks": chunks},
                     "speed": {"enabled": False}, "serve": {"enabled": False}},
            "fit": {"gpus": ["RTX 3060"], "contexts": [4096]},
            "output": str(out)}


def pairs(model: str, target: str) -> list[tuple[str, str, str]]:
    """(label, standard variant, our variant) of a run."""
    if target == "gguf":
        return [(m, f"gguf-{m.lower()}-imat", f"auto-gguf-as-{m.lower()}") for m in MIXES]
    out = []
    for kind in SCHEMES[model]:
        for q in CT_QUANTIZERS.get(kind, ["rtn", "gptq"]):
            bits, gs = int(kind[1]), kind[2:]
            std = f"{q}-w{bits}-sym-{'ch' if gs == 'ch' else gs}"
            out.append((f"{q} {kind}", std, f"auto-ct-{q}-as-{kind}"))
    return out


def summarise(model: str, out: Path, target: str = "gguf", ours_from: Path | None = None) -> dict:
    """The table of a run; `ours_from`: a run of our mixes alone, against the standard mixes of `out`."""
    results = json.loads((out / "results.json").read_text())
    v = dict(results["variants"])
    if ours_from is not None:
        theirs = json.loads((ours_from / "results.json").read_text())
        assert theirs["protocol"]["perplexity"] == results["protocol"]["perplexity"], "not the same evaluation"
        v.update(theirs["variants"])
        out_ours = ours_from
    else:
        out_ours = out
    rows = []
    for m, std_name, our_name in pairs(model, target):
        std = v[std_name]
        ours = v[our_name]
        manifest = json.loads((out_ours / our_name / "manifest.json").read_text())["result"]
        std_bytes = sum(std["fit"]["weight_bytes_by_dtype"].values())
        our_bytes = sum(ours["fit"]["weight_bytes_by_dtype"].values())
        rows.append({
            "mix": m, "standard_bytes": std_bytes, "standard_kld": std["perplexity"]["kld"]["mean"],
            "standard_kld_unc": std["perplexity"]["kld"]["unc"], "standard_ppl": std["perplexity"]["ppl"],
            "auto_bytes": our_bytes, "auto_budget": manifest["budget"]["bytes_resolved"],
            "auto_kld": ours["perplexity"]["kld"]["mean"], "auto_kld_unc": ours["perplexity"]["kld"]["unc"],
            "auto_ppl": ours["perplexity"]["ppl"], "predicted_kld": manifest["predicted_kld"],
            "kld_ratio": ours["perplexity"]["kld"]["mean"] / std["perplexity"]["kld"]["mean"],
            "paired_difference": None if ours_from else results["paired_kld"].get(f"{std_name} − {our_name}"),
            "tensors_by_type": manifest["mix"]["tensors_by_type"],
            "solver_gap": manifest["mix"]["solver"]["gap"],
            "build_s": ours["build_s"], "standard_build_s": std["build_s"]})
    sens = json.loads((out_ours / pairs(model, target)[0][2] / "manifest.json").read_text())["result"]["mix"]
    return {"model": model + (f", candidates without {ours_from.name.split('-without-')[1]}" if ours_from else ""),
            "target": target, "protocol": results["protocol"],
            "base_ppl": results["base"]["perplexity"]["ppl"], "sensitivity": sens["sensitivity"], "rows": rows}


def markdown(all_results: list[dict], target: str = "gguf") -> str:
    if target == "gguf":
        lines = ["# Budgeted GGUF mix vs llama.cpp's standard mixes at equal bytes", "",
                 "`python bench/budget_mix.py` (protocol in its docstring). Same F16 GGUF, same importance matrix, "
                 "same evaluation text; our mix's budget is the standard mix's tensor bytes, quantized by llama.cpp "
                 "for real. Both run on llama.cpp."]
    else:
        lines = ["# Budgeted compressed-tensors mix vs uniform RTN / GPTQ at equal bytes", "",
                 "`python bench/budget_mix.py --target compressed-tensors` (protocol in its docstring): calibration "
                 "16 × 512 tokens; our mix's budget is the uniform scheme's tensor bytes; the mix is built by the "
                 "same quantizer (RTN or GPTQ) with one scheme per fused q/k/v, o, gate/up, down group (W4/W8 as "
                 "vLLM loads them, or fp16). Both reloaded by transformers, evaluated in float32."]
    lines += ["KLD: mean per token (nats) against the float32 HF base, ± its standard error; ratio = ours / "
              "standard.", ""]
    for r in all_results:
        s = r["sensitivity"]
        lines += [f"## {r['model']} (base PPL {r['base_ppl']:.4f}; sensitivity table v{s.get('version', 1)} on "
                  f"{s['tokens']} tokens, probe "
                  f"{s['probe_bpw']} bpw, Spearman ρ(weighted error, measured KLD) over tensors "
                  f"{s['rank_correlation_error_vs_measured']:.2f})", "",
                  "| standard | standard bytes | our bytes | standard KLD | our KLD | ratio | our predicted KLD | "
                  "standard PPL | our PPL | our types |", "|---|---|---|---|---|---|---|---|---|---|"]
        for x in r["rows"]:
            types = ", ".join(f"{k} {n}" for k, n in x["tensors_by_type"].items())
            lines.append(f"| {x['mix']} | {x['standard_bytes']:,} | {x['auto_bytes']:,} | "
                         f"{x['standard_kld']:.5f} ± {x['standard_kld_unc']:.5f} | "
                         f"{x['auto_kld']:.5f} ± {x['auto_kld_unc']:.5f} | {x['kld_ratio']:.3f} | "
                         f"{x['predicted_kld']:.5f} | {x['standard_ppl']:.4f} | {x['auto_ppl']:.4f} | {types} |")
        if "runtime_floor" in r:
            f = r["runtime_floor"]
            lines += ["", f"Runtime floor: the bundled file itself ({f['file']}, the weights the float32 base was "
                      f"dequantized from) on llama.cpp, same text: KLD {f['kld']:.5f} ± {f['kld_unc']:.5f}, PPL "
                      f"{f['ppl']:.4f}. That is llama.cpp's own share (activations rounded for the quantized dot "
                      "products, F16 KV cache) at the file's types with zero weight error; a mix that re-creates "
                      "the file's types scores about this."]
            below = [x for x in r["rows"] if 0.8 * x["standard_kld"] < f["kld"]]
            if below:
                lines += ["", "Below that floor, the goal (≤ 0.8 × the standard mix's KLD): " + ", ".join(
                    f"{x['mix']} (0.8 × {x['standard_kld']:.5f} = {0.8 * x['standard_kld']:.5f} < {f['kld']:.5f})"
                    for x in below) + ". There the standard mix re-creates the bundled file's own types, so its "
                    "weights come back close to the base's and its KLD close to the floor; a mix of the same bytes "
                    "that moves tensors off those types adds weight error instead."]
        lines.append("")
    return "\n".join(lines)


def runtime_floor(model: str, recipe_path: Path, out: Path) -> dict:
    """The bundled GGUF itself on llama.cpp against the float32 base it was dequantized into, same text: the
    runtime's own share of any GGUF's KLD at those tensor types (the weights are the base's exactly)."""
    from quantize.sources.models import resolve_model

    source = resolve_model(f"bundled:{model}").source_file
    dest = out / "runtime-floor.json"
    if not dest.is_file():
        subprocess.run([sys.executable, "-m", "quantize.cli", "eval", str(source), "--base", f"bundled:{model}",
                        "--recipe", str(recipe_path), "--no-speed", "--out", str(dest)], check=True, cwd=ROOT)
    p = json.loads(dest.read_text())["perplexity"]
    return {"file": source.name, "kld": p["kld"]["mean"], "kld_unc": p["kld"]["unc"], "ppl": p["ppl"]}


def keep(done: list[dict], entry: dict) -> None:
    """Put `entry` in place of the section of the same model label, or after the others."""
    for i, old in enumerate(done):
        if old["model"] == entry["model"]:
            done[i] = entry
            return
    done.append(entry)


def main() -> None:
    global MIXES
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--chunks", type=int, default=12)
    ap.add_argument("--target", choices=["gguf", "compressed-tensors"], default="gguf")
    ap.add_argument("--without", nargs="*", default=[], help="gguf: also our mixes without these candidate types "
                    "(after the main run, into its own run folder; the table gains a section)")
    ap.add_argument("--output", type=Path, default=ROOT / "outputs" / "bench-budget-mix")
    from quantize.formats.gguf_types import MIXES as ALL_MIXES, UNQUANTIZED

    ap.add_argument("--mixes", nargs="+", choices=[m for m in ALL_MIXES if m not in UNQUANTIZED],
                    help="gguf: only these budgets (any llama.cpp mix), in a run folder and a results section of "
                    "their own (labelled with the sensitivity table's version)")
    ap.add_argument("--extra-candidates", nargs="*", default=[], help="gguf: GGML types our mixes may take beyond "
                    "the default candidates (e.g. IQ3_S IQ3_XXS IQ2_S IQ2_XS IQ2_XXS for the i-quant budgets)")
    args = ap.parse_args()
    if args.mixes:
        MIXES = args.mixes
    results_dir = ROOT / "bench" / "results"
    stem = "budget_mix" if args.target == "gguf" else "budget_mix_ct"
    # each run replaces its own models' sections of the results file and keeps the others (models run apart)
    previous = results_dir / f"{stem}.json"
    done = json.loads(previous.read_text()) if previous.is_file() else []
    for model in args.models:
        folder = model if args.target == "gguf" else f"ct-{model}"
        if args.mixes:
            folder += "-" + "-".join(m.lower() for m in args.mixes)
        if args.extra_candidates:
            folder += "-with-" + "-".join(k.lower() for k in args.extra_candidates)
        out, path = args.output / folder, args.output / f"{folder}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe(model, args.chunks, out, args.target, extra=args.extra_candidates),
                                       sort_keys=False))
        if not (out / "report.md").is_file():
            subprocess.run([sys.executable, "-m", "quantize.cli", "run", str(path)], check=True, cwd=ROOT)
        subprocess.run([sys.executable, "-m", "quantize.cli", "compare", str(out), "--png",
                        str(results_dir / f"{stem}_{model}.png")], check=True, cwd=ROOT)
        entry = summarise(model, out, args.target)
        if args.target == "gguf":
            entry["runtime_floor"] = runtime_floor(model, path, out)
        if args.mixes:
            from quantize.methods.sensitivity import VERSION

            entry["model"] += f", budgets {', '.join(args.mixes)} (sensitivity table v{VERSION})"
        if args.extra_candidates:
            entry["model"] += f", candidates + {', '.join(args.extra_candidates)}"
        keep(done, entry)
        if args.without and args.target == "gguf":
            folder = f"{model}-without-{'-'.join(k.lower() for k in args.without)}"
            other, other_path = args.output / folder, args.output / f"{folder}.yaml"
            other_path.write_text(yaml.safe_dump(recipe(model, args.chunks, other, "gguf", args.without),
                                                 sort_keys=False))
            if not (other / "report.md").is_file():
                subprocess.run([sys.executable, "-m", "quantize.cli", "run", str(other_path)], check=True, cwd=ROOT)
            keep(done, summarise(model, out, "gguf", ours_from=other))
        (results_dir / f"{stem}.json").write_text(json.dumps(done, indent=1))
        (results_dir / f"{stem}.md").write_text(markdown(done, args.target))
    print(markdown(done, args.target))


if __name__ == "__main__":
    main()
