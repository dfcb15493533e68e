"""`quantize eval PATH [--base B] [--recipe R]`: any artefact (ours or not), on the backend its format runs on,
scored with the recipe's protocol (perplexity, bits per byte, KLD against B, speed), every number with its
protocol.

The base model's log-probabilities are computed once per (base model files, text, n_ctx, chunks, tokenizer,
backend) and kept in the cache folder in llama.cpp's compact form (evaluate.CompactLogProbs), so scoring ten
artefacts against one base costs ten forward passes plus one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from quantize import artefact, backends, evaluate, speed
from quantize.errors import QuantizeError
from quantize.models import load_tokenizer, resolve_model
from quantize.recipe import Eval
from quantize.texts import load_text


def cache_root() -> Path:
    return Path(os.environ.get("QUANTIZE_CACHE", Path.home() / ".cache" / "quantize")) / "base-logprobs"


def files_sha256(path: Path) -> str:
    """Content hash of a model: every file that holds weights or shapes (safetensors, GGUF, config)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.suffix in (".safetensors", ".gguf", ".json", ".bin"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(artefact.sha256_file(f).encode())
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


def base_logprobs(base_path: Path, chunks, ev: Eval, n_vocab: int) -> tuple[evaluate.CompactLogProbs, dict, bool]:
    """(store, base scores, reused?) from the cache, computing and publishing them atomically when missing."""
    key_src = {"model": files_sha256(base_path), "protocol": chunks.protocol(), "dtype": ev.dtype,
               "backend": backends.detect(base_path)}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:24]
    folder = cache_root() / key
    if (folder / "done.json").is_file():
        return evaluate.CompactLogProbs(folder, chunks, n_vocab), json.loads((folder / "done.json").read_text()), True
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    store = evaluate.CompactLogProbs(partial, chunks, n_vocab)
    model, loader, _ = backends.load(base_path, ev.dtype, chunks.n_ctx)
    try:
        base_vocab = backends.vocab_size(model)
        if base_vocab != n_vocab:
            raise QuantizeError(f"base {base_path} has a vocabulary of {base_vocab}, the artefact {n_vocab}: KLD "
                                "needs the same vocabulary; give the artefact's own base model")
        scores = {**evaluate.score(model, chunks, store, True, "base"), "loader": loader, "key": key_src}
        (partial / "done.json").write_text(json.dumps(scores, default=str))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays in the cache
        raise
    finally:
        backends.free(model)
    try:
        partial.rename(folder)
    except OSError:  # another process published the same key first: theirs is as good
        shutil.rmtree(partial, ignore_errors=True)
    return evaluate.CompactLogProbs(folder, chunks, n_vocab), scores, False


def evaluate_artefact(path: Path, base: str | None = None, ev: Eval | None = None) -> dict:
    ev = ev or Eval()
    base_path = resolve_model(base).path if base else None
    tokenizer = tokenizer_for(path, base_path)
    ppl = ev.perplexity
    chunks = evaluate.make_chunks(tokenizer, load_text(ppl.source, "eval", ppl.field), ppl.n_ctx, ppl.max_chunks)
    model, loader, dtype = backends.load(path, ev.dtype, chunks.n_ctx)
    try:
        n_vocab = backends.vocab_size(model)
        store, base_scores, reused = (None, None, False)
        if base_path is not None and ev.kld:
            store, base_scores, reused = base_logprobs(base_path, chunks, ev, n_vocab)
        scores = evaluate.score(model, chunks, store, store is None, path.name)
        out = {"artefact": str(path), "format": backends.detect(path), "loader": loader, "eval_dtype": dtype,
               "perplexity": scores, "protocol": {"perplexity": chunks.protocol(), "versions": artefact.versions()}}
        if base_scores is not None:
            out["base"] = {"model": base, "perplexity": base_scores, "cache": "reused" if reused else "computed now",
                           "cache_format": "uint16 log-probs over a 16-nat window per position (llama.cpp)"}
        if ev.speed.enabled:
            bandwidth = speed.memory_bandwidth_gb_s()
            out["speed"] = {**backends.bench_speed(model, ev.speed, path.name, 0, bandwidth),
                            "memory_bandwidth": bandwidth}
    finally:
        backends.free(model)
    return out
