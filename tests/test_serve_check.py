"""The serve check inside a run (eval.serve): every variant behind its engine's OpenAI-compatible server, measured
with the official client, the server gone afterwards; a variant its engine cannot serve is marked, and fails the
must_serve gate."""

import json
import os
from pathlib import Path

import pytest

from conftest import write_recipe
from quantize import pipeline
from quantize.measure import serving
from quantize.recipe import Serve, load_recipe

SERVE = {"enabled": True, "requests": 4, "concurrency": 2, "max_tokens": 8, "repetitions": 2, "timeout": 120}


def engine_processes() -> list[str]:
    """Command lines of running engine servers (ours are the only ones on this machine)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(k in cmd for k in ("llama_cpp.server", "mlx_lm server", "transformers serve")):
            found.append(cmd)
    return found


@pytest.fixture(scope="module")
def talking_model(tiny_model, tmp_path_factory):
    """The tiny random Llama in float32, made to answer in text: the output rows of tokens that do not decode to printable
    text on their own (lone UTF-8 bytes, which the servers hold back while streaming) and of the special tokens
    (EOS would end an answer at once) are zeroed, so greedy decoding picks a word piece."""
    import torch

    from quantize.sources.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    model = load_model(tiny_model, "float32")  # float32: MLX's CPU backend serves it (see the test at the end)
    silent = [i for i in range(tokenizer.vocab_size)
              if i in tokenizer.all_special_ids or not tokenizer.decode([i]).isprintable()
              or "\ufffd" in tokenizer.decode([i]) or not tokenizer.decode([i]).strip()]
    with torch.no_grad():
        model.lm_head.weight[silent] = 0
    folder = tmp_path_factory.mktemp("talking") / "tiny-talking"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served_run(talking_model, tmp_path_factory):
    tiny_model = talking_model
    tmp = tmp_path_factory.mktemp("served")
    methods = [{"name": "gguf", "type": "Q8_0"}, {"name": "rtn", "bits": 4, "group_size": 64},
               {"name": "rtn", "bits": 4, "group_size": 64, "sym": False},
               {"name": "rtn", "bits": 4, "group_size": 64, "format": "mlx"}]
    out = tmp / "run"
    recipe = load_recipe(write_recipe(tmp / "r.yaml", str(tiny_model), methods, out, gates={"must_serve": True},
                                      eval={"perplexity": {"n_ctx": 128, "max_chunks": 2}, "serve": SERVE,
                                            "speed": {"prompt_tokens": 16, "gen_tokens": 8, "repetitions": 2,
                                                      "threads": [1]}}))
    before = engine_processes()
    pipeline.run(recipe)
    return out, before


def test_every_servable_variant_answers_and_is_measured(served_run):
    out, before = served_run
    variants = json.loads((out / "results.json").read_text())["variants"]
    engines = {"gguf-q8_0": "llama.cpp", "rtn-w4-sym-g64": "transformers", "rtn-w4-sym-g64-mlx": "mlx"}
    for name, engine in engines.items():
        s = variants[name]["serve"]
        print(f"{name}: {s['engine']} TTFT {1000 * s['stream']['ttft_s']:.0f} ms, API decode "
              f"{s['stream']['decode_tokens_per_s']:.1f} t/s, {s['concurrent']['tokens_per_s']:.1f} t/s at "
              f"concurrency {s['concurrent']['concurrency']}")
        assert s["status"] == "ok" and s["engine"] == engine and s["answer"].strip()
        assert s["stream"]["ttft_s"] > 0 and s["stream"]["decode_tokens_per_s"] > 0
        assert s["concurrent"]["completion_tokens"] > 0 and s["concurrent"]["empty_answers"] == 0
        assert "127.0.0.1" in s["command"]
        assert variants[name]["gates"]["passed"]
    assert engine_processes() == before, "a server was left running"


def test_a_variant_its_engine_cannot_serve_is_marked_and_fails_the_gate(served_run):
    out, _ = served_run
    results = json.loads((out / "results.json").read_text())
    s = results["variants"]["rtn-w4-asym-g64"]["serve"]
    assert s["status"] == "refused" and "vLLM serves it" in s["reason"]
    assert results["gates"]["failed"] == ["rtn-w4-asym-g64: must_serve (measured refused, limit True)"]
    report = (out / "report.md").read_text()
    assert "## Serving (OpenAI-compatible API)" in report and "**refused**" in report


def test_a_server_that_cannot_load_fails_the_check_without_hanging(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    res = serving.check(corrupt, Serve(**{**SERVE, "timeout": 60}))
    assert res["status"] == "failed" and any(why in res["reason"] for why in ("the llama.cpp server exited",
                                                                             "failed to load the model"))
    assert engine_processes() == []


def test_compare_shows_the_serve_check(served_run):
    from quantize.report import compare

    out, _ = served_run
    rows = {r.name: r for r in compare.load_rows([out])}
    assert rows["rtn-w4-asym-g64"].serve == "refused" and rows["base"].serve == "–"
    assert rows["gguf-q8_0"].serve.endswith(" ms") and "API t/s / TTFT" in compare.markdown(list(rows.values()))


def test_mlx_float16_is_not_served_on_mlx_cpu_backend(tiny_model, tmp_path):
    """MLX's CPU backend runs float16 quantized matmuls too slowly to measure a real model: the check says so
    instead of timing out (on Apple Silicon it runs)."""
    from quantize.methods.configs import RtnMethod
    from quantize.methods.registry import METHODS
    from quantize.runtimes import mlx
    from quantize.sources.models import resolve_model

    if not mlx.on_cpu():
        pytest.skip("MLX has a GPU here")
    folder = tmp_path / "mlx-fp16"
    folder.mkdir()
    METHODS["rtn"].build(RtnMethod(name="rtn", group_size=64, format="mlx"), resolve_model(str(tiny_model)), folder,
                         None)
    res = serving.check(folder, Serve(**SERVE))
    assert res["status"] == "skipped" and "float16" in res["reason"] and engine_processes() == []
