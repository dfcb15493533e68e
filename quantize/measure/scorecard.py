"""`quantize eval PATH [--base B] [--recipe R]`: any artefact (ours or not), on the backend its format runs on,
scored with the recipe's protocol (perplexity, bits per byte, KLD against B, speed), every number with its
protocol.

The base model's log-probabilities are computed once per (base model files, text, n_ctx, chunks, tokenizer,
dtype, backend) into llama.cpp's --kl-divergence-base file in the cache folder (kld_base.py), the same store
`quantize run` uses, so scoring ten artefacts against one base costs ten forward passes plus one, and `run` and
`eval` report the same KLD for the same artefact.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from quantize.common.cache import cache_root
from quantize.common.files import versions
from quantize.common.errors import QuantizeError
from quantize.measure.streamed import LOADER as STREAM_LOADER, StreamedModel
from quantize.measure import kld_base, kv_cache, lmeval, on_engine, quality
from quantize.measure import speed
from quantize.runtimes.load import check_files, detect, free, gguf_file, load, vocab_size
from quantize.sources.models import load_tokenizer, resolve_model
from quantize.sources.texts import load_text


def tokenizer_for(path: Path, base: Path | None):
    for candidate in (path, base):
        if candidate is not None and candidate.is_dir() and (candidate / "tokenizer_config.json").is_file():
            return load_tokenizer(candidate)
    gguf = path if path.suffix == ".gguf" else (path / "model.gguf" if (path / "model.gguf").is_file() else None)
    if gguf is not None:
        return gguf_tokenizer(gguf)
    raise QuantizeError(f"{path}: no tokenizer found beside it; pass --base with the HF base model")


def gguf_tokenizer(gguf: Path):
    """The GGUF's own tokenizer through transformers' GGUF reader, kept converted in the cache folder
    (tokenizers/<key>: the file's path, size and modification time): converting Gemma 3's 262k vocabulary takes
    about 17 s of a 2-core machine, loading the converted one about 4 s (bench/results/gguf_eval_speed.md)."""
    from transformers import AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    folder = cache_root() / "tokenizers" / key
    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    partial = folder.with_name(f"{key}.partial-{os.getpid()}")
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(folder)
    except OSError:  # another process got there first: theirs is the same conversion
        shutil.rmtree(partial, ignore_errors=True)
    return tokenizer


def base_store(base_path: Path, chunks, dtype: str, n_vocab: int, stream: bool = False, device: str = "cpu"):
    """(base file, base scores, cache record): the one store of the base's log-probabilities that `run` and `eval`
    share, computed on the base's own backend when the cache lacks it (with `stream`, layer by layer from its
    shards in float32: measure/streamed.py)."""
    def compute(writer) -> dict:
        if stream:
            model, loader = StreamedModel(base_path), STREAM_LOADER
        else:
            model, loader, _ = load(base_path, dtype, chunks.n_ctx, device)
        try:
            base_vocab = vocab_size(model)
            if base_vocab != n_vocab:
                raise QuantizeError(f"base {base_path} has a vocabulary of {base_vocab}, the artefact {n_vocab}: KLD "
                                    "needs the same vocabulary; give the artefact's own base model")
            return {**quality.score_model(model, chunks, writer), "loader": loader}
        finally:
            free(model)
    backend = detect(base_path) + ("" if stream or device == "cpu" else f" on {device.split(':')[0]}")
    return kld_base.cached(base_path, chunks, dtype, backend, compute, n_vocab)


def evaluate_artefact(path: Path, base: str | None, ev, engine: str | None = None, device: str = "cpu",
                      seed: int = 0) -> dict:
    """`ev`: the recipe's `eval` section (recipe.Eval). `engine`: "vllm" scores the artefact on vLLM itself (its
    prompt log-probabilities, in bfloat16 unless the recipe's eval dtype says otherwise; no speed figures).
    `device`: where a torch artefact and the base run (a resolved torch device, as `run`'s evaluation device), so
    `eval` and `run` share the base store and give the same numbers on the same device. `seed`: the speed
    prompt's (the recipe's `seed`, as `run`); `ev.tasks`: lm-eval on a torch artefact, as `run`."""
    check_files(path)  # a truncated or corrupt artefact: one message naming the file, before any work
    base_path = resolve_model(base).path if base else None
    tokenizer = tokenizer_for(path, base_path)
    ppl = ev.perplexity
    chunks = quality.make_chunks(tokenizer, load_text(ppl.source, "eval", ppl.field), ppl.n_ctx, ppl.max_chunks)
    eval_dtype = on_engine.engine_dtype(ev.dtype) if engine == "vllm" else ev.dtype
    model, loader, dtype = load(path, eval_dtype, chunks.n_ctx, device, engine=engine)
    try:
        n_vocab = vocab_size(model)
        store, base_scores, cache = (None, None, None)
        if base_path is not None and ev.kld:
            store, base_scores, cache = base_store(base_path, chunks, ev.dtype, n_vocab, ev.stream, device)
        scores = (quality.score_model(model, chunks, None, path.name, floor=False) if store is None
                  else quality.score(model, chunks, store, path.name))
        out = {"artefact": str(path), "format": detect(path), "loader": loader, "eval_dtype": dtype, "device": device,
               "perplexity": scores, "protocol": {"perplexity": chunks.protocol(), "versions": versions()}}
        if base_scores is not None:
            out["base"] = {"model": base, "perplexity": base_scores, "perplexity_cache": cache}
        if ev.tasks:
            out["lm_eval"] = lmeval.run_or_skip(model, tokenizer, ev.tasks, ev.task_limit)
        if ev.speed.enabled and engine != "vllm":
            bandwidth = speed.memory_bandwidth_gb_s()
            out["speed"] = {**speed.bench_speed(model, ev.speed, path.name, seed, bandwidth),
                            "memory_bandwidth": bandwidth}
    finally:
        free(model)
    if ev.kv_cache and detect(path) == "gguf":  # the same file with each KV cache type (measure/kv_cache.py)
        out["kv_cache"] = kv_cache.score_kv_types(gguf_file(path), chunks, store, ev.kv_cache, path.name)
    return out
