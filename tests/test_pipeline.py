"""End to end: recipe → INT8 artefacts → reload with transformers → results, fit, report."""

import json

import torch

from conftest import write_recipe
from quantize import pipeline, preflight
from quantize.methods import int8
from quantize.sources.models import load_model, load_tokenizer
from quantize.recipe import load_recipe

METHODS = [{"name": "int8", "scheme": "w8a16"}, {"name": "int8", "scheme": "llm.int8"}]


def test_tiny_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "tiny-int8"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), METHODS, out))
    assert pipeline.run(recipe) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "tiny-int8"]  # no staging left
    results = json.loads((out / "results.json").read_text())
    base_ppl = results["base"]["perplexity"]["ppl"]
    assert 1 < base_ppl < 10_000
    for name in ("int8-w8a16", "int8-llm.int8"):
        v = results["variants"][name]
        assert v["perplexity"]["tokens_scored"] == 4 * 63
        assert 0 < v["perplexity"]["kld"]["mean"] < 0.5
        row = v["speed"]["rows"][0]
        assert row["threads"] == 1 and row["pp"]["median"] > 0 and row["tg"]["median"] > 0
        assert row["pp"]["min"] <= row["pp"]["median"] <= row["pp"]["max"]
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert manifest["recipe_sha256"] == recipe.sha256()
        assert "model.safetensors" in manifest["files"] and manifest["versions"]["torch"].startswith("2.13")
    # int8 artefacts hold roughly half the fp16 bytes of the quantized linears
    sizes = {n: sum(v["fit"]["weight_bytes_by_dtype"].values()) for n, v in results["variants"].items()}
    assert sizes["int8-w8a16"] < sum(results["base"]["fit"]["weight_bytes_by_dtype"].values())
    assert "I32" in results["variants"]["int8-w8a16"]["fit"]["weight_bytes_by_dtype"]  # packed int8
    report = (out / "report.md").read_text()
    assert "int8-w8a16" in report and "llama-perplexity" in report and "RTX 4090" in report
    fit = json.loads((out / "fit.json").read_text())
    assert set(fit) == {"base", "int8-w8a16", "int8-llm.int8"}


def test_w8a16_reload_matches_in_process(tiny_model, tmp_path):
    """The compressed-tensors artefact reloaded by plain transformers gives the in-process quantized logits."""
    model = load_model(tiny_model, "float32")
    scales, skipped = int8.quantize_w8a16_(model, ["lm_head"])
    assert skipped == ["lm_head"] and len(scales) == 2 * 7
    ids = load_tokenizer(tiny_model)("The history of the city", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    int8.write_compressed_tensors(model, scales, skipped, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 8
    reloaded = load_model(tmp_path / "a", "float32")
    with torch.no_grad():
        got = reloaded(ids).logits
    assert (got - expected).abs().max().item() < 1e-4


def test_plan_expected_size_matches_built_artefact(tiny_model, tmp_path):
    """`plan` predicts the artefact's tensor bytes from the architecture alone; compare with a real build."""
    from quantize.formats.tensors import weight_bytes_safetensors
    from quantize.sources.models import resolve_model

    methods = [{"name": "int8", "scheme": "w8a16"}, {"name": "rtn", "bits": 4, "group_size": 64, "sym": False}]
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), methods, tmp_path / "o"))
    planned = preflight.plan(recipe)["variants"]
    base = resolve_model(str(tiny_model))
    for method in recipe.methods:
        folder = tmp_path / method.default_variant()
        folder.mkdir()
        pipeline.METHODS[method.name].build(method, base, folder, None)
        actual = sum(weight_bytes_safetensors(folder).values())
        expected = planned[method.default_variant()]["expected_bytes"]
        assert abs(expected - actual) / actual < 0.01, (method.default_variant(), expected, actual)


def test_eval_kld_false_stores_no_base_and_reports_no_kld(tiny_model, tmp_path, monkeypatch):
    """`eval.kld: false` (plan prints "KLD off"): the run writes no store of the base's log-probabilities and
    reports perplexity only, for the base and every variant."""
    monkeypatch.setenv("QUANTIZE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "no-kld"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), [{"name": "int8", "scheme": "w8a16"}],
                                      out, eval={"kld": False, "perplexity": {"n_ctx": 64, "max_chunks": 2},
                                                 "speed": {"enabled": False}}))
    pipeline.run(recipe)
    results = json.loads((out / "results.json").read_text())
    assert results["base"]["perplexity_cache"]["state"] == "not stored (eval.kld: false)"
    variant = results["variants"]["int8-w8a16"]["perplexity"]
    assert variant["ppl"] > 0 and "kld" not in variant
    assert not list((tmp_path / "cache").rglob("*.kld*")) and not (out / "kld-positions").exists()
