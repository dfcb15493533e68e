"""`quantize eval`: any artefact on its own backend, against the one base store that `quantize run` uses."""

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


def test_eval_reuses_the_runs_base_and_gives_its_numbers_to_the_last_digit(run, tiny_model):
    """One base store for `run` and `eval`: eval finds the file the run wrote, and the same artefact scored by both
    has identical perplexity and KLD statistics, every digit."""
    out, recipe = run
    results = json.loads((out / "results.json").read_text())
    in_run = results["variants"]
    first = scorecard.evaluate_artefact(out / "rtn-w4-sym-g64", str(tiny_model), recipe.eval)
    second = scorecard.evaluate_artefact(out / "int8-w8a16", str(tiny_model), recipe.eval)
    assert results["base"]["perplexity_cache"]["state"] == "computed"
    assert first["base"]["perplexity_cache"]["state"] == second["base"]["perplexity_cache"]["state"] == "reused"
    assert first["base"]["perplexity_cache"]["key"] == results["base"]["perplexity_cache"]["key"]
    for name, res in [("rtn-w4-sym-g64", first), ("int8-w8a16", second)]:
        assert res["perplexity"] == in_run[name]["perplexity"], name  # the whole KLD report, all digits
        assert res["perplexity"]["kld"]["mean"] > 0
    assert first["base"]["perplexity"] == results["base"]["perplexity"]
    assert first["loader"] == "transformers.from_pretrained" and first["protocol"]["perplexity"]["scored_bytes"] > 0


def test_gguf_file_runs_on_llama_cpp(run, tiny_model, tmp_path):
    from quantize.formats.gguf_convert import convert

    out, recipe = run
    gguf = convert(tiny_model, tmp_path / "tiny-q8.gguf", "Q8_0")
    res = scorecard.evaluate_artefact(gguf, str(tiny_model), recipe.eval)
    assert res["format"] == "gguf" and res["loader"].startswith("llama.cpp")
    assert 0 < res["perplexity"]["kld"]["mean"] < 0.05


def test_eval_cli_summary_set_and_device(run, tiny_model, tmp_path):
    """Review §2: `quantize eval` prints its one-line summary (not the whole JSON) unless --json; --out writes the
    JSON too; --set takes eval keys like `run --set` and --device names where it runs, both recorded in the result;
    a key outside eval or an unknown device is one message and exit 2."""
    from typer.testing import CliRunner

    from quantize.cli import app

    out, _ = run
    artefact = out / "rtn-w4-sym-g64"
    common = ["eval", str(artefact), "--base", str(tiny_model), "--no-speed", "--set", "eval.perplexity.n_ctx=64",
              "--set", "eval.perplexity.max_chunks=2"]
    r = CliRunner().invoke(app, [*common, "--device", "cpu", "--out", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    assert "PPL" in r.output and "KLD" in r.output and "{" not in r.output  # the summary, not the JSON
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["device"] == "cpu" and saved["protocol"]["perplexity"]["chunks"] == 2
    assert saved["protocol"]["perplexity"]["n_ctx"] == 64
    r = CliRunner().invoke(app, [*common, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout[r.stdout.index("{"):])["perplexity"]["kld"]["mean"] > 0
    for bad, words in ((["--set", "methods.0.bits=3"], "takes eval keys"), (["--device", "tpu"], "--device: unknown")):
        r = CliRunner().invoke(app, [*common, *bad])
        assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output


def test_a_gguf_tokenizer_is_converted_once_and_reloaded_the_same(tmp_path, monkeypatch):
    """A GGUF evaluated without a base takes its tokenizer from the file (transformers' GGUF reader: ~17 s for Gemma
    3's 262k vocabulary); the conversion is kept in the cache folder and the reloaded tokenizer gives the same ids."""
    from quantize.sources.models import bundled_gguf, tokenizer_sha256
    from quantize.sources.texts import bundled_wiki

    monkeypatch.setenv("QUANTIZE_CACHE", str(tmp_path / "cache"))
    path = bundled_gguf("smollm2-135m")
    converted = scorecard.tokenizer_for(path, None)
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1
    cached = scorecard.tokenizer_for(path, None)
    text = bundled_wiki("eval").text[:20000]
    assert tokenizer_sha256(cached) == tokenizer_sha256(converted)
    assert cached(text).input_ids == converted(text).input_ids
