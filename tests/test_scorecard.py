"""`quantize eval`: any artefact on its own backend; the base log-probs cached once, compactly, without
changing the KLD."""

import json

import pytest

from conftest import write_recipe
from quantize import pipeline
from quantize.measure import scorecard
from quantize.recipe import load_recipe


@pytest.fixture()
def run(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTIZE_CACHE", str(tmp_path / "cache"))
    methods = [{"name": "rtn", "bits": 4, "group_size": 64}, {"name": "int8", "scheme": "w8a16"}]
    recipe_file = write_recipe(tmp_path / "r.yaml", str(tiny_model), methods, tmp_path / "run",
                               eval={"perplexity": {"n_ctx": 128, "max_chunks": 4}, "speed": {"enabled": False}})
    pipeline.run(load_recipe(recipe_file))
    return tmp_path / "run", load_recipe(recipe_file)


def test_cached_base_gives_the_pipeline_kld_and_repeats_exactly(run, tiny_model):
    out, recipe = run
    in_run = json.loads((out / "results.json").read_text())["variants"]
    first = scorecard.evaluate_artefact(out / "rtn-w4-sym-g64", str(tiny_model), recipe.eval)
    second = scorecard.evaluate_artefact(out / "int8-w8a16", str(tiny_model), recipe.eval)
    again = scorecard.evaluate_artefact(out / "rtn-w4-sym-g64", str(tiny_model), recipe.eval)
    assert first["base"]["cache"] == "computed now" and second["base"]["cache"] == "reused"
    for name, res in [("rtn-w4-sym-g64", first), ("int8-w8a16", second)]:
        ours, pipe = res["perplexity"]["kld"]["mean"], in_run[name]["perplexity"]["kld"]["mean"]
        assert abs(ours - pipe) <= 1e-3 * pipe + 1e-6, (name, ours, pipe)  # uint16 cache vs float32 files
        assert res["perplexity"]["ppl"] == pytest.approx(in_run[name]["perplexity"]["ppl"], rel=1e-6)
    assert again["perplexity"] == first["perplexity"]  # the same artefact twice: identical numbers
    assert first["loader"] == "transformers.from_pretrained" and first["protocol"]["perplexity"]["scored_bytes"] > 0


def test_gguf_file_runs_on_llama_cpp(run, tiny_model, tmp_path):
    pytest.importorskip("llama_cpp")
    from quantize.formats.gguf_convert import convert

    out, recipe = run
    gguf = convert(tiny_model, tmp_path / "tiny-q8.gguf", "Q8_0")
    res = scorecard.evaluate_artefact(gguf, str(tiny_model), recipe.eval)
    assert res["format"] == "gguf" and res["loader"].startswith("llama.cpp")
    assert 0 < res["perplexity"]["kld"]["mean"] < 0.05
