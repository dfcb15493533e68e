"""Speed with llama-bench semantics, on the torch runtime the artefact really loads into.

pp N: one forward pass over N prompt tokens from an empty cache.  tg M: M tokens generated one at a time from
an empty cache (greedy, each step feeding back the previous argmax).  Fixed thread count per row (swept like
llama-bench -t), one warm-up run, then `repetitions` timed runs: median, min and max tokens/sec. The sanity
check from gpt-fast: weight bytes in memory × tg tokens/sec = GB/s achieved, which can never exceed the
machine's memory bandwidth. Peak RSS is the process's resident peak during each phase (model included).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from quantize import memory
from quantize.ui import track


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


@torch.inference_mode()
def _pp(model, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    model(tokens, use_cache=True)
    return time.perf_counter() - start


@torch.inference_mode()
def _tg(model, first_token: torch.Tensor, n: int) -> float:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    token = first_token
    start = time.perf_counter()
    for _ in range(n):
        logits = model(token, past_key_values=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
    return time.perf_counter() - start


def _stats(tokens: int, seconds: list[float]) -> dict:
    rates = [tokens / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": len(rates)}


def bench(model, vocab_size: int, prompt_tokens: int, gen_tokens: int, repetitions: int, threads: list[int],
          label: str, seed: int = 0) -> dict:
    """One row per thread count. Prompt tokens are seeded random ids, as llama-bench uses random tokens."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (1, prompt_tokens), generator=gen)
    weights = weight_bytes_in_memory(model)
    previous_threads = torch.get_num_threads()
    rows = []
    try:
        for n in threads:
            torch.set_num_threads(n)
            load_before = os.getloadavg()[0]
            _pp(model, prompt), _tg(model, prompt[:, :1], gen_tokens)  # warm-up
            memory.reset_peak()
            pp = [_pp(model, prompt) for _ in track(range(repetitions), f"pp{prompt_tokens} {label} t={n}")]
            pp_peak = memory.peak_rss_bytes()
            memory.reset_peak()
            tg = [_tg(model, prompt[:, :1], gen_tokens) for _ in track(range(repetitions), f"tg{gen_tokens} {label} t={n}")]
            tg_peak = memory.peak_rss_bytes()
            tg_stats = _stats(gen_tokens, tg)
            rows.append({
                "threads": n,
                "pp": {"tokens": prompt_tokens, **_stats(prompt_tokens, pp), "peak_rss_bytes": pp_peak},
                "tg": {"tokens": gen_tokens, **tg_stats, "peak_rss_bytes": tg_peak,
                       "gb_per_s": weights * tg_stats["median"] / 1e9},
                "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
            })
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "protocol": "llama-bench semantics: pp = one batch of N random tokens from an empty cache; "
                    "tg = M tokens one by one from an empty cache; 1 warm-up, then timed repetitions; tokens/sec",
        "weight_bytes_in_memory": weights,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "cpu_count": os.cpu_count(),
        "rows": rows,
    }
