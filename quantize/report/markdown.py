"""report.md: the run's numbers for people, base and variants side by side, each with its protocol."""

from __future__ import annotations

from pathlib import Path

from quantize.fit.vram import gib


def _ppl(p: dict) -> str:
    return f"{p['ppl']:.4f} ± {p['ppl_unc']:.4f}"


def _best_speed(entry: dict, phase: str) -> tuple[str, str]:
    rows = entry.get("speed", {}).get("rows", [])
    if not rows:
        return "–", "–"
    best = max(rows, key=lambda r: r[phase]["median"])
    s = best[phase]
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})", str(best["threads"])


DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def base_label(base: dict) -> str:
    """What the base really is: its tensors' dtypes as stored (float16, bfloat16, …) and, for a base converted from
    a GGUF file (bundled models, a user's .gguf), that it was dequantised from that file."""
    by_dtype = base.get("fit", {}).get("weight_bytes_by_dtype", {})
    label = "+".join(DTYPE_NAMES.get(d, d) for d in sorted(by_dtype, key=lambda d: -by_dtype[d])) or "dense"
    label += " safetensors"
    if base.get("source_file"):
        label += f" (dequantised from {Path(base['source_file']).name})"
    return label


def _size(entry: dict) -> int:
    return sum(entry["fit"]["weight_bytes_by_dtype"].values())


def _quality_table(results: dict) -> list[str]:
    lines = ["| model | format | loader | size on disk | PPL | bits/byte | Δ PPL | KLD mean ± | KLD median | KLD p99 "
             "| KLD max | same top % | pp t/s (threads) | tg t/s (threads) | tg GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    entries = [("base", results["base"], base_label(results["base"]))]
    entries += [(n, v, v["format"]) for n, v in results["variants"].items()]
    base_ppl = results["base"]["perplexity"]["ppl"]
    for name, e, fmt in entries:
        p = e["perplexity"]
        k = p.get("kld")
        pp, pp_t = _best_speed(e, "pp")
        tg, tg_t = _best_speed(e, "tg")
        gbs = "–"
        if e.get("speed", {}).get("rows"):
            gbs = f"{max(r['tg']['gb_per_s'] for r in e['speed']['rows']):.2f}"
        kcols = (["–"] * 5 if k is None else
                 [f"{k['mean']:.6f} ± {k['unc']:.6f}", f"{k['median']:.6f}", f"{k['p99']:.5f}", f"{k['max']:.4f}",
                  f"{100 * k['same_top']:.2f} ± {100 * k['same_top_unc']:.2f}"])
        delta = "–" if name == "base" else f"{p['ppl'] - base_ppl:+.4f}"
        loader = e.get("loader", "transformers.from_pretrained").split(" (")[0]
        bpb = "–" if p.get("bits_per_byte") is None else f"{p['bits_per_byte']:.4f}"
        lines.append(f"| {name} | {fmt} | {loader} | {gib(_size(e))} | {_ppl(p)} | {bpb} | {delta} | " + " | ".join(kcols)
                     + f" | {pp} ({pp_t}) | {tg} ({tg_t}) | {gbs} |")
    return lines


def _noise_and_pairs(results: dict) -> list[str]:
    """The noise floor of KLD on this run's positions, and the paired differences between variants."""
    lines = []
    floor = results["base"]["perplexity"].get("noise_floor")
    if floor and floor.get("kld_mean") is None:
        lines += [f"Noise floor: {floor['what']}.", ""]
    elif floor:
        lines += [f"Noise floor: the base against itself with its logits rounded to bfloat16 has mean KLD "
                  f"{floor['kld_mean']:.3g} ± {floor['kld_unc']:.2g} (p99 {floor['kld_p99']:.3g}) on these positions; "
                  "differences of mean KLD below it are rounding noise.", ""]
    pairs = results.get("paired_kld") or {}
    if pairs:
        lines += ["Paired differences of mean KLD (the same positions, so the shared noise cancels): a − b ± standard "
                  "error, and z = difference / error (|z| > 2: the two differ beyond noise).", "",
                  "| a − b | difference ± | z |", "|---|---|---|"]
        for pair, d in pairs.items():
            z = "–" if d["z"] is None else f"{d['z']:+.1f}"
            lines.append(f"| {pair} | {d['difference']:+.6f} ± {d['unc']:.6f} | {z} |")
        lines.append("")
    return lines


def _kld_table(results: dict) -> list[str]:
    """llama-perplexity --kl-divergence's statistics, one row per variant."""
    entries = [(n, v["perplexity"]["kld"]) for n, v in results["variants"].items()
               if "percentiles" in (v["perplexity"].get("kld") or {})]
    if not entries:
        return []
    lines = ["## KL divergence statistics (llama-perplexity --kl-divergence)", "",
             "| variant | KLD mean ± | 99.9% | 99% | 95% | 90% | median | 10% | 1% | max | Δp mean ± | Δp RMS ± "
             "| ln(PPL(Q)/PPL(base)) ± | same top % |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, k in entries:
        q, dp = k["percentiles"], k["delta_p"]
        lines.append(f"| {name} | {k['mean']:.6f} ± {k['unc']:.6f} | {q['99.9']:.5f} | {q['99']:.5f} | {q['95']:.5f} "
                     f"| {q['90']:.5f} | {k['median']:.6f} | {q['10']:.6f} | {q['1']:.6f} | {k['max']:.4f} "
                     f"| {100 * dp['mean']:.3f} ± {100 * dp['unc']:.3f} % "
                     f"| {100 * k['delta_p_rms']:.3f} ± {100 * k['delta_p_rms_unc']:.3f} % "
                     f"| {k['ln_ppl_ratio']:.6f} ± {k['ln_ppl_ratio_unc']:.6f} "
                     f"| {100 * k['same_top']:.2f} ± {100 * k['same_top_unc']:.2f} |")
    return lines + ["", *_noise_and_pairs(results)]


def _kv_cache_section(results: dict) -> list[str]:
    """Each GGUF variant scored with each KV cache type (eval.kv_cache), beside the memory it takes."""
    entries = [(n, v["kv_cache"]) for n, v in results["variants"].items() if v.get("kv_cache")]
    if not entries:
        return []
    first = next(iter(entries[0][1].values()))
    contexts = list(first["memory_bytes"])
    lines = ["## KV cache types (llama.cpp, flash attention on for every row)", "",
             "| variant | KV cache | PPL | KLD mean ± | KLD p99 | same top % | "
             + " | ".join(f"weights + KV + overhead, ctx {c}" for c in contexts) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(contexts)]
    for name, by_kv in entries:
        for kv, e in by_kv.items():
            p, k = e["perplexity"], e["perplexity"].get("kld")
            kcols = (["–"] * 3 if k is None else [f"{k['mean']:.6f} ± {k['unc']:.6f}", f"{k['p99']:.5f}",
                                                  f"{100 * k['same_top']:.2f} ± {100 * k['same_top_unc']:.2f}"])
            lines.append(f"| {name} | {kv} | {_ppl(p)} | " + " | ".join(kcols) + " | "
                         + " | ".join(gib(e["memory_bytes"][c]) for c in contexts) + " |")
    return lines + ["", "Each row is the same GGUF on llama.cpp with that K and V cache type (-ctk/-ctv) and flash "
                        "attention on (llama.cpp needs it for a quantized V cache; the main table's rows have it off), "
                        "scored on the same chunks against the same base. Memory: quantize.fit's weights + KV cache + "
                        f"overhead at batch {results['base']['fit']['rows'][0]['batch']} (the VRAM fit section's "
                        "arithmetic, flash attention on).", ""]


def _engines_section(results: dict) -> list[str]:
    """eval.engines: the base and each variant on the engine itself, against our evaluation of the same tokens."""
    base = results["base"].get("engines")
    if not base:
        return []
    lines = []
    for engine, b in base.items():
        lines += [f"## On the engine: {engine}", "",
                  "| model | engine dtype | PPL on the engine | PPL in our evaluation | ln ratio ± | excess over the "
                  "base's ± | verdict |", "|---|---|---|---|---|---|---|"]
        entries = [("base", b)] + [(n, v["engines"][engine]) for n, v in results["variants"].items()
                                   if engine in v.get("engines", {})]
        for name, e in entries:
            if "ppl" not in e:
                lines.append(f"| {name} | {e.get('dtype', '–')} | – | – | – | – | "
                             f"{e.get('refused') or e.get('skipped')} |")
                continue
            excess = f"{e['excess']:+.4f} ± {e['excess_unc']:.4f}" if "excess" in e else "–"
            lines.append(f"| {name} | {e['dtype']} | {e['ppl']:.4f} | {e['reference_ppl']:.4f} | "
                         f"{e['ln_ratio']:+.4f} ± {e['ln_ratio_unc']:.4f} | {excess} | "
                         f"{e.get('verdict', 'the engine dtype’s own cost')}"
                         + (f" (caveat: {e['caveat']})" if e.get("caveat") else "") + " |")
        lines += ["", f"The same token ids scored again on {engine} (its own loader and kernels, in the dtype shown; our "
                      f"evaluation runs {results['protocol']['eval_dtype']}): the log-probability {engine} gives each "
                      "next token. ln ratio = mean per-token NLL on the engine − ours (ln of the perplexity ratio); "
                      "the base's is what the engine's dtype costs any model, a variant's excess is its own beyond "
                      "that (paired per token), and it delivers the quality measured here when the excess is within "
                      "2 standard errors or below 0.5 % of perplexity (measure/on_engine.py).", ""]
    return lines


def _speed_table(results: dict) -> list[str]:
    lines = ["| model | dtype in memory | weights in memory | threads | pp t/s median (min–max) | pp peak RSS "
             "| tg t/s median (min–max) | tg peak RSS | tg GB/s (of roofline) | load avg before→after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    skipped = []
    for name, e in [("base", results["base"]), *results["variants"].items()]:
        s = e.get("speed")
        if s and "skipped" in s:
            skipped.append(f"{name}: {s['skipped']}")
        if not s or "rows" not in s:
            continue
        for r in s["rows"]:
            pp, tg, la = r["pp"], r["tg"], r["load_average_1m"]
            lines.append(
                f"| {name} | {s['dtype']} | {gib(s['weight_bytes_in_memory'])} | {r['threads']} "
                f"| {pp['median']:.1f} ({pp['min']:.1f}–{pp['max']:.1f}) | {gib(pp['peak_rss_bytes'] or 0)} "
                f"| {tg['median']:.1f} ({tg['min']:.1f}–{tg['max']:.1f}) | {gib(tg['peak_rss_bytes'] or 0)} "
                f"| {tg['gb_per_s']:.2f}" + (f" ({100 * tg['roofline_fraction']:.0f}%)" if "roofline_fraction" in tg else "")
                + f" | {la['before']:.2f}→{la['after']:.2f} |")
    return lines + (["", "Not in the table: " + "; ".join(skipped) + "."] if skipped else [])


def _serve_section(results: dict) -> list[str]:
    """Each variant behind its engine's OpenAI-compatible server: TTFT, decode tokens/sec over the API next to the
    in-process tg at the same thread count, and tokens/sec at the recipe's concurrency."""
    entries = [(n, e["serve"]) for n, e in results["variants"].items() if "serve" in e]
    if not entries:
        return []
    lines = ["## Serving (OpenAI-compatible API)", "",
             "| variant | engine | status | TTFT ms (median) | API decode t/s | in-process tg t/s | API / in-process "
             "| concurrent t/s (requests × concurrency) |", "|---|---|---|---|---|---|---|---|"]
    for name, s in entries:
        if s["status"] != "ok":
            reason = s.get("reason", "").replace("|", "\\|")  # engine log lines are joined with " | "
            lines.append(f"| {name} | {s.get('engine') or '–'} | **{s['status']}**: {reason} "
                         "| – | – | – | – | – |")
            continue
        st, cc = s["stream"], s["concurrent"]
        api = st["decode_tokens_per_s"]
        tg = (results["variants"][name].get("speed") or {}).get("rows") or []
        tg = max((r["tg"]["median"] for r in tg), default=None)
        ratio = f"{api / tg:.2f}" if api and tg else "–"
        lines.append(f"| {name} | {s['engine']} | ok | {1000 * st['ttft_s']:.0f} | "
                     + (f"{api:.1f}" if api else "–") + " | "
                     + (f"{tg:.1f}" if tg else "–") + f" | {ratio} | "
                     + (f"{cc['tokens_per_s']:.1f}" if cc["tokens_per_s"] else "–")
                     + f" ({cc['requests']} × {cc['concurrency']}) |")
    first = entries[0][1]
    lines += ["", f"Each server started on a free loopback port and stopped after its check; greedy answers of at "
              f"most {first.get('max_tokens', '?')} tokens to one fixed prompt through the official `openai` client. "
              "TTFT: request to first streamed content; API decode: (tokens − 1) / (last − first chunk), median of the "
              "streamed repetitions; in-process tg: the speed table's best row (llama-bench semantics, random "
              "tokens from an empty cache), so the ratio is what the server's HTTP, chat template and sampling "
              "cost. Commands in results.json.", ""]
    return lines


def _lm_eval_section(results: dict) -> list[str]:
    entries = [(n, e["lm_eval"]) for n, e in [("base", results["base"]), *results["variants"].items()]
               if "lm_eval" in e and "results" in e["lm_eval"]]
    if not entries:
        return []
    metrics = sorted({(task, m) for _, r in entries for task, ms in r["results"].items() for m in ms if m != "sample_len"})
    proto = entries[0][1]["protocol"]
    lines = ["## lm-eval tasks", "", "| model | " + " | ".join(f"{t} {m}" for t, m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for name, r in entries:
        lines.append(f"| {name} | " + " | ".join(f"{r['results'].get(t, {}).get(m, float('nan')):.4f}"
                                                  for t, m in metrics) + " |")
    lines += ["", f"lm-eval {proto['lm_eval']}, zero-shot, limit {proto['limit']}, max_length {proto['max_length']}, "
              f"batch {proto['batch_size']}; local task files in eval/tasks, data from the held-out bundled text.", ""]
    return lines


def _fit_table(results: dict) -> list[str]:
    entries = [("base", results["base"]), *results["variants"].items()]
    first = entries[0][1]["fit"]
    contexts = sorted({r["context"] for r in first["rows"]})
    gpus = list(first["largest_context"])
    header = ("| model | engine's KV cache | GPU | " + " | ".join(f"ctx {c}: headroom" for c in contexts)
              + " | largest context |")
    lines = [header, "|---|---|---|" + "---|" * (len(contexts) + 1)]
    on_device = [(name, e["fit"]["on_device"]) for name, e in entries if "on_device" in e["fit"]]
    entries = [(name, e) for name, e in entries if e["fit"]["rows"]]
    for name, e in entries:
        f = e["fit"]
        cache = f"{f['protocol'].get('engine', 'llama.cpp')}, {f['rows'][0]['kv_dtype']}"
        for g in gpus:
            cells = []
            for c in contexts:
                row = next(r for r in f["rows"] if r["gpu"] == g and r["context"] == c)
                mark = "fits" if row["fits"] else "**no**"
                cells.append(f"{mark}, {gib(row['headroom_bytes'])}")
            lines.append(f"| {name} | {cache} | {g} | " + " | ".join(cells) + f" | {f['largest_context'][g]} |")
    notes = {e["fit"]["protocol"]["kv_dtype_note"] for _, e in entries if "kv_dtype_note" in e["fit"]["protocol"]}
    formulas = {e["fit"]["protocol"].get("engine", "llama.cpp"): e["fit"]["protocol"]["kv_formula"] for _, e in entries}
    lines += ["", "KV cache as each engine allocates it (GGUF: llama.cpp; safetensors checkpoints: vLLM): "
              + "; ".join(f"**{k}**: {v}" for k, v in formulas.items()) + "."
              + "".join(f" {n}." for n in sorted(notes))]
    if on_device:  # LiteRT files run on a phone or an edge device: their memory there, not a GPU fit
        lines += ["", "LiteRT files on the device (no GPU fit): " + "; ".join(
            f"**{name}** {gib(d['total_bytes'])} = weights {gib(d['weights_bytes'])} + KV cache "
            f"{gib(d['kv_cache_bytes'])} at {d['cache_length']} cells" for name, d in on_device) + f" ({on_device[0][1]['note']})."]
    return lines


def _gates_section(results: dict) -> list[str]:
    if "gates" not in results:
        return []
    verdict = "all variants pass" if results["gates"]["passed"] else "**FAILED**: " + "; ".join(results["gates"]["failed"])
    limits = ", ".join(f"{k} {v}" for k, v in results["gates"]["limits"].items() if v not in (None, []))
    lines = ["## Gates", "", f"Limits: {limits}. {verdict}.", "",
             "| variant | gate | limit | measured | result |", "|---|---|---|---|---|"]

    def shown(value) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        if isinstance(value, dict) and "headroom_bytes" in value:
            return f"{gib(value['total_bytes'])} of {gib(value['usable_bytes'])} usable"
        if isinstance(value, dict):
            return ", ".join(f"{k} {v}" for k, v in value.items())
        return str(value)

    for name, v in results["variants"].items():
        for c in v.get("gates", {}).get("checks", []):
            lines.append(f"| {name} | {c['gate']} | {shown(c['limit'])} | {shown(c['measured'])} | "
                         f"{'pass' if c['passed'] else '**FAIL**'} |")
    return lines + [""]


def _mix_section(results: dict) -> list[str]:
    """Budgeted mixes: the budget, the types chosen, the KLD predicted from the sensitivity table and the KLD
    measured on the evaluation text."""
    mixes = [(n, v) for n, v in results["variants"].items() if "budgeted_mix" in v]
    if not mixes:
        return []
    lines = ["## Budgeted mixes (method auto): predicted and measured", "",
             "| variant | budget | bytes | tensors by type | predicted KLD | measured KLD | solver gap |",
             "|---|---|---|---|---|---|---|"]
    for name, v in mixes:
        m = v["budgeted_mix"]
        kld = (v["perplexity"].get("kld") or {}).get("mean")
        lines.append(f"| {name} | {m['budget']['bytes_resolved']:,} | {m['bytes']:,} | "
                     + ", ".join(f"{k} {c}" for k, c in m["tensors_by_type"].items())
                     + f" | {m['predicted_kld']:.5f} | {'–' if kld is None else f'{kld:.5f}'} | "
                     f"{m['solver']['gap']:.2g} |")
    kv = [(n, v["budgeted_mix"]["kv_cache"]) for n, v in mixes if "kv_cache" in v["budgeted_mix"]]
    if kv:  # budget.kv_dtype auto
        lines += ["", "| variant | KV cache | bytes for weights | predicted weights KLD | cache's own KLD | predicted "
                  "sum | measured KLD with it |", "|---|---|---|---|---|---|---|"]
        for name, choice in kv:
            scored = results["variants"][name].get("kv_cache", {})
            for t, o in choice["options"].items():
                mark = " (chosen)" if t == choice["chosen"] else ""
                got = ((scored.get(t) or {}).get("perplexity") or {}).get("kld")
                lines.append(f"| {name} | {t}{mark} | {o['weight_budget_bytes']:,} | "
                             + (f"{o['predicted_weights_kld']:.4g} | {o['kv_kld']:.4g} | {o['predicted_kld']:.4g}"
                                if o["fits"] else f"no mix fits | {o['kv_kld']:.4g} | –")
                             + " | " + ("–" if got is None else f"{got['mean']:.4g}") + " |")
        lines += ["", "KV cache chosen with the mix (budget.kv_dtype auto): " + kv[0][1]["how"] + ". The chosen "
                  "cache's measured row is the KV cache types section's; the VRAM fit of that variant uses it."]
    s = mixes[0][1]["budgeted_mix"]["sensitivity"]
    return lines + ["", f"Predicted: the sum over tensors of each one's KLD measured alone at its probe type (the "
                        f"candidate nearest {s['probe_bpw']} bpw) on {s['tokens']} calibration tokens, carried to "
                        "other types by llama.cpp's importance-weighted rounding error; measured: on the evaluation "
                        "text above. Solver gap: predicted minus the Lagrangian lower bound (no mix within the "
                        "budget predicts less than the bound). Each tensor's type: mix.json in the variant's "
                        "folder.", ""]


def render(name: str, results: dict) -> str:
    proto = results["protocol"]
    pp = proto["perplexity"]
    fit_proto = results["base"]["fit"]["protocol"]
    row0 = results["base"]["fit"]["rows"][0]
    out = [
        f"# {name}",
        "",
        f"Base model: `{results['base']['spec']}` ({results['base']['origin']}), evaluated in {proto['eval_dtype']} "
        f"on {proto['device']}. Variants: " + ", ".join(f"`{n}`" for n in results["variants"]) + ".",
        "",
        *_gates_section(results),
        "## Quality and speed",
        "",
        *_quality_table(results),
        "",
        f"Perplexity protocol: {pp['protocol']}; text `{pp['text']['source']}` (sha256 {pp['text']['sha256'][:16]}…, "
        f"{pp['text']['chars']} chars, {pp['text_tokens']} tokens); n_ctx {pp['n_ctx']}, {pp['chunks']} chunks, "
        f"{pp['tokens_scored']} tokens scored from position {pp['first_scored_position']}; {pp['bos']}; "
        f"tokenizer sha256 {pp['tokenizer_sha256'][:16]}…. KLD: llama.cpp definitions, KL(base ‖ variant) per "
        "position in nats. Each variant is evaluated after reloading the artefact with its ecosystem's loader "
        "(the loader column); GGUF files run on llama.cpp's own kernels with its default F16 KV cache, fed the "
        "same token ids. The eval dtype per variant is in results.json (LLM.int8 runs in float16, as "
        "bitsandbytes requires). Speed: best thread count shown; all rows below.",
        "",
        *_kld_table(results),
        *_kv_cache_section(results),
        *_engines_section(results),
        *_mix_section(results),
        "## Speed (llama-bench semantics, every thread count)",
        "",
        *_speed_table(results),
        "",
        "Weights in memory is what the runtime holds: transformers decompresses compressed-tensors "
        "checkpoints to dense weights on CPU, so their CPU speed is that of dense weights; llama.cpp reads the "
        "GGUF's quantized blocks as they are. GB/s = the weight bytes a decode step reads (all but an untied "
        "input embedding, of which it reads one row) × tg tokens/sec; pp computes the last token's logits only, "
        "on every runtime, as llama-bench; the roofline is this machine's streaming bandwidth, measured at the "
        "start of the run"
        + (f" ({results['protocol']['memory_bandwidth']['gb_per_s']:.1f} GB/s, "
           f"{results['protocol']['memory_bandwidth']['method']})." if results["protocol"].get("memory_bandwidth") else "."),
        "",
        *_serve_section(results),
        *_lm_eval_section(results),
        f"## VRAM fit (batch {row0['batch']})",
        "",
        *_fit_table(results),
        "",
        f"Weights: {fit_proto['weights']}. {fit_proto['overhead_note']} (for every engine). {fit_proto['formula']}.",
        "",
        "GPUs (capacity, usable fraction, source): "
        + "; ".join(f"{g['name']} {gib(g['memory_bytes'])} × {g['usable_fraction']:.3f} ({g['source']})"
                    for g in fit_proto["gpus"]) + ".",
        "",
        "## Versions",
        "",
        ", ".join(f"{k} {v}" for k, v in proto["versions"].items() if v),
        "",
    ]
    return "\n".join(out)
