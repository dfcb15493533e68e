"""Tests for quantize.fit (shape, gpus, context_memory, vram): hand-computed KV bytes, real-header weight bytes, fit/headroom, searches."""

import json

import pytest
import torch
from safetensors.torch import save_file

from quantize.common.errors import QuantizeError
from quantize.fit.context_memory import (
    OVERHEAD_NOTE, RUNTIME_OVERHEAD_BYTES, compute_buffer_bytes, kv_cache_bytes, overhead_bytes,
)
from quantize.fit.gpus import GPUS, GiB, gpu_by_name
from quantize.fit.shape import shape_from_config
from quantize.fit.vram import (
    decode_tokens_per_s_estimate, fit_report, fit_rows, gib, largest_batch, largest_context,
)
from quantize.formats.tensors import weight_bytes_safetensors

LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}
LLAMA3_70B = {
    "model_type": "llama",
    "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_hidden_layers": 80,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
}
GEMMA3_TOY = {  # multimodal layout: text config nested
    "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text", "hidden_size": 1024, "intermediate_size": 4096,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "num_hidden_layers": 6,
        "vocab_size": 1000, "sliding_window": 1024,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    },
}


def test_llama3_8b_kv_bytes_hand_computed():
    shape = shape_from_config(LLAMA3_8B)
    assert (shape.n_layers, shape.n_kv_heads, shape.head_dim, shape.sliding_layers) == (32, 8, 128, 0)
    assert kv_cache_bytes(shape, 8192, 1, "f16") == 2 * 32 * 8 * 128 * 8192 * 2 == 1_073_741_824 == GiB
    assert kv_cache_bytes(shape, 8192, 1, "q8_0") == 1_073_741_824 * 34 // 64
    assert kv_cache_bytes(shape, 8192, 4, "f16") == 4 * GiB
    assert 7e9 < shape.n_params_estimate < 9e9


def test_gemma3_layer_types_sliding_window():
    shape = shape_from_config(GEMMA3_TOY)
    assert (shape.sliding_window, shape.sliding_layers, shape.n_kv_heads, shape.head_dim) == (1024, 5, 2, 256)
    # 5 sliding layers hold llama.cpp's SWA cache, window + one 512-token micro-batch padded to 256 cells
    # (1024 + 512 = 1536), 1 full layer holds 32768 tokens; K+V, 2 KV heads, dim 256, f16.
    expected = 2 * 2 * 256 * 2 * (5 * 1536 + 1 * 32768)
    assert expected == 82_837_504
    assert kv_cache_bytes(shape, 32768, 1, "f16") == expected
    # Below the window every layer holds the full context.
    assert kv_cache_bytes(shape, 512, 1, "f16") == 2 * 2 * 256 * 2 * 6 * 512


def test_sliding_window_pattern_mistral_and_qwen_variants():
    pattern = {**GEMMA3_TOY["text_config"], "layer_types": None, "sliding_window_pattern": 3}
    assert shape_from_config(pattern).sliding_layers == 4  # layers 3 and 6 are full
    mistral = {**LLAMA3_8B, "sliding_window": 4096}
    assert shape_from_config(mistral).sliding_layers == 32
    assert shape_from_config({**LLAMA3_8B, "sliding_window": None}).sliding_layers == 0
    qwen = {**LLAMA3_8B, "sliding_window": 4096, "use_sliding_window": False}
    assert shape_from_config(qwen).sliding_layers == 0


def test_the_cache_each_engine_allocates_for_a_window(tmp_path):
    """Mistral-7B-v0.1 (sliding_window 4096 on every layer) at 32768 tokens: llama.cpp runs it on its llama graph,
    which keeps no window, so every layer holds all 32768 cells (4 GiB of f16); vLLM applies the window: on an RTX
    4090 (< 70 GiB: 2 × 2048 tokens in flight) a layer holds min(4095 + 4096, 32768) = 8191 tokens in 16-token
    blocks, 512 blocks + 1. Phi-3's window llama.cpp switches off too; Gemma 3's it keeps (the test above)."""
    from typer.testing import CliRunner

    from quantize.cli import app
    from quantize.fit.context_memory import kv_cells
    from quantize.fit.vram import fit_one

    config = json.loads(open("tests/data/configs/mistral-7b-v0.1.json").read())
    shape = shape_from_config(config)
    assert (shape.sliding_window, shape.sliding_layers, shape.llama_cpp_window) == (4096, 32, False)
    per_cell = 32 * 2 * 8 * 128 * 2
    assert kv_cache_bytes(shape, 32768, 1, "f16") == per_cell * 32768 == 4 * GiB
    assert kv_cells(shape, 32768, "vllm", 2 * 2048) == (32768, (512 + 1) * 16)
    rtx4090 = gpu_by_name("RTX 4090")
    assert fit_one(0, shape, rtx4090, 32768, 1, "f16", engine="vllm").kv_bytes == per_cell * 8208
    assert kv_cells(shape, 100, "vllm", 4096) == (112, 128)  # below the window: the context, in blocks (+ 1)
    h100 = gpu_by_name("H100 SXM")  # ≥ 70 GiB: 2 × 8192 in flight, more than the 32k context's window needs
    assert fit_one(0, shape, h100, 32768, 1, "f16", engine="vllm").kv_bytes == per_cell * (1 + -(-(4095 + 16384) // 16)) * 16
    phi3 = {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32064,
            "max_position_embeddings": 4096, "sliding_window": 2047}
    assert kv_cells(shape_from_config(phi3), 4096) == (4096, 4096)
    gemma = shape_from_config(GEMMA3_TOY)
    assert gemma.llama_cpp_window and kv_cells(gemma, 32768) == (32768, 1536)
    with pytest.raises(QuantizeError, match="q8_0.*llama.cpp's; vLLM's are f16, bf16, fp8"):
        kv_cache_bytes(shape, 4096, 1, "q8_0", "vllm")
    with pytest.raises(QuantizeError, match="'fp8' is vLLM's; llama.cpp's are"):
        kv_cache_bytes(shape, 4096, 1, "fp8")
    # a recipe's cache type an engine lacks: that engine's f16, and the report says so
    report = fit_report(0, shape, ["RTX 4090"], [4096], 1, "fp8", engine="llama.cpp")
    assert report["rows"][0]["kv_dtype"] == "f16" and "llama.cpp has no fp8 cache" in report["protocol"]["kv_dtype_note"]
    # `quantize fit` says whose cache it counted: llama.cpp for a llama.cpp mix, vLLM for int4 (or --engine)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    gguf = CliRunner().invoke(app, ["fit", str(path), "--gpu", "RTX 4090", "--ctx", "32768", "--weights", "q4_k_m",
                                    "--json"])
    assert gguf.exit_code == 0, gguf.output
    row = json.loads(gguf.output)["rows"][0]
    assert json.loads(gguf.output)["protocol"]["engine"] == "llama.cpp" and row["kv_bytes"] == 4 * GiB
    vllm = CliRunner().invoke(app, ["fit", str(path), "--gpu", "RTX 4090", "--ctx", "32768", "--weights", "int4"])
    assert vllm.exit_code == 0 and "vllm's KV cache, f16" in vllm.output, vllm.output
    forced = CliRunner().invoke(app, ["fit", str(path), "--gpu", "RTX 4090", "--ctx", "32768", "--weights", "q4_k_m",
                                      "--engine", "vllm", "--json"])
    assert json.loads(forced.output)["rows"][0]["kv_bytes"] == per_cell * 8208
    bundled = CliRunner().invoke(app, ["fit", "bundled:smollm2-135m", "--gpu", "RTX 3060", "--ctx", "8192"])
    assert bundled.exit_code == 0 and "measured from the GGUF); llama.cpp's KV cache" in bundled.output, bundled.output
    bad = CliRunner().invoke(app, ["fit", str(path), "--engine", "sglang"])
    assert bad.exit_code == 2 and "--engine sglang: accepted: auto, llama.cpp, vllm" in bad.output


def test_gemma3_defaults_fill_omitted_keys():
    # gemma-3-4b-it's config.json omits heads/head_dim/vocab; transformers' defaults apply.
    cfg = {"model_type": "gemma3", "text_config": {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
        "num_hidden_layers": 34, "sliding_window": 1024}}
    shape = shape_from_config(cfg)
    assert (shape.n_kv_heads, shape.head_dim, shape.vocab_size) == (4, 256, 262208)
    assert (shape.sliding_window, shape.sliding_layers) == (1024, 34 - 34 // 6)


def test_weight_bytes_safetensors_exact(tmp_path):
    save_file({"a": torch.zeros(3, 5, dtype=torch.float16), "b": torch.zeros(7, dtype=torch.float32)},
              str(tmp_path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({"c": torch.zeros(4, 4, dtype=torch.int32), "d": torch.zeros(10, dtype=torch.float16)},
              str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert weight_bytes_safetensors(tmp_path) == {"F16": 3 * 5 * 2 + 10 * 2, "F32": 7 * 4, "I32": 16 * 4}


def test_weight_bytes_safetensors_no_files(tmp_path):
    with pytest.raises(QuantizeError, match=str(tmp_path)):
        weight_bytes_safetensors(tmp_path)


def test_70b_int4_on_4090_does_not_fit():
    shape = shape_from_config(LLAMA3_70B)
    weights = 35_000_000_000
    kv = 2 * 80 * 8 * 128 * 8192 * 1 * 2
    # flash attention (default): the f32 logits of a 512-token micro-batch are the largest compute buffer
    over = 512 * 2**20 + max(512 * (128256 + 2 * 8192) * 4, 512 * (3 * 8192 + 28672) * 4 + 512 * 8192 * 2)
    assert over == 512 * 2**20 + 296_222_720
    usable = int(24 * 2**30 * 0.95)
    [row] = fit_rows(weights, shape, ["RTX 4090"], [8192], 1, "f16")
    assert (row.kv_bytes, row.overhead_bytes) == (kv, over)
    assert row.total_bytes == weights + kv + over
    assert row.usable_bytes == usable
    assert row.headroom_bytes == usable - (weights + kv + over) < 0
    assert not row.fits
    [h200] = fit_rows(weights, shape, [gpu_by_name("h200")], [8192], 1, "f16")
    assert h200.fits and h200.headroom_bytes == int(141e9 * 0.95) - (weights + kv + over)


def test_largest_context_is_a_boundary():
    shape = shape_from_config(LLAMA3_8B)
    gpu = gpu_by_name("rtx3060")
    weights = 8 * 10**9
    n = largest_context(weights, shape, gpu, 1, "f16", max_context=131072)
    assert 0 < n < 131072
    assert fit_rows(weights, shape, [gpu], [n], 1, "f16")[0].fits
    assert not fit_rows(weights, shape, [gpu], [n + 1], 1, "f16")[0].fits
    # Default cap is max_position_embeddings (8192 here) and a roomy GPU reaches it.
    assert largest_context(weights, shape, gpu_by_name("H100"), 1, "f16") == 8192
    assert largest_context(40 * GiB, shape, gpu, 1, "f16") == 0


def test_largest_batch_is_a_boundary():
    shape = shape_from_config(LLAMA3_8B)
    gpu = gpu_by_name("RTX 4090")
    weights = 8 * 10**9
    b = largest_batch(weights, shape, gpu, 8192, "f16")
    assert 0 < b < 1024
    assert fit_rows(weights, shape, [gpu], [8192], b, "f16")[0].fits
    assert not fit_rows(weights, shape, [gpu], [8192], b + 1, "f16")[0].fits
    assert largest_batch(weights, shape, gpu, 8192, "q4_0") > b


def test_gpu_table_and_lookup():
    assert gpu_by_name("rtx4090").name == "RTX 4090"
    assert gpu_by_name(" RTX  4060 ti ").memory_bytes == 16 * GiB
    assert gpu_by_name("m-series 16gb").usable_fraction == pytest.approx(2 / 3)
    assert gpu_by_name("M-series 192 GB").usable_fraction == pytest.approx(3 / 4)
    assert all(g.source and g.bandwidth_gb_s > 0 for g in GPUS)
    assert decode_tokens_per_s_estimate(10**9, gpu_by_name("RTX 4090")) == pytest.approx(1008.0)


def test_bad_inputs_raise_with_the_bad_value():
    with pytest.raises(QuantizeError, match="TPU v9"):
        gpu_by_name("TPU v9")
    with pytest.raises(QuantizeError, match="A100"):  # ambiguous: 40GB and 80GB
        gpu_by_name("a100")
    shape = shape_from_config(LLAMA3_8B)
    with pytest.raises(QuantizeError, match="q3_k") as err:
        kv_cache_bytes(shape, 1024, 1, "q3_k")
    assert "q8_0" in str(err.value)
    cfg = {k: v for k, v in LLAMA3_8B.items() if k != "num_hidden_layers"}
    with pytest.raises(QuantizeError, match="num_hidden_layers"):
        shape_from_config(cfg)


def test_fit_report_is_json_serialisable():
    shape = shape_from_config(LLAMA3_8B)
    report = fit_report(5 * 10**9, shape, ["RTX 4090", "M-series 16 GB"], [4096, 8192], 1, "q8_0")
    text = json.dumps(report)
    assert json.loads(text)["largest_batch"]["RTX 4090"]["8192"] >= 1
    assert len(report["rows"]) == 4
    assert report["protocol"]["runtime_overhead_bytes"] == RUNTIME_OVERHEAD_BYTES
    assert report["protocol"]["overhead_note"] == OVERHEAD_NOTE
    assert report["rows"][0]["overhead_bytes"] == overhead_bytes(shape, 4096)
    assert report["protocol"]["flash_attn"] is True
    assert gib(GiB) == "1.00 GiB"


def test_weight_bytes_gguf(tmp_path):
    import gguf
    import numpy as np

    from quantize.formats.tensors import weight_bytes_gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("a", np.zeros((4, 8), dtype=np.float16))
    writer.add_tensor("b", np.zeros(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert weight_bytes_gguf(path) == {"F16": 4 * 8 * 2, "F32": 16 * 4}
    with pytest.raises(QuantizeError, match="missing.gguf"):
        weight_bytes_gguf(tmp_path / "missing.gguf")


def test_attention_scores_without_flash_attention_grow_with_context():
    """Without flash attention llama.cpp's compute buffer holds one layer's f32 scores: 512 x ctx x (heads + 1)."""
    shape = shape_from_config(LLAMA3_8B)
    assert shape.n_heads == 32
    attention = 512 * (3 * 4096 + 14336) * 4 + 512 * 131072 * 33 * 4
    assert compute_buffer_bytes(shape, 131072, flash_attn=False) == attention  # 8.9 GB at 128k
    assert overhead_bytes(shape, 131072, flash_attn=False) == 512 * 2**20 + attention + 512 * 131072 * 32 * 2
    assert compute_buffer_bytes(shape, 131072, flash_attn=True) == 512 * (128256 + 2 * 4096) * 4
    assert compute_buffer_bytes(shape, 1024, flash_attn=False) == 512 * (128256 + 2 * 4096) * 4
    weights = 4_900_000_000  # ~Q4_K_M 8B
    gpu = gpu_by_name("RTX 4090")
    assert largest_context(weights, shape, gpu, 1, "f16", 131072, flash_attn=False) \
        < largest_context(weights, shape, gpu, 1, "f16", 131072, flash_attn=True)
