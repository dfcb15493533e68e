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
    # sandwich norms, scaled embedding, (1 + w) norms, a sliding and a global layer with their own rotary tables
    "gemma3_text": {"head_dim": 64, "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {"pad_token_id": 0},  # fused qkv_proj and gate_up_proj
}
# transformers loads its own Qwen2 tokenizer class for model type qwen2, with Qwen2's pre-tokenizer over the test's
# small vocabulary; GGUF conversion identifies a pre-tokenizer by the token ids of a check text (as llama.cpp's
# converter does), which only a real Qwen2 vocabulary gives. So no GGUF for the tiny qwen2.
NO_GGUF = {"qwen2", "gemma3_text", "phi3"}


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


def test_streamed_layers_give_the_models_own_hidden_states(family_model):
    """The engine's layer-by-layer run (embedding, rotary tables per layer type, each decoder layer on the meta
    skeleton filled from the shards) computes the hidden states the whole model computes."""
    from quantize.methods.engine import stream_layers

    family, model_dir = family_model
    ids = torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    streamed = []
    for _, _ in stream_layers(model_dir, ids, lambda i, layer, acts: streamed.append(acts.run(layer))):
        pass
    with torch.no_grad():
        expected = load_model(model_dir, "float32")(ids, output_hidden_states=True).hidden_states
    for i, h in enumerate(streamed[:-1]):  # the last entry of hidden_states has the final norm applied
        diff = (h - expected[i + 1]).abs().max().item()
        assert diff < 1e-4, (family, i, diff)


def test_awq_scales_fold_into_the_same_function(family_model):
    """AWQ with every scale folded and nothing rounded: each architecture's fold (norm weights stored as offsets
    from 1 in Gemma, the up half of Phi-3's fused gate_up) leaves the model's logits as they were."""
    from quantize.methods.awq import awq_layer
    from quantize.methods.configs import AwqMethod
    from quantize.methods.engine import LAYOUTS, stream_layers

    family, model_dir = family_model
    layout = LAYOUTS[family]
    method = AwqMethod(name="awq", bits=4, group_size=64, clip=False, export="scaled-fp16")
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(3, 512, (4, 64), generator=g)
    scaled, log = {}, []

    def process(i, layer, acts):
        awq_layer(i, layer, acts, layout.awq, method, lambda name, cols: 64, lambda name: False, {}, log,
                  quantize=False, norm_offset=layout.norm_offset)

    for i, layer in stream_layers(model_dir, calib, process):
        scaled.update({f"model.layers.{i}.{k}": v.clone() for k, v in layer.state_dict().items()})
    model = load_model(model_dir, "float32")
    moved = [k for k, v in model.state_dict().items() if k in scaled and (scaled[k] - v).abs().max() > 1e-3]
    searched = {r["module"] for r in log if r["alpha"] not in (None, "s=1")}
    assert moved and searched, (family, moved, searched)  # the scales really moved something
    ids = torch.randint(3, 512, (2, 96), generator=g)
    with torch.no_grad():
        before = model(ids).logits
        model.load_state_dict(scaled, strict=False)
        after = model(ids).logits
    diff = (after - before).abs().max().item()
    print(f"{family}: max |Δlogit| after folding {diff:.3g}; scaled: {sorted(searched)}")
    assert diff < 1e-4
