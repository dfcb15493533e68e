"""GGUF: conversion checked against transformers through llama.cpp's runtime; k-quants by llama.cpp's quantiser
with our importance matrix; the artefact evaluated by llama.cpp."""

import json

import numpy as np
import torch

from conftest import write_recipe
from quantize import pipeline
from quantize.sources.models import load_model, load_tokenizer
from quantize.recipe import load_recipe
from quantize.sources.texts import bundled_wiki

from quantize.measure.quality import forward_logits  # noqa: E402
import llama_cpp  # noqa: E402,F401  a hard dependency: a broken install fails here


def test_f32_gguf_matches_transformers(tiny_model, tmp_path):
    from quantize.formats.gguf_convert import convert
    from quantize.runtimes.llamacpp import LlamaCppModel

    path = convert(tiny_model, tmp_path / "tiny-f32.gguf", "F32")
    tok = load_tokenizer(tiny_model)
    text = bundled_wiki("eval").text[:4000]
    ids = tok(text, add_special_tokens=False).input_ids
    model = LlamaCppModel(path, n_ctx=256, kv_type="F32")
    try:
        assert model.llm.tokenize(text.encode(), add_bos=False, special=False) == ids  # same tokenisation
        a = model.logits(ids[:200])
        half = model.logits(ids[:200], 100)  # the output layer on positions 100… only, as the scorer asks
        in_place = model.logits(ids[:200], 100, reuse=True).clone()  # one batch: llama.cpp's own buffer, uncopied
    finally:
        model.close()
    batched = LlamaCppModel(path, n_ctx=256, kv_type="F32", n_batch=64)  # four decodes into the reused buffer
    try:
        in_batches = batched.logits(ids[:200], 100, reuse=True).clone()
    finally:
        batched.close()
    assert half.shape == (100, a.shape[1]) and torch.equal(half, a[100:]) and torch.equal(in_place, half)
    assert in_batches.shape == half.shape and torch.allclose(in_batches, half, atol=1e-4)
    hf = load_model(tiny_model, "float32")
    with torch.no_grad():
        b = hf(torch.tensor([ids[:200]])).logits[0]
        b_half = forward_logits(hf, torch.tensor([ids[:200]]), 100)  # transformers' logits_to_keep
    assert torch.allclose(b_half, b[100:], atol=1e-5)
    diff = (a - b).abs().max().item()
    print(f"F32 GGUF vs transformers: max |Δlogit| {diff:.3g}")
    assert diff < 1e-3


def test_kquants_with_imatrix_evaluated_by_llama_cpp(tiny_model, tmp_path):
    import gguf

    methods = [{"name": "gguf", "type": "Q8_0"}, {"name": "gguf", "type": "Q4_K_M"},
               {"name": "gguf", "type": "Q4_K_M", "imatrix": False},
               {"name": "gguf", "type": "Q4_K_M", "awq_scales": True}]
    out = tmp_path / "g"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), methods, out,
                                      calibration={"samples": 8, "seq_len": 128}))
    pipeline.run(recipe)
    results = json.loads((out / "results.json").read_text())["variants"]
    assert set(results) == {"gguf-q8_0", "gguf-q4_k_m-imat", "gguf-q4_k_m", "gguf-q4_k_m-awq-imat"}
    assert all(v["loader"].startswith("llama.cpp") and v["speed"]["backend"] == "llama.cpp" for v in results.values())
    # the runtime settings that move llama.cpp's numbers are recorded with them (flash attention: +0.1-0.2% PPL; the
    # instruction sets of the build's CPU kernels: a portable build runs without AVX512, 1.4x slower on Gemma)
    assert all("KV cache F16, flash attention off, CPU kernels " in v["loader"]
               and "flash attention off" in v["speed"]["protocol"] and "AVX" in v["speed"]["protocol"]
               for v in results.values())
    kld = {n: v["perplexity"]["kld"]["mean"] for n, v in results.items()}
    assert kld["gguf-q8_0"] < kld["gguf-q4_k_m-imat"]
    awq = json.loads((out / "gguf-q4_k_m-awq-imat" / "manifest.json").read_text())["result"]
    assert awq["awq_scales"]["export"] == "scaled-fp16" and 0 < kld["gguf-q4_k_m-awq-imat"] < 1
    assert "AWQ scales folded in before conversion: yes" in (out / "gguf-q4_k_m-awq-imat" / "README.md").read_text()
    folder = out / "gguf-q4_k_m-imat"
    reader = gguf.GGUFReader(folder / "model.gguf")
    types = {t.tensor_type.name for t in reader.tensors}
    assert {"Q4_K", "Q6_K"} <= types  # llama.cpp's Q4_K_M mix keeps some tensors at 6 bits
    assert reader.fields["quantize.imatrix.entries_count"].contents() == 2 * 7
    assert reader.fields["quantize.imatrix.chunks_count"].contents() == 8
    imatrix = gguf.GGUFReader(folder / "imatrix.gguf")
    assert imatrix.fields["imatrix.chunk_size"].contents() == 128
    names = {t.name for t in imatrix.tensors}
    assert "blk.0.attn_q.weight.in_sum2" in names and "blk.1.ffn_down.weight.counts" in names
    manifest = json.loads((folder / "manifest.json").read_text())
    assert 4.5 < manifest["result"]["bits_per_weight"] < 7  # Q4_K_M: 4.5-bit blocks, some Q6_K, F32 norms
    assert (folder / "Modelfile").read_text().startswith("FROM ./model.gguf")
    # the unweighted and the imatrix-weighted files differ: the importance matrix reached the quantiser
    plain = gguf.GGUFReader(out / "gguf-q4_k_m" / "model.gguf")
    a = np.asarray(next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data)
    b = np.asarray(next(t for t in plain.tensors if t.name == "blk.0.attn_q.weight").data)
    assert a.shape == b.shape and not np.array_equal(a, b)
