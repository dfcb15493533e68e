"""The same recipe run twice writes the same bytes: every file of every artefact (as each manifest lists them,
all but manifest.json and results.json, which hold timings) has the same sha256. The second run takes the base
model's perplexity and log-probabilities from the cache the first one filled, and gets the same KLDs."""

import json


from conftest import write_recipe
from quantize import pipeline
from quantize.recipe import load_recipe


def test_same_recipe_twice_same_bytes(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTIZE_CACHE", str(tmp_path / "cache"))
    methods = [{"name": "rtn", "bits": 4, "group_size": 64}, {"name": "gptq", "bits": 4, "group_size": 64},
               {"name": "awq", "bits": 4, "group_size": 64}, {"name": "int8"},
               {"name": "gguf", "type": "Q4_K_M"}]
    files = []
    for run in ("a", "b"):
        recipe = load_recipe(write_recipe(tmp_path / f"{run}.yaml", str(tiny_model), methods, tmp_path / run,
                                          calibration={"samples": 8, "seq_len": 64},
                                          eval={"perplexity": {"n_ctx": 128, "max_chunks": 1},
                                                "speed": {"enabled": False}}))
        pipeline.run(recipe)
        files.append({m.default_variant(): json.loads((tmp_path / run / m.default_variant() / "manifest.json")
                                                      .read_text())["files"] for m in recipe.methods})
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("a", "b")]
    assert [r["base"]["perplexity_cache"]["state"] for r in results] == ["computed", "reused"]
    assert results[0]["base"]["perplexity"] == results[1]["base"]["perplexity"]
    for name, v in results[0]["variants"].items():
        assert v["perplexity"]["kld"] == results[1]["variants"][name]["perplexity"]["kld"], name
    for variant, listed in files[0].items():
        assert listed, variant
        for name, entry in listed.items():
            print(f"{variant}/{name}: {entry['sha256'][:16]}")
        assert listed == files[1][variant], variant
