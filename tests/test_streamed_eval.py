"""Evaluation of a base streamed layer by layer from its shards (eval.stream): the same logits, perplexity and
base log-probabilities as the whole model in memory, for a plain Llama, a tied Gemma 3, Gemma 2's final logit
soft-capping and Mistral, with sliding windows shorter than the chunks."""

import pytest
import torch

from conftest import build_tiny_llama
from quantize.measure import quality
from quantize.measure.streamed import StreamedModel
from quantize.sources.models import load_model, load_tokenizer
from quantize.sources.texts import load_text

# windows of 32 tokens, shorter than the 128-token chunks: the stream masks each windowed layer as the model does
FAMILIES = {
    "llama": {},
    "gemma3_text": {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 32, "num_hidden_layers": 6,
                    "tie_word_embeddings": True},
    "gemma2": {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 32, "num_hidden_layers": 4,
               "tie_word_embeddings": True, "final_logit_softcapping": 30.0},
    "mistral": {"sliding_window": 32},  # every layer windowed (no layer_types), under sdpa
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_logits_equal_the_whole_model(family, tmp_path):
    model_dir = build_tiny_llama(tmp_path / family, model_type=family, **FAMILIES[family])
    ids = torch.randint(3, 512, (3, 128), generator=torch.Generator().manual_seed(0))  # 4 windows long
    whole = load_model(model_dir, "float32")
    streamed = dict(StreamedModel(model_dir).chunk_logits(ids))
    assert sorted(streamed) == [0, 1, 2]
    with torch.no_grad():
        for i in range(3):
            diff = (streamed[i] - whole(ids[i : i + 1]).logits[0]).abs().max().item()
            print(f"{family} chunk {i}: streamed vs whole model max |Δlogit| {diff:.3g}")
            assert diff < 1e-4


def test_streamed_base_scores_equal_the_in_memory_ones(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    chunks = quality.make_chunks(tokenizer, load_text("bundled:wiki", "eval"), 128, 4)
    whole = quality.score_model(load_model(tiny_model, "float32"), chunks, None)
    streamed = quality.score_model(StreamedModel(tiny_model), chunks, None)
    print(f"PPL whole {whole['ppl']:.6f}, streamed {streamed['ppl']:.6f}")
    assert streamed["ppl"] == pytest.approx(whole["ppl"], rel=1e-6)


def test_run_with_a_streamed_base(tmp_path):
    """`eval.stream: true` in a run: the base's scores and the compressed-tensors variant's come from the stream
    (their loaders say so); dtype other than float32 is refused at validation, naming the key. (The base cache is shared
    with unstreamed runs, whose logits are the same: a model of its own here, so the stream computes them.)"""
    import json

    tiny_model = build_tiny_llama(tmp_path / "own", seed=7)

    from conftest import write_recipe
    from quantize import pipeline
    from quantize.recipe import load_recipe

    out = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), [{"name": "rtn", "bits": 4, "group_size": 64}],
                                      out, eval={"stream": True, "perplexity": {"n_ctx": 128, "max_chunks": 2},
                                                 "speed": {"enabled": False}}))
    pipeline.run(recipe)
    results = json.loads((out / "results.json").read_text())
    text = json.dumps(results["base"])
    assert "layer-by-layer stream" in text, text[:500]
    variant = results["variants"]["rtn-w4-sym-g64"]
    assert variant["loader"].startswith("quantize's layer-by-layer stream"), variant["loader"]
    assert 0 < variant["perplexity"]["kld"]["mean"] < 0.1
    with pytest.raises(Exception, match="stream: true evaluates in float32"):
        load_recipe(write_recipe(tmp_path / "bad.yaml", str(tiny_model), [{"name": "rtn"}], out,
                                 eval={"stream": True, "dtype": "bfloat16"}))


@pytest.mark.parametrize("family,name", [("llama", "gptq"), ("mixtral", "awq")])
def test_streamed_compressed_tensors_equals_its_loader(family, name, tmp_path):
    """A compressed-tensors artefact streamed (its linears dequantized as they are read, experts too) gives the
    logits of the artefact as its loader reloads it: symmetric GPTQ through transformers (an independent
    decompression), asymmetric AWQ of an MoE through compressed-tensors' unpacking."""
    from quantize.methods.configs import AwqMethod, GptqMethod
    from quantize.methods.registry import METHODS
    from quantize.runtimes.load import load
    from quantize.sources.models import resolve_model

    options = {"mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 128}}
    model_dir = build_tiny_llama(tmp_path / family, model_type=family, **options.get(family, {}))
    folder = tmp_path / name
    folder.mkdir()
    calib = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    config = {"gptq": GptqMethod, "awq": AwqMethod}[name](name=name, bits=4, group_size=64)
    METHODS[name].build(config, resolve_model(str(model_dir)), folder, calib)
    ids = torch.randint(3, 512, (2, 128), generator=torch.Generator().manual_seed(1))
    loaded, loader, _ = load(folder, "float32")
    with torch.no_grad():
        for i, logits in StreamedModel(folder).chunk_logits(ids):
            diff = (logits - loaded(ids[i : i + 1]).logits[0]).abs().max().item()
            print(f"{family} {name} artefact chunk {i}: streamed vs {loader.split(' (')[0]}: max |Δlogit| {diff:.3g}")
            assert diff < 1e-4
