"""The architecture table (quantize/sources/architectures.py): every row complete and true to transformers' own
model of the family, and a family without a row refused before any work, naming what is missing."""

import json

import pytest

from quantize.common.errors import QuantizeError
from quantize.sources.architectures import ARCHITECTURES, architecture, streamed_layer

STREAMED = sorted(t for t, a in ARCHITECTURES.items() if a.layer is not None)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_row_is_complete(model_type):
    from transformers import CONFIG_MAPPING

    arch = ARCHITECTURES[model_type]
    assert arch.model_type == model_type and model_type in CONFIG_MAPPING
    assert arch.attention in ("gqa", "mla", "hybrid") and arch.norms in (2, 4) and arch.gguf_arch
    assert arch.gguf_writer in ("quantize", "llama.cpp")
    assert (arch.layer is None) == bool(arch.layer_refusal), "a row without a streamed layer says why"
    if arch.moe is not None:
        m = arch.moe
        assert m.block and len(m.linears) == 3 and m.count_key and m.width_key
        assert (m.shared is None) == (m.shared_key is None and m.shared_width_key is None)
        assert not m.shared_gate or m.shared, "a shared expert's gate without a shared expert"
    if arch.layer is not None:
        names = [n for g in arch.layer.groups for n in g]
        assert len(names) == len(set(names)), "a linear in two groups"
        for prev, linears, block in arch.layer.awq:
            assert prev and linears and block


def tiny_meta_model(model_type: str):
    """transformers' own model of the family at its default configuration, shrunk, on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    shrink = {"num_hidden_layers": 3, "hidden_size": 256, "intermediate_size": 256, "vocab_size": 256,
              "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    config = AutoConfig.for_model(model_type, **shrink)
    if hasattr(config, "first_k_dense_replace"):
        config.first_k_dense_replace = 1  # one dense layer, then MoE layers
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", STREAMED)
def test_every_group_and_awq_row_names_linears_the_model_has(model_type):
    """Each true-sequential group and each AWQ row names linears of transformers' decoder layer (in one of the
    layers: a dense first layer, a MoE layer), and each AWQ row's feeding op and judging block exist."""
    import torch

    from quantize.methods.engine import awq_rows, layer_stages, present
    from quantize.methods.experts import with_experts

    arch = ARCHITECTURES[model_type]
    model = with_experts(tiny_meta_model(model_type))
    layers = list(model.model.layers)
    for group in arch.layer.groups:
        if any(n.startswith("mlp.") for n in group) and arch.moe is not None:
            continue  # in a MoE layer the MLP rows become per-expert ones (checked below)
        assert any(present(layer, group) for layer in layers), (model_type, group)
    for layer in layers:
        stages = layer_stages(arch, layer)
        linears = {n for stage in stages for g in stage for n in g}
        every = {n for n, m in layer.named_modules()  # every linear but a router and a shared expert's gate,
                 if isinstance(m, torch.nn.Linear) and not n.endswith((".gate", ".shared_expert_gate"))}  # unquantized
        assert linears == every, (model_type, sorted(every ^ linears))
        for prev, names, block in awq_rows(arch, layer):
            layer.get_submodule(prev), layer.get_submodule(block)
            assert all(isinstance(layer.get_submodule(n), torch.nn.Linear) for n in names)


def test_a_family_without_a_row_is_refused_naming_the_table(tmp_path):
    with pytest.raises(QuantizeError, match=r"model type 'gemma4_text' has no row in quantize's architecture table"):
        architecture({"model_type": "gemma4_text"})
    with pytest.raises(QuantizeError, match=r"x/config.json: no `model_type` key"):
        architecture({}, "x/config.json")
    with pytest.raises(QuantizeError, match=r"'qwen3_5_moe': the multimodal Qwen3.5-MoE checkpoint.*"
                                            r"take the text model \(`qwen3_5_moe_text`\)"):
        streamed_layer({"model_type": "qwen3_5_moe"})


def test_plan_refuses_a_layer_wise_method_on_a_fit_only_family(tmp_path):
    """gpt-oss has a row for the fit and GGUF (llama.cpp's converter), not for the layer-wise engine: `quantize plan`
    of gptq on it exits 2 naming what the engine lacks, before any work."""
    import subprocess
    import sys

    from conftest import build_tiny_llama, write_recipe

    model = build_tiny_llama(tmp_path / "tiny-gpt-oss", model_type="gpt_oss", num_local_experts=4,
                             num_experts_per_tok=2, intermediate_size=128, head_dim=64, sliding_window=32,
                             layer_types=["sliding_attention", "full_attention"])
    recipe = write_recipe(tmp_path / "r.yaml", str(model), [{"name": "gptq", "bits": 4, "group_size": 64}],
                          tmp_path / "out")
    out = subprocess.run([sys.executable, "-m", "quantize.cli", "plan", str(recipe)], capture_output=True, text=True)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "'gpt_oss'" in out.stderr and "no expert module in the engine" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    # a GGUF mix whose importance matrix is on by default (Q4_K_M): the refusal names the key that turns it off,
    # and with it off the plan goes through
    for imatrix, code in ((None, 2), (False, 0)):
        gguf = {"name": "gguf", "type": "Q4_K_M", **({} if imatrix is None else {"imatrix": imatrix})}
        recipe = write_recipe(tmp_path / "g.yaml", str(model), [gguf], tmp_path / "out")
        out = subprocess.run([sys.executable, "-m", "quantize.cli", "plan", str(recipe)], capture_output=True,
                             text=True)
        assert out.returncode == code, out.stdout + out.stderr
        assert ("set `imatrix: false`" in out.stderr) == (code == 2), out.stderr


def test_plan_refuses_a_family_without_a_row(tmp_path):
    """`quantize plan` of a gptq recipe on a model whose type has no row: exit 2, the message names the type and
    the table, before any work."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import save_file

    from conftest import write_recipe

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gemma4_text", "architectures": ["Gemma4ForCausalLM"],
                                                   "num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 64,
                                                   "num_attention_heads": 4, "intermediate_size": 64}))
    save_file({"model.embed_tokens.weight": torch.zeros(64, 64)}, model / "model.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", str(model), [{"name": "gptq", "bits": 4, "group_size": 32}],
                          tmp_path / "out")
    out = subprocess.run([sys.executable, "-m", "quantize.cli", "plan", str(recipe)], capture_output=True, text=True)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "'gemma4_text'" in out.stderr and "architecture table" in out.stderr and "Traceback" not in out.stderr


def test_the_readme_holds_the_generated_families_table():
    from pathlib import Path

    from quantize.report.families import families_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert families_markdown() in readme, "README's families table is stale: paste `quantize families` into it"
