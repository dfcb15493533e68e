"""`quantize fit` for models not downloaded: parameter counts and weight bytes per format from published
hyper-parameters (tests/data/configs), checked against hand arithmetic and published file sizes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantize.fit.context_memory import kv_cache_bytes
from quantize.fit.gpus import GiB, gpu_by_name
from quantize.fit.shape import shape_from_config
from quantize.fit.vram import fit_one
from quantize.fit.footprint import describe_model, param_counts, weight_bytes
from quantize.formats.gguf_types import use_more_bits

CONFIGS = Path(__file__).parent / "data" / "configs"


def config(name):
    return json.loads((CONFIGS / f"{name}.json").read_text())


def test_llama3_8b_counts_and_formats_by_hand():
    c = param_counts(config("llama-3-8b"))
    attn = 4096 * 4096 * 2 + 4096 * 1024 * 2  # q, o + k, v (8 KV heads × 128)
    mlp = 3 * 4096 * 14336
    assert c.total == 2 * 128256 * 4096 + 32 * (attn + mlp) + 32 * 2 * 4096 + 4096 == 8_030_261_248  # "8.03B"
    linears = 32 * (attn + mlp)
    assert weight_bytes(c, "fp16") == 2 * c.total
    assert weight_bytes(c, "int4") == int(linears * 4.125 / 8) + 2 * (2 * 128256 * 4096 + 32 * 2 * 4096 + 4096)
    # the recipe's names mean the same bytes, in any case: int4 = w4g128, int8 = w8ch, Q4_K_M = q4_k_m
    edges = 2 * (2 * 128256 * 4096 + 32 * 2 * 4096 + 4096)
    assert weight_bytes(c, "W4G128") == weight_bytes(c, "int4")
    assert weight_bytes(c, "w4g32") == int(linears * 4.5 / 8) + edges
    assert weight_bytes(c, "w8ch") == weight_bytes(c, "int8") == linears + 2 * 32 * (4096 + 1024 * 2 + 4096 + 14336 * 2 + 4096) + edges
    assert weight_bytes(c, "Q4_K_M") == weight_bytes(c, "q4_k_m")
    # Q4_K_M: 16 of 32 layers (first 4, last 4, and 6, 9, …, 27 between) keep attn_v and ffn_down at Q6_K
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    q4km = weight_bytes(c, "q4_k_m")
    assert abs(q4km - 4_920_739_232) / 4_920_739_232 < 0.01  # a published Llama-3-8B-Instruct Q4_K_M file
    assert abs(weight_bytes(c, "q8_0") - 8_540_770_784) / 8_540_770_784 < 0.01  # and its Q8_0


def test_mixtral_resident_and_active():
    c = param_counts(config("mixtral-8x7b"))
    assert round(c.total / 1e9, 1) == 46.7 and round(c.active / 1e9, 1) == 12.9  # Mistral's published figures
    expert = 3 * 4096 * 14336
    assert c.total - c.active == 32 * 6 * expert  # 6 of 8 experts idle per token, every layer


def test_gemma3_27b_sliding_kv_by_hand():
    m = describe_model(str(CONFIGS / "gemma-3-27b.json"), "int4")
    shape = m["shape"]
    assert (shape.n_layers, shape.sliding_layers, shape.sliding_window) == (62, 52, 1024)  # 1 global in 6
    per_token = 2 * 16 * 128 * 2  # K+V × 16 KV heads × head_dim 128 × f16
    swa_cells = 1024 + 512  # llama.cpp's SWA cache: the window + one 512-token micro-batch, padded to 256
    assert kv_cache_bytes(shape, 131072, 1, "f16") == per_token * (10 * 131072 + 52 * swa_cells)
    assert kv_cache_bytes(shape, 131072, 1, "f16") < 0.2 * kv_cache_bytes(
        shape.__class__(**{**shape.__dict__, "sliding_layers": 0}), 131072, 1, "f16")


def test_rule_of_thumb_70b_int4_on_24gb_is_false():
    """'24 GB → 70B INT4 just barely': the int4 weights alone are ~37 GiB, past a 24 GB card's 22.8 GiB usable."""
    m = describe_model(str(CONFIGS / "llama-3-70b.json"), "int4")
    assert 36 * GiB < m["weights_bytes"] < 38 * GiB
    row = fit_one(m["weights_bytes"], m["shape"], gpu_by_name("RTX 4090"), 8192, 1, "f16")
    assert not row.fits and row.headroom_bytes < -15 * GiB
    assert fit_one(m["weights_bytes"], m["shape"], gpu_by_name("A100 80GB"), 32768, 1, "f16").fits


def test_fit_cli_on_config_and_gguf(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "quantize.cli", "fit", *a], capture_output=True,  # noqa: E731
                                    text=True)
    out = run(str(CONFIGS / "mixtral-8x7b.json"), "--weights", "q4_k_m", "--gpu", "H100 SXM", "--ctx", "32768", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["params_active"] < report["params_total"] and report["rows"][0]["fits"]
    assert "H100 SXM" in report["decode_tokens_per_s_estimate"]
    bad = run(str(tmp_path / "nothing.gguf"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nothing.gguf" in bad.stderr


def test_deepseek_v3_mla_kv_and_counts_by_hand():
    """MLA: llama.cpp caches, per token and layer, the compressed latent (kv_lora_rank) and the shared rope key
    (qk_rope_head_dim), one K cache and no V; a GQA formula would count 2 × 128 heads × head_dim instead."""
    cfg = config("deepseek-v3")
    shape = shape_from_config(cfg)
    per_token = 61 * (512 + 64)  # layers × (kv_lora_rank + qk_rope_head_dim) = 35,136 elements
    assert kv_cache_bytes(shape, 1, 1, "f16") == per_token * 2 == 70_272
    assert kv_cache_bytes(shape, 131072, 1, "f16") == 131072 * per_token * 2  # 8.58 GiB at 128k
    assert kv_cache_bytes(shape, 131072, 1, "f16") < 2 * 128 * 56 * 61 * 131072 * 2 / 20
    c = param_counts(cfg)
    # DeepSeek's README_WEIGHTS: 671B in the main model (61 layers, without the MTP module), 36.6B activated
    # including the 0.9B output head; the active count here also holds the 0.9B embedding.
    assert round(c.total / 1e9) == 671
    assert round((c.active - c.embedding) / 1e9, 1) == 36.6
    assert (c.n_dense_layers, c.n_moe_layers, c.n_experts, c.n_active) == (3, 58, 256, 8)


def test_deepseek_v2_lite_counts_and_kv_by_hand():
    """DeepSeek-V2-Lite (deepseek_v2, its published config.json's shape keys transcribed from memory, no copy being
    offline; the card's totals below check them): MLA without a query latent (q_proj
    over 16 heads of 128 + 64 rope dims; a 512-wide KV latent), one dense layer, then 26 layers of 64 routed experts
    (6 per token) and 2 shared experts, under a softmax router without a bias. DeepSeek's card: 15.7B total, 2.4B
    activated (without the embedding). MLA caches the latent and the rope key: 576 elements per token and layer."""
    cfg = config("deepseek-v2-lite")
    c = param_counts(cfg)
    H = 2048
    attn = H * 16 * 192 + H * (512 + 64) + 512 * 16 * (128 + 128) + 16 * 128 * H  # q, kv_a, kv_b, o
    expert = 3 * H * 1408
    moe = 64 * expert + 2 * expert + H * 64  # routed, 2 shared of the same width, the router
    norms = 27 * 2 * H + 27 * 512 + H  # the layers' norms, the KV latent's norm, the final norm
    embed = 2 * 102400 * H  # untied
    assert c.total == embed + 27 * attn + 3 * H * 10944 + 26 * moe + norms == 15_706_484_224
    assert c.active == c.total - 26 * 58 * expert  # 58 of 64 routed experts idle per token
    assert round(c.total / 1e9, 1) == 15.7 and (c.active - c.embedding) // 10**7 == 245  # the card: "2.4B"
    assert kv_cache_bytes(shape_from_config(cfg), 1, 1, "f16") == 27 * (512 + 64) * 2 == 31_104


def test_glm_4_5_air_counts_and_kv_by_hand():
    """GLM-4.5-Air (glm4_moe, its published config.json): GQA attention (96 query heads, 8 KV heads of 128), one
    dense layer, then 45 layers of 128 routed experts (8 per token) and one shared expert. Z.ai's card: 106B total,
    12B active. The MTP layer (num_nextn_predict_layers) is not in num_hidden_layers and is not counted."""
    cfg = config("glm-4.5-air")
    c = param_counts(cfg)
    attn = 4096 * 96 * 128 * 2 + 4096 * 8 * 128 * 2  # q, o + k, v (biases not counted)
    dense = 3 * 4096 * 10944
    expert = 3 * 4096 * 1408
    # routed experts, one shared expert of the same width, the router and its score-correction bias per expert
    moe = 128 * expert + expert + 4096 * 128 + 128
    embed = 2 * 151552 * 4096  # untied
    assert c.total == embed + 46 * attn + dense + 45 * moe + 46 * 2 * 4096 + 4096 == 106_851_591_808
    assert c.active == c.total - 45 * 120 * expert  # 120 of 128 routed experts idle per token
    assert c.total // 10**9 == 106 and round((c.active - embed) / 1e9) == 12  # "106B", "12B active"
    shape = shape_from_config(cfg)
    assert kv_cache_bytes(shape, 1, 1, "f16") == 46 * 2 * 8 * 128 * 2 == 188_416  # K+V, 8 KV heads, f16


def test_qwen3_5_27b_hybrid_counts_and_state_by_hand():
    """Qwen3.5-27B's language model (its multimodal config.json; the vision tower is not counted): 64 layers, every
    fourth full attention (24 query heads whose q_proj also gives a sigmoid gate, 4 KV heads of 256), the other 48
    Gated DeltaNet linear attention (16 key heads and 48 value heads of 128, conv kernel 4). Only the 16 full layers
    cache K and V; each linear layer keeps, per sequence, llama.cpp's f32 conv state (kernel − 1) × (value dim +
    2 × key dim) and recurrent state key head dim × value dim, whatever the context."""
    from quantize.fit.context_memory import recurrent_state_bytes

    cfg = config("qwen3.5-27b")
    c = param_counts(cfg)
    H = 5120
    full = H * 24 * 256 * 2 + 2 * H * 4 * 256 + 24 * 256 * H  # q (with its gate), k, v, o
    qkv, value = 2 * 16 * 128 + 48 * 128, 48 * 128
    linear = H * qkv + H * value + 2 * H * 48 + value * H  # in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj
    mlp = 3 * H * 17408
    small = 64 * 2 * H + 16 * 2 * 256 + 48 * (qkv * 4 + 2 * 48 + 128) + H  # norms, q/k norms, conv, A_log, dt_bias
    assert c.total == 2 * 248320 * H + 16 * full + 48 * linear + 64 * mlp + small == 26_895_998_464
    shape = shape_from_config(cfg)
    assert (shape.n_layers, shape.recurrent_layers) == (64, 48)
    state = 3 * (value + 2 * 16 * 128) + 128 * value  # 817,152 f32 elements per layer and sequence
    assert recurrent_state_bytes(shape, 1) == 48 * state * 4 == 156_893_184
    per_token = 16 * 2 * 4 * 256 * 2  # K+V of the 16 full layers, f16
    assert kv_cache_bytes(shape, 262144, 1, "f16") == 262144 * per_token + 48 * state * 4
    assert kv_cache_bytes(shape, 262144, 2, "q8_0") == int(2 * 262144 * per_token / 2 * 34 / 32 + 0.5) + 2 * 48 * state * 4


def test_qwen3_5_35b_a3b_moe_counts_and_state_by_hand():
    """Qwen3.5-35B-A3B's language model: its text config as transformers 5.23's Qwen3_5MoeTextConfig gives it by
    default (that class's docstring: "the Qwen3.5-35B-A3B style configuration"; tests/data/configs wraps it as the
    multimodal checkpoint's config.json, without the vision tower, which is not counted; context 262,144 as the
    family's cards give it). 40 layers, every fourth full attention (16 query heads whose q_proj also gives a gate,
    2 KV heads of 256), 30 Gated DeltaNet layers (16 key heads, 32 value heads of 128, conv kernel 4); in every layer
    256 routed experts of width 512 (8 per token), one shared expert of width 512 behind a one-row sigmoid gate,
    and the router. Qwen's name: 35B total, 3B active."""
    from quantize.fit.context_memory import recurrent_state_bytes

    cfg = config("qwen3.5-35b-a3b")
    c = param_counts(cfg)
    H = 2048
    full = H * 16 * 256 * 2 + 2 * H * 2 * 256 + 16 * 256 * H  # q (with its gate), k, v, o
    qkv, value = 2 * 16 * 128 + 32 * 128, 32 * 128
    linear = H * qkv + H * value + 2 * H * 32 + value * H  # in_proj_qkv, in_proj_z, in_proj_b, in_proj_a, out_proj
    expert = 3 * H * 512
    moe = 256 * expert + expert + H * 256 + H  # routed, shared, router, the shared expert's gate
    small = 40 * 2 * H + 10 * 2 * 256 + 30 * (qkv * 4 + 2 * 32 + 128) + H  # norms, q/k norms, conv, A_log, dt_bias
    embed = 2 * 248320 * H  # untied
    assert c.total == embed + 10 * full + 30 * linear + 40 * moe + small == 34_660_610_688
    assert c.active == c.total - 40 * 248 * expert  # 248 of 256 routed experts idle per token
    assert round(c.total / 1e9) == 35 and round((c.active - embed) / 1e9) == 2  # "35B"; 3.4B with the embeddings
    shape = shape_from_config(cfg)
    assert (shape.n_layers, shape.recurrent_layers) == (40, 30)
    state = 3 * (value + 2 * 16 * 128) + 128 * value  # conv (kernel − 1) × channels + the recurrent state, f32
    assert recurrent_state_bytes(shape, 1) == 30 * state * 4 == 65_863_680
    per_token = 10 * 2 * 2 * 256 * 2  # K+V of the 10 full layers, 2 KV heads, f16
    assert kv_cache_bytes(shape, 262144, 1, "f16") == 262144 * per_token + 30 * state * 4


def test_gpt_oss_20b_counts_and_kv_by_hand():
    """gpt-oss-20b (gpt_oss, its published config.json transcribed from memory, no copy being offline; OpenAI's
    card's totals below check it): 24 layers of GQA attention (64 query heads,
    8 KV heads of 64; a learned sink logit per query head), 12 with a sliding window of 128 tokens alternating with
    12 full ones, 32 experts of width 2880 (4 per token) under a router with a bias; untied embeddings. OpenAI's model
    card: 20.91B total, 3.61B active (its active count leaves the embedding out). Biases are not counted (6.6M in the
    experts). llama.cpp keeps a sliding-window cache for the 12 sliding layers: the window plus one micro-batch of
    512, padded to 256 cells (768)."""
    cfg = config("gpt-oss-20b")
    c = param_counts(cfg)
    H = 2880
    attn = H * 64 * 64 + 2 * H * 8 * 64 + 64 * 64 * H  # q, k, v, o
    expert = 3 * H * 2880
    moe = 32 * expert + (H + 1) * 32  # experts, the router and its bias
    small = 24 * 2 * H + 24 * 64 + H  # norms, the sinks, the final norm
    embed = 2 * 201088 * H
    assert c.total == embed + 24 * (attn + moe) + small == 20_907_929_664
    assert c.active == c.total - 24 * 28 * expert  # 28 of 32 experts idle per token
    assert round(c.total / 1e9, 2) == 20.91 and round((c.active - c.embedding) / 1e9, 2) == 3.61
    shape = shape_from_config(cfg)
    assert (shape.sliding_layers, shape.sliding_window) == (12, 128)
    per_cell = 2 * 8 * 64 * 2  # K+V, 8 KV heads of 64, f16
    assert kv_cache_bytes(shape, 131072, 1, "f16") == 12 * 131072 * per_cell + 12 * 768 * per_cell == 3_240_099_840


def test_llama_4_scout_counts_and_kv_by_hand():
    """Llama-4-Scout-17B-16E's language model: its text config as transformers 5.23's Llama4TextConfig gives it by
    default (that class's docstring: "a similar configuration to that of meta-llama/Llama-4-Scout-17B-16E";
    tests/data/configs wraps it as the multimodal checkpoint's config.json without the vision tower, which is not
    counted). 48 layers of GQA attention (40 query heads, 8 KV heads of 128; its q/k norm has no weights), every
    layer an MoE block of 16 routed experts of width 8192 (1 per token), one shared expert of the same width and the
    router. Meta's name: 17B active. Three layers of four attend within 8192-token chunks, which llama.cpp caches as
    a sliding window: the chunk plus one micro-batch of 512, padded to 256 cells (8704); the fourth holds the
    context."""
    cfg = config("llama-4-scout")
    c = param_counts(cfg)
    H = 5120
    attn = H * 40 * 128 + 2 * H * 8 * 128 + 40 * 128 * H  # q, k, v, o
    expert = 3 * H * 8192
    moe = 16 * expert + expert + H * 16  # routed, shared, router
    embed = 2 * 202048 * H  # untied
    assert c.n_dense_layers == 0  # interleave_moe_layer_step 1: every layer has experts
    assert c.total == embed + 48 * (attn + moe) + 48 * 2 * H + H == 107_769_861_120
    assert c.active == c.total - 48 * 15 * expert  # 15 of 16 routed experts idle per token
    assert round(c.active / 1e9) == 17
    shape = shape_from_config(cfg)
    assert (shape.sliding_layers, shape.sliding_window) == (36, 8192)
    per_cell = 2 * 8 * 128 * 2  # K+V, 8 KV heads of 128, f16
    assert kv_cache_bytes(shape, 131072, 1, "f16") == 12 * 131072 * per_cell + 36 * 8704 * per_cell == 7_725_907_968


def test_llama_4_maverick_interleaves_dense_and_moe_layers():
    """Llama 4 Maverick's layout (interleave_moe_layer_step 2, 128 experts): every second layer has experts, the
    others a dense MLP of width intermediate_size_mlp; the GGUF tensor list puts each where it is."""
    from quantize.fit.footprint import gguf_tensors

    text = {**config("llama-4-scout")["text_config"], "interleave_moe_layer_step": 2, "num_local_experts": 128,
            "moe_layers": None, "num_hidden_layers": 4, "layer_types": None}
    c = param_counts(text)
    H = 5120
    assert c.dense_at == (0, 2) and c.n_dense_layers == 2
    assert c.dense_mlp == {"gate": H * 16384, "up": H * 16384, "down": 16384 * H}
    names = {name for name, *_ in gguf_tensors(c)}
    assert {"blk.0.ffn_gate.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_gate_shexp.weight",
            "blk.2.ffn_down.weight", "blk.3.ffn_up_exps.weight"} <= names
    assert "blk.0.ffn_gate_exps.weight" not in names


def test_unmodelled_architecture_is_refused(tmp_path):
    """A model type whose attention or cache is not modelled gets a refusal, not a number."""
    import json

    from quantize.common.errors import QuantizeError

    hybrid = {**config("llama-3-8b"), "model_type": "qwen3_next"}  # linear-attention layers: no per-token KV
    (tmp_path / "config.json").write_text(json.dumps(hybrid))
    with pytest.raises(QuantizeError, match="'qwen3_next' has no row in quantize's architecture table"):
        describe_model(str(tmp_path / "config.json"), None)
