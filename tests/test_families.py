"""Model families beyond Llama on the same engine, writers and converter: a tiny random-init model of each, built
from its transformers config here (no hub), through RTN, GPTQ, AWQ and GGUF, reloaded by each format's loader."""

import json

import pytest
import torch

from conftest import build_tiny_llama, f32_gguf_logits, write_recipe
from quantize import pipeline
from quantize.recipe import load_recipe
from quantize.sources.models import load_model

FAMILIES = {
    "mistral": {"sliding_window": 4096},  # llama's graph in llama.cpp; the window is longer than any test sequence
    "qwen2": {},  # q/k/v biases
    "qwen3": {"head_dim": 64},  # per-head q/k RMSNorms inside the attention
}
# transformers loads its own Qwen2 tokenizer class for model type qwen2, with Qwen2's pre-tokenizer over the test's
# small vocabulary; GGUF conversion identifies a pre-tokenizer by the token ids of a check text (as llama.cpp's
# converter does), which only a real Qwen2 vocabulary gives. So no GGUF for the tiny qwen2.
NO_GGUF = {"qwen2"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}"
    return request.param, build_tiny_llama(folder, model_type=request.param, **FAMILIES[request.param])


def test_f32_gguf_matches_transformers(family_model, tmp_path):
    from quantize.formats.gguf_convert import convert

    family, model_dir = family_model
    if family in NO_GGUF:
        pytest.skip(f"tiny {family}: no GGUF pre-tokenizer for its test vocabulary (see NO_GGUF)")
    ids, a = f32_gguf_logits(model_dir, convert(model_dir, tmp_path / "f32.gguf", "F32"))
    with torch.no_grad():
        b = load_model(model_dir, "float32")(torch.tensor([ids])).logits[0]
    diff = (a - b).abs().max().item()
    print(f"{family}: F32 GGUF on llama.cpp vs transformers: max |Δlogit| {diff:.3g}")
    assert diff < 1e-3


def test_every_method_builds_and_reloads(family_model, tmp_path):
    family, model_dir = family_model
    methods = [{"name": "rtn", "bits": 4, "group_size": 64}, {"name": "gptq", "bits": 4, "group_size": 64},
               {"name": "awq", "bits": 4, "group_size": 64}, {"name": "int8"}]
    if family not in NO_GGUF:
        methods.append({"name": "gguf", "type": "Q8_0"})
    out = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(model_dir), methods, out,
                                      calibration={"samples": 8, "seq_len": 64},
                                      eval={"perplexity": {"n_ctx": 128, "max_chunks": 2}, "speed": {"enabled": False}}))
    pipeline.run(recipe)
    results = json.loads((out / "results.json").read_text())
    assert set(results["variants"]) == {m.default_variant() for m in recipe.methods}
    for name, v in results["variants"].items():
        kld = v["perplexity"]["kld"]
        print(f"{family} {name}: KLD {kld['mean']:.5f}, same top {kld['same_top']:.3f}, loader {v['loader']}")
        assert 0 <= kld["mean"] < 0.1  # a random-init model: flat distributions, so same-top says little
