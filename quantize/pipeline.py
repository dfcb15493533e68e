"""The whole run: recipe → base model → quantize each variant → evaluate → fit → report.

Output layout (`outputs/<name>/`, renamed into place only when complete):
    recipe.yaml        the recipe as resolved (all defaults filled in)
    results.json       protocol + base numbers + every variant's numbers (quality, speed, the serve check)
    fit.json           VRAM fit of the base and every variant
    report.html        the same as one self-contained page with charts
    report.md          the readable report, written last (it marks a finished run)
    <variant>/         one artefact each: model files, tokenizer, manifest.json, results.json

The work happens in a hidden folder keyed by the recipe and the code (common/files.Staging); a run that fails or
is killed keeps it, and the same recipe run again continues there.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from quantize.common import files
from quantize.common.errors import QuantizeError
from quantize.common.heap import release_free_heap
from quantize.common.ui import step
from quantize.fit import vram
from quantize.fit.gpus import gpu_by_name
from quantize.fit.shape import shape_from_config
from quantize.formats.tensors import weight_bytes
from quantize.measure.streamed import LOADER as STREAM_LOADER, STREAMABLE, StreamedModel
from quantize.measure import kld_base, kv_cache, lmeval, memory, on_engine, quality, serving, speed
from quantize.measure.scorecard import base_store
from quantize.methods import ranks
from quantize.methods.configs import KV_CHOICES, artefact_format
from quantize.methods.device import resolve_device
from quantize.methods.experts import expert_lists, with_experts
from quantize.methods.registry import METHODS
from quantize.preflight import base_model, check_disk, check_memory, check_recipe
from quantize.recipe import Recipe
from quantize.report import gates, html, markdown
from quantize.runtimes.litert import device_fit, memory as litert_memory
from quantize.runtimes.load import detect, free, gguf_file, load
from quantize.sources.models import (
    BaseModel, load_model, load_tokenizer, meta_model, tokenizer_adds_bos,
)
from quantize.sources.texts import calibration_batches, load_text


def _collect() -> None:
    """After the caller has closed (runtimes.load.free) and dropped a model: collect it and hand the freed heap
    back to the OS, so the next build's memory and peak RSS are its own."""
    gc.collect()
    release_free_heap()


def _evaluate(model, label: str, chunks, base_logprobs, recipe: Recipe, bandwidth: dict | None = None,
              tokenizer=None, scores: dict | None = None, positions: Path | None = None) -> dict:
    """Perplexity and KLD against the base file (each position's KLD saved to `positions`), lm-eval tasks and
    speed. `scores`: the perplexity already known (the base's, from the base store)."""
    if scores is not None:
        out = {"perplexity": scores}
    elif base_logprobs is None:  # eval.kld: false: perplexity only
        out = {"perplexity": quality.score_model(model, chunks, None, label, floor=False)}
    else:
        out = {"perplexity": quality.score(model, chunks, base_logprobs, label, positions)}
    if recipe.eval.tasks:
        out["lm_eval"] = lmeval.run_or_skip(model, tokenizer, recipe.eval.tasks, recipe.eval.task_limit)
    if recipe.eval.speed.enabled:
        if getattr(model, "speed_note", None):  # an engine in its own process (LiteRT): what its scoring measured
            out["speed"] = {"skipped": model.speed_note()}
        elif getattr(model, "streamed", False):
            out["speed"] = {"skipped": "eval.stream: the model is read layer by layer from disk, which is no "
                                       "serving speed"}
        else:
            out["speed"] = speed.bench_speed(model, recipe.eval.speed, label, recipe.seed, bandwidth)
    return out


def _fit(folder: Path, shape, recipe: Recipe, kv_dtype: str | None = None) -> dict:
    """The fit of the artefact's measured bytes; `kv_dtype`: the cache type a budgeted mix was sized for, else the
    recipe's."""
    by_dtype = weight_bytes(folder)
    f = recipe.fit
    if detect(folder) == "litert":  # a phone's memory, not a GPU's: the file's weights and its fixed KV cache
        return {"weight_bytes_by_dtype": by_dtype, **device_fit(litert_memory(folder))}
    engine = vram.engine_for(detect(folder))  # llama.cpp's cache for GGUF, vLLM's for a safetensors checkpoint
    return {"weight_bytes_by_dtype": by_dtype,
            **vram.fit_report(sum(by_dtype.values()), shape, f.gpus, f.contexts, f.batch, kv_dtype or f.kv_dtype,
                              f.flash_attn, engine)}


def _budget_kv(manifest: dict) -> str | None:
    """The KV cache type a budgeted GGUF mix was sized for: the one it chose (budget.kv_dtype auto) or the one its
    gpu budget names; None for every other variant."""
    if "kv_cache" in manifest["result"]:
        return manifest["result"]["kv_cache"]["chosen"]
    m = manifest["method"]
    if m.get("name") == "auto" and m.get("target") == "gguf" and (m.get("budget") or {}).get("gpu"):
        return m["budget"]["kv_dtype"]
    return None


def _kv_types(recipe: Recipe, budget_kv: str | None) -> list[str]:
    """The cache types a GGUF variant is scored with: eval.kv_cache's, and the one its budget was sized for when that
    is not the f16 cache the main evaluation runs."""
    extra = budget_kv if budget_kv not in (None, "f16", *recipe.eval.kv_cache) else None
    return [*recipe.eval.kv_cache, *([extra] if extra else [])]


def _kv_cache(folder: Path, chunks, base_logprobs, recipe: Recipe, shape, name: str, kv_types: list[str]) -> dict:
    """The GGUF scored with each of `kv_types` (eval.kv_cache's), and weights + that cache + overhead at the fit's
    contexts (measure/kv_cache.py)."""
    scored = kv_cache.score_kv_types(gguf_file(folder), chunks, base_logprobs, kv_types, name)
    weights, f = sum(weight_bytes(folder).values()), recipe.fit
    gpu = gpu_by_name(f.gpus[0])  # the total does not depend on the GPU, only its usable share does
    return {kv: {**v, "memory_bytes": {str(c): vram.fit_one(weights, shape, gpu, c, f.batch, kv, True).total_bytes
                                       for c in f.contexts}} for kv, v in scored.items()}


def _calibration(recipe: Recipe, tokenizer) -> tuple[torch.Tensor, dict]:
    c = recipe.calibration
    text = load_text(c.source, "calibration", c.field)
    ids = torch.tensor(tokenizer(text.text, add_special_tokens=False).input_ids)
    bos = tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
    batches = calibration_batches(ids, c.samples, c.seq_len, c.seed, bos)
    return batches, {**text.describe(), "tokens": int(ids.numel()), "samples": c.samples, "seq_len": c.seq_len,
                     "seed": c.seed, "sampling": "seeded random windows",
                     "bos": "first token of each window replaced by BOS" if bos is not None else "no BOS (the "
                            "tokenizer adds none)"}


def _build_variant(method, base: BaseModel, folder: Path, recipe: Recipe, calib) -> dict:
    """Build into `<variant>.partial` and rename it to `folder` once its manifest is written. A layer-wise build
    interrupted earlier continues in its partial folder after its last finished layer; any other starts over."""
    partial = folder.with_name(folder.name + ".partial")
    if not (method.layer_wise and partial.is_dir()):
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    batches, calib_info = calib if method.needs_calibration else (None, None)
    if method.name == "auto" and method.budget.gpu:  # the bytes the GPU leaves for weights at that context
        b = method.budget
        budgets = vram.weight_budgets(shape_from_config(base.config), b.gpu, b.context, b.batch,
                                      KV_CHOICES if b.kv_dtype == "auto" else [b.kv_dtype], recipe.fit.flash_attn,
                                      vram.engine_for(artefact_format(method)))
        for _, how in budgets.values():
            step(f"budget: {how}")
        left = {kv: bytes_left for kv, (bytes_left, _) in budgets.items()}  # 0: that cache leaves nothing
        update = {"weight_bytes_by_kv": left} if b.kv_dtype == "auto" else {"weight_bytes": left[b.kv_dtype]}
        method = method.model_copy(update={"budget": b.model_copy(update=update)})
    memory.reset_peak()
    start = time.perf_counter()
    info = ranks.build(METHODS[method.name], method, base, partial, batches, calib_info)  # torchrun: GPTQ on all
    seconds = time.perf_counter() - start
    manifest = {
        "variant": folder.name,
        "method": method.model_dump(mode="json"),
        "result": info,
        "base_model": base.describe(),
        "recipe": recipe.resolved(),
        "recipe_sha256": recipe.sha256(),
        "seed": recipe.seed,
        "calibration": calib_info,
        "versions": files.versions(),
        "timings_s": {"build": seconds},
        "peak_rss_bytes": {"build": memory.peak_rss_bytes()},
        "files": files.file_hashes(partial),
    }
    files.write_json(partial / "manifest.json", manifest)
    os.replace(partial, folder)
    return manifest


def _paired(folder: Path, names: list[str]) -> dict:
    """For every two variants, the difference of their mean KLDs with its paired standard error (kept per position
    in kld-positions/ beside the report)."""
    kld = {n: np.load(folder / f"{n}.npy") for n in names if (folder / f"{n}.npy").is_file()}
    return {f"{a} − {b}": quality.paired_difference(kld[a], kld[b])
            for i, a in enumerate(kld) for b in list(kld)[i + 1:]}


def run_key(recipe: Recipe) -> str:
    """What work may be reused under: the resolved recipe, this code and the libraries' versions."""
    key = {"recipe": recipe.resolved(), "code": files.code_version(), "versions": files.versions()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _check_ranks(recipe: Recipe, meta) -> None:
    """Under torchrun, before any work: what a build across the ranks cannot take."""
    group = ranks.current()
    spread = [k for k, m in enumerate(recipe.methods) if m.name in ranks.DISTRIBUTED]
    if not (group.many and spread):
        return
    where = f"recipe {recipe.name}: key `methods[{spread[0]}]`"
    try:
        group.parts(recipe.calibration.samples)
        ranks.for_method(recipe.methods[spread[0]], any(expert_lists(layer) for layer in meta.model.layers))
    except QuantizeError as exc:
        raise QuantizeError(f"{where} under torchrun ({group.world} processes): {exc}") from None


def _base_on_engines(out: Path, recipe: Recipe, base_path: Path, chunks, store) -> dict:
    """The base scored on each engine of eval.engines (measure/on_engine.py); its per-position engine − reference
    NLLs kept in kld-positions/base@ENGINE.npy for the variants' excess."""
    rows = {}
    for engine in recipe.eval.engines:
        step(f"base model on {engine}")
        dtype = on_engine.engine_dtype(recipe.eval.dtype)
        reference = on_engine.base_reference_nll(store, chunks)
        try:
            scored = on_engine.engine_nll(base_path, chunks, dtype)
        except QuantizeError as exc:
            rows[engine] = {"engine": engine, "dtype": dtype, "refused": str(exc)}
            continue
        (out / "kld-positions").mkdir(exist_ok=True)
        np.save(out / "kld-positions" / f"base@{engine}.npy", scored - reference)
        rows[engine] = on_engine.describe(engine, dtype, scored, reference)
    return rows


def _variant_on_engines(out: Path, recipe: Recipe, folder: Path, name: str, chunks) -> dict:
    """The variant scored on each engine of eval.engines that loads its format, against its reference NLLs."""
    positions = out / "kld-positions"
    reference = np.load(quality.nll_file(positions / f"{name}.npy"))[0].astype(np.float64)
    rows = {}
    for engine in recipe.eval.engines:
        base_delta = positions / f"base@{engine}.npy"
        if not base_delta.is_file():
            rows[engine] = {"engine": engine, "skipped": f"{engine} refused the base model itself (base.engines)"}
            continue
        step(f"{name}: on {engine}")
        rows[engine] = on_engine.check_variant(engine, folder, detect(folder), chunks, recipe.eval.dtype, reference,
                                               np.load(base_delta))
    return rows


def run(recipe: Recipe, force: bool = False, restart: bool = False) -> Path:
    """The whole run. Its work folder is kept when it fails or is killed, and the same recipe run again continues
    there: finished variants are not rebuilt, the base is not evaluated again, and a layer-wise build continues
    after its last finished layer (`restart` starts over)."""
    staging = files.Staging(recipe.output_dir, force, run_key(recipe), restart)
    staging.check()  # fail before any work, not after it
    for k, method in enumerate(recipe.methods):  # a device this machine lacks, before any work too
        if hasattr(method, "device"):
            resolve_device(method.device, f"recipe {recipe.name}: key `methods[{k}].device`")
    device = resolve_device(recipe.device, f"recipe {recipe.name}: key `device`")  # evaluation's
    step(f"recipe {recipe.name}: model {recipe.model}, variants "
         + ", ".join(m.default_variant() for m in recipe.methods))
    base = base_model(recipe)
    meta = with_experts(meta_model(base.path))  # expert linears as the engine sees them (sizes, group checks)
    check_recipe(recipe, base.config, meta)
    _check_ranks(recipe, meta)
    tokenizer = load_tokenizer(base.path)
    ppl = recipe.eval.perplexity
    chunks = quality.make_chunks(tokenizer, load_text(ppl.source, "eval", ppl.field), ppl.n_ctx, ppl.max_chunks)
    check_memory(recipe, meta, chunks.ids.shape[0])
    calib = None  # the calibration text too is checked before any work
    if any(m.needs_calibration for m in recipe.methods):
        calib = _calibration(recipe, tokenizer)
    check_disk(recipe, meta, kld_base.file_bytes(*chunks.ids.shape, meta.config.vocab_size) if recipe.eval.kld else 0)
    shape = shape_from_config(base.config)
    dtype = recipe.eval.dtype
    torch.manual_seed(recipe.seed)

    with staging as out:
        if staging.resumed:
            step(f"continuing the interrupted run in {out}")
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
        memory.reset_peak()
        start = time.perf_counter()
        if recipe.eval.kld:
            base_logprobs, base_scores, cache = base_store(base.path, chunks, dtype, meta.config.vocab_size,
                                                           recipe.eval.stream, device)
        else:  # no store of the base's log-probabilities: its perplexity only, and none for the variants' KLD
            base_logprobs, base_scores, cache = None, *_base_perplexity(base.path, chunks, dtype, recipe, device)
        if cache["state"] == "computed":  # the time and this process's peak while the base was evaluated
            cache = {**cache, "seconds": time.perf_counter() - start, "peak_rss_bytes": memory.peak_rss_bytes()}
        results = _base_results(out, recipe, base, chunks, base_scores, cache, shape, tokenizer, device,
                                base_logprobs)
        bandwidth = results["protocol"]["memory_bandwidth"]
        for method in recipe.methods:
            name = method.default_variant()
            folder = out / name
            if (folder / "results.json").is_file():  # finished before an interruption
                step(f"{name}: already built and evaluated")
                done = json.loads((folder / "results.json").read_text())
                results["variants"][name] = {k: v for k, v in done.items() if k != "protocol"}
                continue
            if (folder / "manifest.json").is_file():
                manifest = json.loads((folder / "manifest.json").read_text())
            else:
                step(f"{name}: quantizing")
                manifest = _build_variant(method, base, folder, recipe, calib)
                _collect()  # the build's freed heap, or the evaluation's peak would count it
            step(f"{name}: reloading the artefact with its loader and evaluating")
            memory.reset_peak()
            start = time.perf_counter()
            if recipe.eval.stream and detect(folder) in STREAMABLE:  # layer by layer, as the base
                model, loader, eval_dtype = StreamedModel(folder), STREAM_LOADER, "float32"
            else:
                model, loader, eval_dtype = load(folder, dtype, chunks.n_ctx, device)
            measured = _evaluate(model, name, chunks, base_logprobs, recipe, bandwidth, tokenizer,
                                 positions=out / "kld-positions" / f"{name}.npy")
            measured["eval_s"] = time.perf_counter() - start  # loading and evaluating (not the serve check)
            measured["eval_peak_rss_bytes"] = memory.peak_rss_bytes()
            free(model)
            del model  # not alive during the next variant's build
            _collect()
            budget_kv = _budget_kv(manifest)  # a GGUF mix sized for a GPU with this KV cache type
            kv_types = _kv_types(recipe, budget_kv)
            if kv_types and detect(folder) == "gguf":
                step(f"{name}: scoring with each KV cache type ({', '.join(kv_types)})")
                measured["kv_cache"] = _kv_cache(folder, chunks, base_logprobs, recipe, shape, name, kv_types)
            if recipe.eval.engines:  # the same tokens on the engine itself, after the model is freed
                measured["engines"] = _variant_on_engines(out, recipe, folder, name, chunks)
            if recipe.eval.serve.enabled:  # after the model is freed: the server loads its own copy
                step(f"{name}: serve check")
                torch_dtype = eval_dtype if eval_dtype in ("float32", "bfloat16", "float16") else None  # as evaluated
                measured["serve"] = serving.check(folder, recipe.eval.serve, max(recipe.eval.speed.threads),
                                                  torch_dtype)
            variant = {"method": manifest["method"], "format": manifest["result"]["format"],
                       "eval_dtype": eval_dtype, "loader": loader, "build_s": manifest["timings_s"]["build"],
                       "build_peak_rss_bytes": manifest["peak_rss_bytes"]["build"], **measured,
                       "fit": _fit(folder, shape, recipe, budget_kv)}
            if "mix" in manifest["result"]:  # a budgeted mix: what it was asked and what it predicted
                r = manifest["result"]
                variant["budgeted_mix"] = {"budget": r["budget"], "bytes": r["bytes"], "predicted_kld": r["predicted_kld"],
                                           "tensors_by_type": r["mix"]["tensors_by_type"],
                                           "solver": r["mix"]["solver"], "sensitivity": r["mix"]["sensitivity"],
                                           **({"kv_cache": r["kv_cache"]} if "kv_cache" in r else {})}
            if recipe.gates.is_set:
                variant["gates"] = gates.judge(variant, results["base"], recipe.gates, shape, recipe.fit.flash_attn)
            files.write_json(folder / "results.json", {"protocol": results["protocol"], **variant})
            results["variants"][name] = variant

        (out / "base.json").unlink()
        results["paired_kld"] = _paired(out / "kld-positions", list(results["variants"]))
        if recipe.gates.is_set:
            results["gates"] = {"limits": recipe.gates.model_dump(mode="json"),
                                "passed": not gates.failed(results), "failed": gates.failed(results)}
        files.write_json(out / "results.json", results)
        files.write_json(out / "fit.json", {n: v["fit"] for n, v in [("base", results["base"]),
                                                                          *results["variants"].items()]})
        report = markdown.render(recipe.name, results)
        (out / "report.html").write_text(html.render(recipe.name, results, report, out))
        (out / "report.md").write_text(report)  # last: its presence marks a finished run
    step(f"done: {recipe.output_dir}/report.md")
    return recipe.output_dir


def _base_perplexity(base_path: Path, chunks, dtype: str, recipe: Recipe, device: str) -> tuple[dict, dict]:
    """(the base's perplexity, what stands for its cache record) under `eval.kld: false`: scored as any model,
    nothing stored."""
    model = StreamedModel(base_path) if recipe.eval.stream else load(base_path, dtype, chunks.n_ctx, device)[0]
    try:
        scores = quality.score_model(model, chunks, None)
    finally:
        free(model)
    return scores, {"state": "not stored (eval.kld: false)", "file": None}


def _base_results(out: Path, recipe: Recipe, base: BaseModel, chunks, scores: dict, cache: dict, shape,
                  tokenizer, device: str = "cpu", store=None) -> dict:
    """The run's protocol and the base model's numbers (its perplexity from the shared base store); kept in
    base.json once complete, so that a resumed run does not evaluate the base again."""
    saved = out / "base.json"
    if saved.is_file():
        step("base model: evaluated before the interruption")
        return {**json.loads(saved.read_text()), "variants": {}}
    dtype = recipe.eval.dtype
    step(f"base model: {chunks.ids.shape[0]} chunks × {chunks.n_ctx} tokens of {chunks.text['source']}, "
         f"log-probabilities {cache['state']} ({cache['file']})")
    bandwidth = speed.memory_bandwidth_gb_s() if recipe.eval.speed.enabled else None
    measured = {"perplexity": scores}
    if recipe.eval.stream and (recipe.eval.tasks or recipe.eval.speed.enabled):  # never the whole base in memory
        measured["skipped"] = "eval.stream: speed and lm-eval tasks need the whole base in memory"
    elif recipe.eval.tasks or recipe.eval.speed.enabled:  # the base model in memory only when something needs it
        model = load_model(base.path, dtype).to(device)
        measured = _evaluate(model, "base", chunks, None, recipe, bandwidth, tokenizer, scores)
        free(model)
        del model
        _collect()
    if recipe.eval.engines:
        measured["engines"] = _base_on_engines(out, recipe, base.path, chunks, store)
    results = {
        "protocol": {"perplexity": chunks.protocol(), "eval_dtype": dtype,
                     "device": "cpu" if recipe.eval.stream else device,
                     "memory_bandwidth": bandwidth, "versions": files.versions()},
        "base": {**base.describe(), **measured, "perplexity_cache": cache, "fit": _fit(base.path, shape, recipe)},
    }
    files.write_json(saved, results)
    return {**results, "variants": {}}
