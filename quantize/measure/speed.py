"""Speed with llama-bench semantics, on the runtime the artefact really loads into (torch or llama.cpp).

pp N: one forward pass over N prompt tokens from an empty cache, the logits of the last token only (as llama-bench's
batch asks llama.cpp for; torch: `logits_to_keep=1`).  tg M: M tokens generated one at a time from an empty
cache (greedy, each step feeding back the previous argmax).  Fixed thread count per row (swept like llama-bench
-t), one warm-up run, then `repetitions` timed runs: median, min and max tokens/sec. The sanity check from
gpt-fast: weight bytes read per token × tg tokens/sec = GB/s achieved, which can never exceed the machine's memory
bandwidth; a decode step reads every weight except the input embedding, of which it reads one row (unless it is
tied to the output projection, which reads it whole). Peak RSS is the process's resident peak during each phase.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from quantize.common.ui import track
from quantize.formats.tensors import weight_bytes_gguf
from quantize.measure import memory
from quantize.runtimes.llamacpp import LlamaCppModel
from quantize.runtimes.mlx import MlxModel, bench_mlx


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (Linux), for protocols whose figures depend on it."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")


def memory_bandwidth_gb_s(megabytes: int = 512, repetitions: int = 5) -> dict:
    """This machine's streaming bandwidth: best of `repetitions` copies of a float32 array on all cores (torch's
    parallel copy; bytes read + written per second, as STREAM's Copy counts them), the roofline decode speed is
    measured against."""
    a = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    b = torch.empty_like(a)
    previous = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    best = float("inf")
    try:
        for _ in range(repetitions):
            start = time.perf_counter()
            b.copy_(a)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return {"gb_per_s": 2 * a.numel() * 4 / best / 1e9, "threads": os.cpu_count(),
            "method": f"torch copy of {megabytes} MiB float32 on all cores, best of {repetitions}, "
                      "read + write bytes counted (STREAM Copy)"}


def weight_bytes_in_memory(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _sync(model) -> None:
    """Wait for a GPU's queued work, so that a timer reads the computation and not its launch."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """The weight bytes one decode step reads: all of them but an untied input embedding (one row of it)."""
    embed = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embed.data_ptr()
    return weight_bytes_in_memory(model) - (0 if tied else embed.numel() * embed.element_size())


@torch.inference_mode()
def _pp(model, tokens: torch.Tensor) -> float:
    tokens = tokens.to(model.device)
    _sync(model)
    start = time.perf_counter()
    model(tokens, use_cache=True, logits_to_keep=1)  # the last token's logits, as llama-bench
    _sync(model)
    return time.perf_counter() - start


@torch.inference_mode()
def _tg(model, first_token: torch.Tensor, n: int) -> float:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    token = first_token.to(model.device)
    _sync(model)
    start = time.perf_counter()
    for _ in range(n):
        logits = model(token, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
    _sync(model)
    return time.perf_counter() - start


def _stats(tokens: int, seconds: list[float]) -> dict:
    rates = [tokens / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": len(rates)}


def _timed_row(threads: int, pp, tg, prompt_tokens: int, gen_tokens: int, repetitions: int, label: str,
               weights: int) -> dict:
    """One thread count's row: `pp()` and `tg()` (each returns its seconds) once as warm-up, then `repetitions`
    timed runs each, with the resident peak of each phase."""
    load_before = os.getloadavg()[0]
    pp(), tg()  # warm-up
    memory.reset_peak()
    pps = [pp() for _ in track(range(repetitions), f"pp{prompt_tokens} {label} t={threads}")]
    pp_peak = memory.peak_rss_bytes()
    memory.reset_peak()
    tgs = [tg() for _ in track(range(repetitions), f"tg{gen_tokens} {label} t={threads}")]
    tg_peak = memory.peak_rss_bytes()
    tg_stats = _stats(gen_tokens, tgs)
    return {
        "threads": threads,
        "pp": {"tokens": prompt_tokens, **_stats(prompt_tokens, pps), "peak_rss_bytes": pp_peak},
        "tg": {"tokens": gen_tokens, **tg_stats, "peak_rss_bytes": tg_peak, "gb_per_s": weights * tg_stats["median"] / 1e9},
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
    }


def bench(model, vocab_size: int, prompt_tokens: int, gen_tokens: int, repetitions: int, threads: list[int],
          label: str, seed: int = 0) -> dict:
    """One row per thread count. Prompt tokens are seeded random ids, as llama-bench uses random tokens."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (1, prompt_tokens), generator=gen)
    weights = weight_bytes_in_memory(model)
    per_token = weight_bytes_per_token(model)
    previous_threads = torch.get_num_threads()
    rows = []
    try:
        for n in threads:
            torch.set_num_threads(n)
            rows.append(_timed_row(n, lambda: _pp(model, prompt), lambda: _tg(model, prompt[:, :1], gen_tokens),
                                   prompt_tokens, gen_tokens, repetitions, label, per_token))
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "protocol": "llama-bench semantics: pp = one batch of N random tokens from an empty cache, the last "
                    "token's logits; tg = M tokens one by one from an empty cache; 1 warm-up, then timed "
                    "repetitions; tokens/sec; GB/s = weight bytes read per token × tg tokens/sec",
        "weight_bytes_in_memory": weights, "weight_bytes_per_token": per_token,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }


def bench_llamacpp(path: Path, prompt_tokens: int, gen_tokens: int, repetitions: int, threads: list[int],
                   label: str, seed: int = 0) -> dict:
    """llama-bench semantics on llama.cpp's runtime: pp = one batch of N random tokens from an empty cache,
    tg = M tokens one by one from an empty cache; 1 warm-up, then timed repetitions; tokens/sec."""
    weights = sum(weight_bytes_gguf(path).values())
    per_token = weights - untied_token_embedding_bytes(path)
    model = None

    def pp() -> float:
        model.llm.reset()
        start = time.perf_counter()
        model.llm.eval(prompt)
        return time.perf_counter() - start

    def tg() -> float:
        model.llm.reset()
        start = time.perf_counter()
        for token in generated:
            model.llm.eval([token])
        return time.perf_counter() - start

    rows = []
    try:
        for n in threads:
            if model is not None:
                model.close()
            model = LlamaCppModel(path, n_ctx=prompt_tokens + gen_tokens + 8, threads=n, logits_all=False)
            rng = np.random.default_rng(seed)
            prompt = rng.integers(0, model.vocab_size, prompt_tokens).tolist()
            generated = rng.integers(0, model.vocab_size, gen_tokens).tolist()  # fed one by one, as tg decodes
            rows.append(_timed_row(n, pp, tg, prompt_tokens, gen_tokens, repetitions, label, per_token))
    finally:
        if model is not None:
            model.close()
    return {"protocol": "llama-bench semantics on llama.cpp (llama-cpp-python): pp = one batch of N random "
                        "tokens from an empty cache; tg = M tokens one by one from an empty cache; 1 warm-up, "
                        f"then timed repetitions; tokens/sec; {model.settings if model else ''}",
            "backend": "llama.cpp", "weight_bytes_in_memory": weights, "weight_bytes_per_token": per_token,
            "dtype": "gguf", "cpu_count": os.cpu_count(),
            "rows": rows}


def untied_token_embedding_bytes(path: Path) -> int:
    """token_embd.weight's bytes in a GGUF that also has its own output.weight (a decode step reads one row of it);
    0 when the output projection reuses it (tied: read whole per token)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    return tensors.get("token_embd.weight", 0) if "output.weight" in tensors else 0


def bench_speed(model, sp, label: str, seed: int, bandwidth: dict | None) -> dict:
    """llama-bench-style pp/tg on the model's own runtime (`sp`: the recipe's Speed), each tg row also as a
    fraction of the machine's streaming bandwidth when it was measured."""
    if isinstance(model, LlamaCppModel):
        model.close()  # the bench loads its own instance; two open at once would double the measured memory
        out = bench_llamacpp(model.path, sp.prompt_tokens, sp.gen_tokens, sp.repetitions, sp.threads, label, seed)
    elif isinstance(model, MlxModel):
        out = bench_mlx(model, sp.prompt_tokens, sp.gen_tokens, sp.repetitions, label, seed, _timed_row)
    else:
        out = bench(model, model.config.vocab_size, sp.prompt_tokens, sp.gen_tokens, sp.repetitions, sp.threads,
                    label, seed=seed)
    if bandwidth:  # decode reads every weight once per token: GB/s achieved ÷ GB/s available
        for row in out["rows"]:
            row["tg"]["roofline_fraction"] = row["tg"]["gb_per_s"] / bandwidth["gb_per_s"]
    return out
