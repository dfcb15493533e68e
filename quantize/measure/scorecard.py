"""`quantize eval PATH [--base B] [--recipe R]`: any artefact (ours or not), on the backend its format runs on,
scored with the recipe's protocol (perplexity, bits per byte, KLD against B, speed), every number with its
protocol.

The base model's log-probabilities are computed once per (base model files, text, n_ctx, chunks, tokenizer,
backend) and kept in the cache folder in llama.cpp's compact form (quality.CompactLogProbs), so scoring ten
artefacts against one base costs ten forward passes plus one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from quantize.common.files import sha256_file, versions
from quantize.common.cache import cache_root
from quantize.common.errors import QuantizeError
from quantize.measure import quality
from quantize.measure import speed
from quantize.runtimes.load import detect, free, load, vocab_size
from quantize.sources.models import load_tokenizer, resolve_model
from quantize.sources.texts import load_text


def store_root() -> Path:
    """Where the base log-probabilities are kept, one folder per (model files, text, protocol, dtype, backend)."""
    return cache_root() / "base-logprobs"


def files_sha256(path: Path) -> str:
    """Content hash of a model: every file that holds weights or shapes (safetensors, GGUF, config)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.suffix in (".safetensors", ".gguf", ".json", ".bin"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(sha256_file(f).encode())
    return digest.hexdigest()


def tokenizer_for(path: Path, base: Path | None):
    for candidate in (path, base):
        if candidate is not None and candidate.is_dir() and (candidate / "tokenizer_config.json").is_file():
            return load_tokenizer(candidate)
    gguf = path if path.suffix == ".gguf" else (path / "model.gguf" if (path / "model.gguf").is_file() else None)
    if gguf is not None:  # the GGUF's own tokenizer, through transformers' GGUF reader
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    raise QuantizeError(f"{path}: no tokenizer found beside it; pass --base with the HF base model")


def base_logprobs(base_path: Path, chunks, ev, n_vocab: int) -> tuple[quality.CompactLogProbs, dict, bool]:
    """(store, base scores, reused?) from the cache, computing and publishing them atomically when missing."""
    key_src = {"model": files_sha256(base_path), "protocol": chunks.protocol(), "dtype": ev.dtype,
               "backend": detect(base_path)}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:24]
    folder = store_root() / key
    if (folder / "done.json").is_file():
        return quality.CompactLogProbs(folder, chunks, n_vocab), json.loads((folder / "done.json").read_text()), True
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    store = quality.CompactLogProbs(partial, chunks, n_vocab)
    model, loader, _ = load(base_path, ev.dtype, chunks.n_ctx)
    try:
        base_vocab = vocab_size(model)
        if base_vocab != n_vocab:
            raise QuantizeError(f"base {base_path} has a vocabulary of {base_vocab}, the artefact {n_vocab}: KLD "
                                "needs the same vocabulary; give the artefact's own base model")
        scores = {**quality.score_base(model, chunks, store), "loader": loader, "key": key_src}
        (partial / "done.json").write_text(json.dumps(scores, default=str))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays in the cache
        raise
    finally:
        free(model)
    try:
        partial.rename(folder)
    except OSError:  # another process published the same key first: theirs is as good
        shutil.rmtree(partial, ignore_errors=True)
    return quality.CompactLogProbs(folder, chunks, n_vocab), scores, False


def evaluate_artefact(path: Path, base: str | None, ev) -> dict:
    """`ev`: the recipe's `eval` section (recipe.Eval)."""
    base_path = resolve_model(base).path if base else None
    tokenizer = tokenizer_for(path, base_path)
    ppl = ev.perplexity
    chunks = quality.make_chunks(tokenizer, load_text(ppl.source, "eval", ppl.field), ppl.n_ctx, ppl.max_chunks)
    model, loader, dtype = load(path, ev.dtype, chunks.n_ctx)
    try:
        n_vocab = vocab_size(model)
        store, base_scores, reused = (None, None, False)
        if base_path is not None and ev.kld:
            store, base_scores, reused = base_logprobs(base_path, chunks, ev, n_vocab)
        scores = (quality.score_base(model, chunks, None, path.name) if store is None
                  else quality.score(model, chunks, store, path.name))
        out = {"artefact": str(path), "format": detect(path), "loader": loader, "eval_dtype": dtype,
               "perplexity": scores, "protocol": {"perplexity": chunks.protocol(), "versions": versions()}}
        if base_scores is not None:
            out["base"] = {"model": base, "perplexity": base_scores, "cache": "reused" if reused else "computed now",
                           "cache_format": "uint16 log-probs over a 16-nat window per position (llama.cpp)"}
        if ev.speed.enabled:
            bandwidth = speed.memory_bandwidth_gb_s()
            out["speed"] = {**speed.bench_speed(model, ev.speed, path.name, 0, bandwidth),
                            "memory_bandwidth": bandwidth}
    finally:
        free(model)
    return out
