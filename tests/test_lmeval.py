"""lm-eval tasks offline on the in-memory model: local task files, data from held-out text, hub tasks refused."""

import json
import time

import pytest

from conftest import write_recipe
from quantize import pipeline
from quantize.measure import lmeval
from quantize.common.errors import QuantizeError
from quantize.sources.models import load_model, load_tokenizer
from quantize.recipe import load_recipe

import lm_eval  # noqa: E402,F401  a hard dependency: a broken install fails here


def test_local_tasks_run_in_the_pipeline(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTIZE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), [{"name": "rtn", "bits": 8, "group_size": -1}],
                                      out, eval={"perplexity": {"n_ctx": 64, "max_chunks": 2}, "speed": {"enabled": False},
                                                 "tasks": ["wiki_rolling", "wiki_cloze"], "task_limit": 3}))
    pipeline.run(recipe)
    results = json.loads((out / "results.json").read_text())
    for entry in (results["base"], results["variants"]["rtn-w8-sym-ch"]):
        r = entry["lm_eval"]["results"]
        assert r["quantize_wiki_rolling"]["bits_per_byte"] > 0 and 0 <= r["quantize_wiki_cloze"]["acc"] <= 1
        assert entry["lm_eval"]["protocol"]["limit"] == 3
    assert "## lm-eval tasks" in (out / "report.md").read_text()
    # `quantize eval` with the recipe runs its tasks too, on the same artefact with the same numbers
    from typer.testing import CliRunner

    from quantize.cli import app

    got = CliRunner().invoke(app, ["eval", str(out / "rtn-w8-sym-ch"), "--recipe", str(tmp_path / "r.yaml"),
                                   "--no-speed"])
    assert got.exit_code == 0, got.output
    rolling = results["variants"]["rtn-w8-sym-ch"]["lm_eval"]["results"]["quantize_wiki_rolling"]
    assert f"lm-eval quantize_wiki_rolling: " in got.output
    assert f"bits_per_byte {rolling['bits_per_byte']:.4f}" in got.output
    docs = [json.loads(line) for line in (tmp_path / "cache" / "lmeval-data" / "wiki_cloze.jsonl").read_text().splitlines()]
    assert len(docs) > 100 and all(d["word"].isalpha() and len(d["word"]) >= 4 for d in docs)


def test_hub_task_offline_fails_fast(tiny_model):
    start = time.perf_counter()
    with pytest.raises(QuantizeError, match="hub is offline"):
        lmeval.run(load_model(tiny_model, "float32"), load_tokenizer(tiny_model), ["hellaswag"])
    assert time.perf_counter() - start < 30
