"""CPU resident-memory predictions (quantize.fit.cpu_resident), by hand arithmetic on SmolLM2-135M's shape."""

import numpy as np
import pytest

from quantize.fit import cpu_resident
from quantize.fit.shape import ModelShape

SMOLLM2 = ModelShape(n_layers=30, n_kv_heads=3, head_dim=64, hidden_size=576, vocab_size=49152,
                         intermediate_size=1536, sliding_window=None, sliding_layers=0, n_params_estimate=0,
                         n_heads=9)


@pytest.mark.parametrize("name,ggml_type,shape,expected", [
    ("blk.0.ffn_down.weight", "Q4_K", (1536, 576), True),  # 576 rows: a multiple of 8
    ("blk.0.attn_q.weight", "Q4_0", (576, 576), True),
    ("blk.0.attn_k.weight", "Q4_0", (576, 190), False),  # rows not a multiple of 8
    ("token_embd.weight", "Q4_0", (576, 49152), False),  # GET_ROWS, not a matmul
    ("blk.0.ffn_down.weight", "Q6_K", (1536, 576), False),  # repacked on ARM only
    ("blk.0.attn_norm.weight", "F32", (576,), False),
])
def test_repack_rule(name, ggml_type, shape, expected):
    assert cpu_resident.is_repacked(name, ggml_type, shape) is expected


def test_repack_bytes_from_a_gguf(tmp_path):
    import gguf
    rng = np.random.default_rng(0)
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for name, rows in [("blk.0.attn_q.weight", 8), ("blk.0.attn_k.weight", 6), ("token_embd.weight", 8)]:
        q = gguf.quants.quantize(rng.standard_normal((rows, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # only attn_q: 8 rows x 2 blocks of 32 x 18 bytes (Q4_0: 16 bytes of nibbles + an f16 scale)
    assert cpu_resident.repack_bytes_gguf(path) == 8 * 2 * 18


def test_llamacpp_resident_by_hand():
    weights, repack = 100_000_000, 7_962_624
    kv = 2 * 30 * 3 * 64 * 2048 * 2  # K and V, layers, kv heads, head dim, tokens, f16
    attention_phase = 512 * (3 * 576 + 1536) * 4 + 512 * 2048 * 2  # activations + f16 mask (flash attention)
    assert cpu_resident.llamacpp_resident_bytes(weights, repack, SMOLLM2, 2048, True) == (
        weights + repack + kv + attention_phase)
    scores = 512 * 2048 * (9 + 1) * 4  # one layer's f32 KQ + mask, without flash attention
    f16_copy = 512 * 2048 * 9 * 2
    assert cpu_resident.llamacpp_resident_bytes(weights, 0, SMOLLM2, 2048, False) == (
        weights + kv + 512 * (3 * 576 + 1536) * 4 + scores + f16_copy)


def test_torch_resident_by_hand():
    tensors, checkpoint = 538_000_000, 110_000_000
    kv = 2 * 30 * 3 * 64 * 2048 * 4  # fp32 cache
    activations = 2048 * (3 * 1536 + 4 * 576) * 4
    assert cpu_resident.torch_resident_bytes(tensors, checkpoint, SMOLLM2, 2048, 4) == (
        tensors + checkpoint + kv + activations)
    assert cpu_resident.torch_resident_bytes(tensors, 0, SMOLLM2, 2048, 2) == tensors + kv // 2 + activations // 2
