"""Model families beyond Llama on the same engine, writers and converter: a tiny random-init model of each, built
from its transformers config here (no hub), through RTN, GPTQ, AWQ and GGUF, reloaded by each format's loader."""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_llama, f32_gguf_logits, write_recipe
from quantize import pipeline
from quantize.recipe import load_recipe
from quantize.sources.models import load_model

FAMILIES = {
    # Llama 3.1+: rope type llama3 (its frequency bands against an original context of 64 tokens, so the 128-token
    # tests reach the scaled band); Llama 2/3's default rope is the other llama-family tests' tiny model
    "llama": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                  "rope_theta": 500000.0}},
    "mistral": {"sliding_window": 4096},  # llama's graph in llama.cpp; the window is longer than any test sequence
    "qwen2": {},  # q/k/v biases
    "qwen3": {"head_dim": 64},  # per-head q/k RMSNorms inside the attention
    # sandwich norms, scaled embedding, (1 + w) norms; six layers as Gemma 3's pattern (five sliding-window, one
    # global with its own rotary table), the pattern llama.cpp assumes for gemma3
    "gemma3_text": {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 128, "num_hidden_layers": 6},
    "phi3": {"pad_token_id": 0},  # fused qkv_proj and gate_up_proj
    # Gemma 3's layout with attention and final-logit soft-capping, which only eager attention computes (the engine
    # then passes a causal mask); alternating sliding-window and global layers
    # (tied embeddings, as every Gemma 2: mlx-lm's Gemma 2 has no lm_head of its own)
    "gemma2": {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 128, "num_hidden_layers": 4,
               "tie_word_embeddings": True},
    # sparse mixtures of experts, 4 experts with 2 per token (transformers holds them as 3-D tensors, the engine
    # as linears: engine.ExpertList); Qwen3-MoE's second layer keeps a dense MLP (mlp_only_layers)
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 128},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "head_dim": 64,
                  "mlp_only_layers": [1], "norm_topk_prob": True},
    # NoPE layers in a Llama body: every fourth layer's attention has no rotary embedding (llama.cpp's smollm3 graph
    # fixes that interval at 4)
    "smollm3": {"no_rope_layer_interval": 4, "num_hidden_layers": 4, "pad_token_id": 0},
    # GLM-4.x MoE: a dense first layer, then a sigmoid router with a score-correction bias over 4 experts plus a
    # shared expert; partial rotary, q/k norms
    "glm4_moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                 "n_shared_experts": 1, "first_k_dense_replace": 1, "head_dim": 64, "use_qk_norm": True,
                 "partial_rotary_factor": 0.5, "num_hidden_layers": 3},
    # DeepSeek-V3: multi-head latent attention (q and KV latents with their norms, interleaved rope key), a dense
    # first layer, then routed experts with a shared expert under a grouped sigmoid router (mlx-lm splits kv_b_proj
    # per head and quantizes each part on its own: qk_nope_head_dim and v_head_dim are multiples of the group size)
    # Qwen3.5 (hybrid): three Gated DeltaNet linear-attention layers, then one gated full-attention layer. 16 value
    # heads (in_proj_b/a's rows, as Qwen3.5-0.8B): compressed-tensors 0.20 cannot unpack an asymmetric zero point of
    # 8 rows or fewer (one packed word: a view of a transposed [groups, 1] tensor fails)
    "qwen3_5_text": {"num_hidden_layers": 4, "head_dim": 64, "linear_num_key_heads": 4, "linear_num_value_heads": 16,
                     "linear_key_head_dim": 32, "linear_value_head_dim": 32},
    # Qwen3.5-MoE: Qwen3.5's hybrid layers with 4 routed experts (2 per token) and a shared expert behind its
    # sigmoid gate in every layer
    "qwen3_5_moe_text": {"num_hidden_layers": 4, "head_dim": 64, "linear_num_key_heads": 4,
                         "linear_num_value_heads": 16, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
                         "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                         "shared_expert_intermediate_size": 128},
    # DeepSeek-V2-Lite's layout: MLA without a query latent (q_proj), a dense first layer, then routed experts under
    # a softmax router with a shared expert; its YaRN rotary scaling (factor 40 over an original context, here of
    # 64 tokens so that the tests reach the scaled band; mlx-lm's DeepSeek-V2 requires a rope_scaling)
    "deepseek_v2": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                    "n_shared_experts": 1, "first_k_dense_replace": 1, "q_lora_rank": None, "kv_lora_rank": 64,
                    "qk_rope_head_dim": 32, "qk_nope_head_dim": 64, "v_head_dim": 64, "num_hidden_layers": 3,
                    "num_key_value_heads": 4,
                    "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                        "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "mscale": 0.707, "mscale_all_dim": 0.707}},
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
                    "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1,
                    "q_lora_rank": 64, "kv_lora_rank": 64, "qk_rope_head_dim": 32, "qk_nope_head_dim": 64,
                    "v_head_dim": 64, "num_hidden_layers": 3, "num_key_value_heads": 4},
}
# families the layer-wise engine does not stream yet (their rows say why): the fit, and GGUF through llama.cpp's
# converter without an importance matrix. gpt-oss: attention sinks, sliding and full layers alternating (a window of
# 32 tokens, shorter than the test sequences), biased experts with interleaved gate/up columns
FIT_ONLY_FAMILIES = {
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 128, "head_dim": 64,
                "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"],
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                    "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}},
}
# transformers loads its own Qwen2 tokenizer class for model type qwen2, with Qwen2's pre-tokenizer over the test's
# small vocabulary; GGUF conversion identifies a pre-tokenizer by the token ids of a check text (as llama.cpp's
# converter does), which only a real Qwen2 vocabulary gives. So no GGUF for the tiny qwen2.
NO_GGUF = {"qwen2", "gemma3_text", "phi3", "gemma2", "mixtral", "qwen3_moe", "smollm3", "glm4_moe", "deepseek_v3",
           "qwen3_5_text", "qwen3_5_moe_text", "deepseek_v2"}


def quantized_linear(name: str, module: torch.nn.Module) -> bool:
    """Whether the methods quantize this module of a transformers model: every decoder linear but a shared expert's
    one-row sigmoid gate (Qwen3.5-MoE), which stays in float as the router does (vLLM holds it as a plain torch
    Linear)."""
    return isinstance(module, torch.nn.Linear) and ".layers." in name and not name.endswith("shared_expert_gate")


def gguf_vs_transformers(model_dir, gguf_file, label: str) -> float:
    """Max |Δlogit| of an F32 GGUF on llama.cpp against transformers on the same held-out token ids."""
    ids, a = f32_gguf_logits(model_dir, gguf_file)
    with torch.no_grad():
        b = load_model(model_dir, "float32")(torch.tensor([ids])).logits[0]
    diff = (a - b).abs().max().item()
    print(f"{label}: F32 GGUF on llama.cpp vs transformers: max |Δlogit| {diff:.3g} over {len(ids)} tokens")
    return diff


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}"
    return request.param, build_tiny_llama(folder, model_type=request.param, **FAMILIES[request.param])


def test_f32_gguf_matches_transformers(family_model, tmp_path):
    from quantize.formats.gguf_convert import convert

    family, model_dir = family_model
    if family in NO_GGUF:
        pytest.skip(f"tiny {family}: no GGUF pre-tokenizer for its test vocabulary (see NO_GGUF)")
    assert gguf_vs_transformers(model_dir, convert(model_dir, tmp_path / "f32.gguf", "F32"), family) < 1e-3


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


@pytest.mark.parametrize("family", ["mistral", "gemma3_text", "phi3"])
def test_calibration_longer_than_a_sliding_window(family, tmp_path):
    """Calibration sequences four windows long: the stages GPTQ runs (Mistral's staged llama layer, the hooked
    layers of Gemma 3 and Phi-3) mask each windowed layer as transformers does, so the streamed layers compute the
    model's own hidden states (Mistral and Phi-3 window every layer; Gemma 3 its sliding layers)."""
    from quantize.methods.engine import hooked_layer, layer_stages, staged_layer, stream_layers
    from quantize.sources.architectures import ARCHITECTURES

    overrides = {**FAMILIES[family], "sliding_window": 16}
    model_dir = build_tiny_llama(tmp_path / family, model_type=family, **overrides)
    arch = ARCHITECTURES[family]
    ids = torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    streamed = []

    def process(i, layer, acts):
        if arch.layer.staged:
            out = staged_layer(layer, acts, lambda group, X: None)
        else:
            out = hooked_layer(layer, acts, layer_stages(arch, layer), lambda names, X: None)
        streamed.append(out)
        return out

    for _ in stream_layers(model_dir, ids, process):
        pass
    with torch.no_grad():
        expected = load_model(model_dir, "float32")(ids, output_hidden_states=True).hidden_states
    for i, h in enumerate(streamed[:-1]):
        diff = (h - expected[i + 1]).abs().max().item()
        assert diff < 1e-4, (family, i, diff)


def test_awq_scales_fold_into_the_same_function(family_model):
    """AWQ with every scale folded and nothing rounded: each architecture's fold (norm weights stored as offsets
    from 1 in Gemma, the up half of Phi-3's fused gate_up) leaves the model's logits as they were."""
    from quantize.methods.awq import awq_layer
    from quantize.methods.configs import AwqMethod
    from quantize.methods.engine import awq_rows, stream_layers
    from quantize.sources.architectures import ARCHITECTURES
    from quantize.sources.models import transformers_names

    family, model_dir = family_model
    arch = ARCHITECTURES[family]
    method = AwqMethod(name="awq", bits=4, group_size=64, clip=False, export="scaled-fp16")
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(3, 512, (4, 64), generator=g)
    scaled, log = {}, []

    def process(i, layer, acts):
        awq_layer(i, layer, acts, awq_rows(arch, layer), method, lambda name, cols: 64, lambda name: False, {},
                  log, quantize=False, norm_offset=arch.layer.norm_offset)

    for i, layer in stream_layers(model_dir, calib, process):
        scaled.update({f"model.layers.{i}.{k}": v.clone() for k, v in layer.state_dict().items()})
    model = load_model(model_dir, "float32")
    scaled = transformers_names(scaled, family)
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


GGUF_ARCH = {"gemma3_text": "gemma3", "phi3": "phi3", "mixtral": "llama", "qwen3_moe": "qwen3moe", "smollm3": "smollm3",
             "glm4_moe": "glm4moe", "deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2", "qwen3_5_text": "qwen35",
             "qwen3_5_moe_text": "qwen35moe", "gpt_oss": "gpt-oss"}


# llama.cpp's deepseek2 graph takes a model without a query latent (q_proj: DeepSeek-V2-Lite's layout) only at
# V2-Lite's depth, 26 or 27 layers (src/models/deepseek2.cpp: is_lite); at any other it requires q_lora_rank
GGUF_OVERRIDES = {"deepseek_v2": {"num_hidden_layers": 27}}

# GLM's: [gMASK] (its BOS), <|user|>, <|endoftext|>, <|observation|>
ADDED_TOKENS = {"glm4_moe": ["[gMASK]", "<|user|>", "<|endoftext|>", "<|observation|>"]}


@pytest.fixture(scope="module", params=sorted(GGUF_ARCH))
def real_vocab_model(request, tmp_path_factory):
    """A tiny random-init model of a family our own converter does not write, with SmolLM2's real tokenizer (whose
    pre-tokenizer llama.cpp's converter recognises; the tests' trained BPE it would not)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quantize.sources.models import resolve_model

    family = request.param
    smollm2 = resolve_model("bundled:smollm2-135m").path
    # the folder's name becomes the GGUF's general.name, from which llama.cpp guesses model-specific special tokens
    # (a name with "phi3" in it must hold Phi-3's <|end|> …): a neutral name
    folder = tmp_path_factory.mktemp(family) / "tiny-smollm2-vocab"
    # llama.cpp's qwen3moe has experts in every layer (no mlp_only_layers)
    overrides = {k: v for k, v in {**FAMILIES, **FIT_ONLY_FAMILIES}[family].items()
                 if k not in ("pad_token_id", "mlp_only_layers")}
    overrides.update(GGUF_OVERRIDES.get(family, {}))
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024)
    config = AutoConfig.for_model(family, vocab_size=49152 + 8, tie_word_embeddings=False, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0, **{**shape, **overrides})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2 / name).is_file():
            shutil.copy(smollm2 / name, folder / name)
    if family in ADDED_TOKENS:  # the special tokens llama.cpp's converter looks up for this family's real vocabulary
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.add_special_tokens({"additional_special_tokens": ADDED_TOKENS[family]})
        assert len(tokenizer) <= config.vocab_size
        tokenizer.save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"  # Phi-3's converter takes a GPT-2 style BPE by this name
    tok_config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**tok_config, "tokenizer_class": "GPT2Tokenizer"}))
    return family, folder


# transformers 5.23 loads its own tokenizer class for these model types whatever tokenizer_config.json names
# (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS): Qwen's pre-tokenizer over SmolLM2's vocabulary, which llama.cpp's
# converter cannot identify (it knows the real Qwen vocabulary). The test's tiny model names GPT2Tokenizer, so here
# transformers honours that name, in this process and (through a sitecustomize) in the converter's
TOKENIZER_CLASS_FORCED = {"qwen3_5_moe_text"}


def honour_tokenizer_class(family: str, monkeypatch, folder: Path) -> None:
    from transformers.models.auto import tokenization_auto

    monkeypatch.setattr(tokenization_auto, "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS",
                        tokenization_auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS - {family})
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "from transformers.models.auto import tokenization_auto\n"
        f"tokenization_auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS.discard({family!r})\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]))


def test_llama_cpp_converter_writes_other_families(real_vocab_model, tmp_path, monkeypatch):
    """Families outside our converter go through llama.cpp's own convert_hf_to_gguf.py: the F32 GGUF on llama.cpp
    gives transformers' logits, and the pipeline's GGUF method quantises and evaluates it."""
    from quantize.formats.gguf_convert import ARCHES, convert, gguf_arch

    family, model_dir = real_vocab_model
    if family in TOKENIZER_CLASS_FORCED:
        honour_tokenizer_class(family, monkeypatch, tmp_path / "tokenizer-class")
    assert family not in ARCHES
    gguf_file = convert(model_dir, tmp_path / "f32.gguf", "F32")
    assert gguf_arch(gguf_file) == GGUF_ARCH[family]
    assert gguf_vs_transformers(model_dir, gguf_file, f"{family} (llama.cpp's converter)") < 1e-3
    # the fit reads the same shape from the GGUF's header as from config.json (KV per token, MLA's latent, the
    # linear-attention layers' state)
    from quantize.fit.context_memory import kv_cache_bytes
    from quantize.fit.shape import param_counts, shape_config_from_gguf, shape_from_config

    config = json.loads((model_dir / "config.json").read_text())
    from_gguf = shape_config_from_gguf(gguf_file)
    assert kv_cache_bytes(shape_from_config(from_gguf), 1024, 2, "f16") == kv_cache_bytes(
        shape_from_config(config), 1024, 2, "f16")
    if family != "mixtral":  # llama.cpp stores Mixtral as `llama` with experts, which the GGUF reader reads as dense
        assert param_counts(from_gguf).total == param_counts(config).total
    out = tmp_path / "run"
    # the importance matrix runs on the layer-wise engine, which a fit-only family does not have
    imatrix = family not in FIT_ONLY_FAMILIES
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(model_dir), [{"name": "gguf", "type": "Q8_0"},
                                      {"name": "gguf", "type": "Q4_K_M", "imatrix": imatrix}], out,
                                      calibration={"samples": 4, "seq_len": 64},
                                      eval={"perplexity": {"n_ctx": 128, "max_chunks": 2}, "speed": {"enabled": False}}))
    pipeline.run(recipe)
    variants = json.loads((out / "results.json").read_text())["variants"]
    for name, v in variants.items():
        assert v["loader"].startswith("llama.cpp") and 0 <= v["perplexity"]["kld"]["mean"] < 0.1, name
    import gguf  # the general.* keys LM Studio shows, given to llama.cpp's converter as its --metadata override

    for name in variants:
        fields = gguf.GGUFReader(out / name / "model.gguf").fields
        assert fields["general.name"].contents() == model_dir.name
        assert fields["general.quantized_by"].contents() == "quantize"
        assert fields["general.base_model.0.name"].contents() == model_dir.name
        assert fields["general.size_label"].contents().endswith("M")


def test_a_bf16_base_stays_bf16(tiny_model, tmp_path):
    """A base stored in bfloat16 gives artefacts whose config, scales and unquantized tensors are bfloat16 (not
    forced to fp16), and they reload with transformers; an fp16 base keeps fp16."""
    from safetensors import safe_open

    base = tmp_path / "bf16-base"
    model = load_model(tiny_model, "float32").to(torch.bfloat16)
    model.save_pretrained(base)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (base / f.name).write_bytes(f.read_bytes())
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    methods = [{"name": "rtn", "bits": 4, "group_size": 64}, {"name": "int8"}]
    out = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(base), methods, out,
                                      eval={"perplexity": {"n_ctx": 128, "max_chunks": 2}, "speed": {"enabled": False}}))
    pipeline.run(recipe)
    results = json.loads((out / "results.json").read_text())["variants"]
    for name in ("rtn-w4-sym-g64", "int8-w8a16"):
        folder = out / name
        assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16", name
        dtypes = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(shard, "pt") as f:
                dtypes.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
        scales = {d for k, d in dtypes.items() if k.endswith("weight_scale")}
        dense = {d for k, d in dtypes.items() if k.endswith("norm.weight") or "embed_tokens" in k}
        assert scales == {"BF16"} and dense == {"BF16"}, (name, scales, dense)
        assert results[name]["loader"] == "transformers.from_pretrained"
        assert 0 < results[name]["perplexity"]["kld"]["mean"] < 0.1


def test_meta_skeleton_keeps_tied_embeddings_and_real_buffers():
    """The engine's skeleton: parameters on meta, the output head still the embedding where the config ties them
    (sizes, the writers' lists), and buffers no checkpoint holds (Gemma's embedding scale) real."""
    from transformers import AutoConfig

    from quantize.sources.models import meta_model

    config = AutoConfig.for_model("gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                  tie_word_embeddings=True)
    model = meta_model(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.is_meta
    assert model.model.embed_tokens.embed_scale.item() == pytest.approx(64 ** 0.5)


def test_rtn_artefacts_reload_to_the_in_process_quantised_model(family_model, tmp_path):
    """The quantised model as quantize computes it in process (each decoder linear replaced by its RTN W4 g64
    dequantisation, written out here with the grid primitives) against the artefacts reloaded by their real
    loaders: compressed-tensors by transformers, MLX by mlx-lm. fp16 base, fp32 compute."""
    from quantize.methods import grids
    from quantize.methods.configs import RtnMethod
    from quantize.methods.registry import METHODS
    from quantize.runtimes.load import load
    from quantize.sources.architectures import ARCHITECTURES
    from quantize.sources.models import resolve_model

    family, model_dir = family_model
    expected_model = load_model(model_dir, "float32")

    def rtn(W):  # rows are independent: an expert's fused [gate; up] rows round as gate and up apart
        scale, zero = grids.scale_zero(W, 4, True, 64)
        scale = grids.storable_scale(scale, torch.float16)
        return grids.dequantize(grids.quantize(W, scale, zero, 4, True, 64), scale, zero, 64)

    ids = torch.arange(3, 131)[None]
    expected = {}
    # the linears mlx-lm re-quantizes itself on load stay in float in the MLX artefact (architectures.keep_float)
    mlx_float = ARCHITECTURES[family].keep_float.get("mlx", ())
    with torch.no_grad():
        linears = [(name, lin) for name, lin in expected_model.named_modules() if quantized_linear(name, lin)]
        for name, lin in linears:
            if not name.endswith(mlx_float):
                lin.weight.data = rtn(lin.weight.data)
        experts = [p for name, p in expected_model.named_parameters()  # transformers' 3-D [experts, out, in]
                   if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
        for p in experts:
            p.data = torch.stack([rtn(W) for W in p.data])
        expected["mlx"] = expected_model(ids).logits[0]
        for name, lin in linears:
            if mlx_float and name.endswith(mlx_float):
                lin.weight.data = rtn(lin.weight.data)
        # transformers 5.23 dequantizes compressed experts into the checkpoint's dtype (fp16), whatever dtype the
        # model is loaded in: its reloaded experts are these weights rounded to fp16
        for p in experts:
            p.data = p.data.half().float()
        expected["compressed-tensors"] = expected_model(ids).logits[0]
    formats = ["compressed-tensors"]
    try:
        import mlx_lm  # noqa: F401
        formats.append("mlx")
    except ImportError:
        pass
    for fmt in formats:
        folder = tmp_path / fmt
        folder.mkdir()
        METHODS["rtn"].build(RtnMethod(name="rtn", bits=4, group_size=64, format=fmt), resolve_model(str(model_dir)),
                             folder, None)
        model, loader, _ = load(folder, "float32")
        with torch.no_grad():
            got = model(ids).logits[0] if isinstance(model, torch.nn.Module) else model.logits(ids[0].tolist())
        diff = (got - expected[fmt]).abs().max().item()
        print(f"{family} RTN W4 g64 {fmt} ({loader.split(' (')[0]}) vs in-process: max |Δlogit| {diff:.3g}")
        assert diff < 1e-4


@pytest.mark.parametrize("name", ["gptq", "awq"])
def test_calibrated_artefacts_reload_to_the_in_process_quantised_model(family_model, name, tmp_path):
    """GPTQ and AWQ: the model as the build left it in process (every quantized linear holding its dequantized
    weights, AWQ's scales folded into the norms; the writer's `keep`) against the compressed-tensors artefact
    reloaded by its real loader (transformers; asymmetric AWQ through compressed-tensors' own unpacking, which
    transformers cannot do, llm-compressor#1618), the folded norms rounded to fp16 as the artefact stores them."""
    from quantize.methods.configs import AwqMethod, GptqMethod
    from quantize.sources.models import transformers_names
    from quantize.methods.registry import METHODS
    from quantize.runtimes.load import load
    from quantize.sources.models import resolve_model

    family, model_dir = family_model
    config = {"gptq": GptqMethod, "awq": AwqMethod}[name](name=name, bits=4, group_size=64)
    calib = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    keep: dict = {}
    METHODS[name].build(config, resolve_model(str(model_dir)), tmp_path, calib, keep=keep)
    expected_model = load_model(model_dir, "float32")
    state = transformers_names(keep, family)
    missing = set(state) - set(expected_model.state_dict())
    assert not missing, missing
    model, loader, _ = load(tmp_path, "float32")
    if loader == "transformers.from_pretrained":  # which dequantizes MoE experts into fp16 (see the RTN test)
        state = {k: v.half().float() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v
                 for k, v in state.items()}
    if name == "awq":  # the artefact stores the norms (and MoE routers) AWQ scaled in fp16, as the base does
        state = {k: v.half().float() if "norm" in k or k.endswith(".gate.weight") else v for k, v in state.items()}
    expected_model.load_state_dict(state, strict=False)
    ids = torch.arange(3, 131)[None]
    with torch.no_grad():
        diff = (model(ids).logits[0] - expected_model(ids).logits[0]).abs().max().item()
    print(f"{family} {name.upper()} W4 g64 compressed-tensors ({loader.split(' (')[0]}) vs in-process: "
          f"max |Δlogit| {diff:.3g}")
    assert diff < 1e-4


def test_gemma2_gguf_through_llama_cpp_converter(tmp_path):
    """Gemma 2's GGUF: llama.cpp's converter reads a SentencePiece `tokenizer.model` (as every real Gemma 2 ships),
    so the tiny Gemma 2 here gets one trained on the bundled text; the F32 GGUF on llama.cpp (attention and final
    logit soft-capping, alternating sliding-window and global layers) gives transformers' logits."""
    import sentencepiece as spm
    from transformers import AutoConfig, AutoModelForCausalLM, GemmaTokenizer

    from quantize.formats.gguf_convert import convert, gguf_arch
    from quantize.sources.texts import bundled_wiki

    folder = tmp_path / "tiny-gemma2"
    folder.mkdir()
    text = tmp_path / "text.txt"
    text.write_text(bundled_wiki("calibration").text[:400_000])
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "spm"), vocab_size=1000,
                                   model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True,
                                   minloglevel=2)
    (folder / "tokenizer.model").write_bytes((tmp_path / "spm.model").read_bytes())
    GemmaTokenizer.from_pretrained(folder).save_pretrained(folder)  # its tokenizer.json, from tokenizer.model
    config = AutoConfig.for_model("gemma2", vocab_size=1000, hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                  **{k: v for k, v in FAMILIES["gemma2"].items() if k != "num_hidden_layers"})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(folder)
    gguf_file = convert(folder, tmp_path / "f32.gguf", "F32")
    assert gguf_arch(gguf_file) == "gemma2"
    assert gguf_vs_transformers(folder, gguf_file, "gemma2 (llama.cpp's converter)") < 1e-3


def test_int8_artefact_reloads_to_the_in_process_quantised_model(family_model, tmp_path):
    """INT8 W8A16 (per-channel symmetric int8, fp16 scales; through compressed-tensors' own packing for dense
    models, through the engine for MoE) reloaded by transformers, against the model with each decoder linear (and
    expert) on its int8 grid, written out here with the grid primitives."""
    from quantize.methods import grids
    from quantize.methods.configs import Int8Method
    from quantize.methods.registry import METHODS
    from quantize.runtimes.load import load
    from quantize.sources.models import resolve_model

    family, model_dir = family_model

    def int8(W):
        scale, zero = grids.scale_zero(W, 8, True)
        scale = grids.storable_scale(scale, torch.float16)
        return grids.dequantize(grids.quantize(W, scale, zero, 8, True), scale, zero)

    expected_model = load_model(model_dir, "float32")
    with torch.no_grad():
        for name, lin in expected_model.named_modules():
            if quantized_linear(name, lin):
                lin.weight.data = int8(lin.weight.data)
        for name, p in expected_model.named_parameters():  # experts, rounded to fp16 by transformers' loader
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.data = torch.stack([int8(W) for W in p.data]).half().float()
        ids = torch.arange(3, 131)[None]
        expected = expected_model(ids).logits[0]
    METHODS["int8"].build(Int8Method(name="int8"), resolve_model(str(model_dir)), tmp_path)
    model, loader, _ = load(tmp_path, "float32")
    with torch.no_grad():
        diff = (model(ids).logits[0] - expected).abs().max().item()
    print(f"{family} INT8 W8A16 ({loader}) vs in-process: max |Δlogit| {diff:.3g}")
    assert diff < 1e-4
