"""Llama 3.1 as users run it: the README's recipe (recipes/llama3-int4.yaml) on a local tiny Llama-3.1-config model
with --set, its offline failure before any work, and Llama 3.1's rope scaling through GGUF on llama.cpp."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, build_tiny_llama, f32_gguf_logits
from quantize.sources.models import load_model

# Llama 3.1's rope scaling, with a short original context so that most rotary frequencies are scaled within the
# few hundred positions a test runs (8192 in the real model)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


@pytest.fixture(scope="module")
def tiny_llama31(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("llama31") / "tiny-llama-3.1", rope_parameters=LLAMA3_ROPE)


def quantize(*args, cwd=REPO, **env):
    return subprocess.run([sys.executable, "-m", "quantize.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=900)


def test_llama3_rope_gguf_matches_transformers(tiny_llama31, tmp_path):
    """The F32 GGUF (with rope_freqs) on llama.cpp gives transformers' logits; without the scaling they differ."""
    import gguf

    from quantize.formats.gguf_convert import convert

    path = convert(tiny_llama31, tmp_path / "f32.gguf", "F32")
    freqs = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    assert freqs.tensor_type.name == "F32" and len(freqs.data) == 64 // 2
    ids, a = f32_gguf_logits(tiny_llama31, path)
    with torch.no_grad():
        hf = load_model(tiny_llama31, "float32")
        b = hf(torch.tensor([ids])).logits[0]
        hf.config.rope_parameters = {"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]}
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)
        unscaled = hf(torch.tensor([ids])).logits[0]
    diff, scaling = (a - b).abs().max().item(), (unscaled - b).abs().max().item()
    print(f"llama3-rope F32 GGUF vs transformers: max |Δlogit| {diff:.3g}; default rope instead: {scaling:.3g}")
    assert diff < 1e-3 and scaling > 100 * diff


def test_llama3_recipe_with_set_runs_end_to_end(tiny_llama31, tmp_path):
    """The README's recipe as CI runs it: the same file, a local model and smaller settings given with --set."""
    out = tmp_path / "run"
    sets = [f"model={tiny_llama31}", f"output={out}", "calibration.samples=8", "calibration.seq_len=64",
            "eval.perplexity.n_ctx=128", "eval.perplexity.max_chunks=2", "eval.speed.enabled=false",
            "eval.dtype=float32"]
    r = quantize("run", "recipes/llama3-int4.yaml", *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-3000:]
    resolved = (out / "recipe.yaml").read_text()
    assert "overrides:" in resolved and f"model={tiny_llama31}" in resolved
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == {"gptq-w4-sym-g128", "awq-w4-asym-g128", "gguf-q4_k_m-imat"}
    loaders = {name: v["loader"] for name, v in results["variants"].items()}
    assert loaders["gptq-w4-sym-g128"] == "transformers.from_pretrained"
    assert loaders["gguf-q4_k_m-imat"].startswith("llama.cpp")
    for name, v in results["variants"].items():
        kld = v["perplexity"]["kld"]["mean"]
        print(f"{name}: PPL {v['perplexity']['ppl']:.3f}, KLD {kld:.4f}, loader {v['loader']}")
        assert 0 < kld < 1
    assert (out / "gguf-q4_k_m-imat" / "imatrix.gguf").is_file()
    assert results["base"]["fit"]["largest_context"].keys() == {"RTX 4060", "RTX 3060", "RTX 4060 Ti", "RTX 4090",
                                                                 "L40S", "A100 80GB"}


def test_llama3_recipe_offline_exits_2_before_any_work(tmp_path):
    start = time.perf_counter()
    r = quantize("run", "recipes/llama3-int4.yaml", "--set", f"output={tmp_path / 'out'}")
    seconds = time.perf_counter() - start
    print(f"offline llama3-int4: exit {r.returncode} after {seconds:.1f} s: {r.stderr.strip()}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'meta-llama/Llama-3.1-8B-Instruct'" in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr
    assert "--set model=DIR" in r.stderr and "Error" not in r.stderr  # what to do, not an exception class name
    assert list(tmp_path.iterdir()) == []  # nothing written
