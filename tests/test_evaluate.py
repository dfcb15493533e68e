"""Perplexity and KLD against independent computations on the tiny model."""

import math

import torch
import torch.nn.functional as F

from quantize.measure import quality
from quantize.sources.models import load_model, load_tokenizer
from quantize.sources.texts import bundled_wiki


def test_chunks_follow_llama_cpp(tiny_model):
    tok = load_tokenizer(tiny_model)
    chunks = quality.make_chunks(tok, bundled_wiki("eval"), n_ctx=64, max_chunks=3)
    assert chunks.ids.shape == (3, 64)
    assert chunks.first == 32 and chunks.scored_per_chunk == 31
    # this tokenizer adds no BOS, so chunks are the raw token stream
    ids = tok(bundled_wiki("eval").text, add_special_tokens=False).input_ids
    assert not chunks.bos_replaced
    assert chunks.ids.flatten().tolist() == ids[: 3 * 64]


def test_bos_replaces_first_token_when_tokenizer_adds_one(tiny_model):
    tok = load_tokenizer(tiny_model)
    tok._tokenizer.post_processor = __import__("tokenizers").processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    chunks = quality.make_chunks(tok, bundled_wiki("eval"), n_ctx=64, max_chunks=2)
    assert chunks.bos_replaced and chunks.ids[:, 0].tolist() == [tok.bos_token_id] * 2


def test_perplexity_matches_cross_entropy_and_self_kld_is_zero(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, "float32")
    chunks = quality.make_chunks(tok, bundled_wiki("eval"), n_ctx=64, max_chunks=3)
    store = quality.BaseLogProbs(tmp_path / "lp", chunks, model.config.vocab_size)
    base = quality.score_base(model, chunks, store, "t")
    # independent: cross-entropy of positions 32..62 predicting tokens 33..63
    with torch.no_grad():
        logits = model(chunks.ids).logits
    nll = F.cross_entropy(logits[:, 32:-1].reshape(-1, logits.shape[-1]), chunks.ids[:, 33:].reshape(-1))
    assert base["tokens_scored"] == 3 * 31
    assert math.isclose(base["ppl"], math.exp(nll.item()), rel_tol=1e-4)
    assert base["ppl_unc"] > 0
    same = quality.score(model, chunks, store, "t")
    assert abs(same["kld"]["mean"]) < 1e-5 and same["kld"]["same_top"] == 1.0
    assert math.isclose(same["ppl"], base["ppl"], rel_tol=1e-6)


def test_kld_positive_for_a_perturbed_model(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, "float32")
    chunks = quality.make_chunks(tok, bundled_wiki("eval"), n_ctx=64, max_chunks=2)
    store = quality.BaseLogProbs(tmp_path / "lp", chunks, model.config.vocab_size)
    quality.score_base(model, chunks, store, "t")
    with torch.no_grad():
        for p in model.model.layers[0].mlp.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    out = quality.score(model, chunks, store, "t")
    k = out["kld"]
    assert k["mean"] > 0 and k["min"] >= -1e-6 and k["max"] >= k["p99"] >= k["median"]


def test_bits_per_byte_counts_the_scored_text(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    chunks = quality.make_chunks(tok, bundled_wiki("eval"), n_ctx=64, max_chunks=2)
    scored_text = "".join(tok.decode(row[33:].tolist()) for row in chunks.ids)
    assert chunks.scored_bytes == len(scored_text.encode()) > 2 * 31  # a 512-token BPE: > 1 byte per token
    store = quality.BaseLogProbs(tmp_path / "b", chunks, 512)
    out = quality.score_base(load_model(tiny_model, "float32"), chunks, store, "base")
    assert math.isclose(out["bits_per_byte"] * math.log(2) * chunks.scored_bytes,
                        out["mean_nll"] * out["tokens_scored"], rel_tol=1e-9)


def test_compact_base_store_keeps_kld_of_a_model_with_itself_near_zero(tmp_path):
    """A peaked distribution over a large vocabulary puts most entries far below the 16-nat window: those must
    drop out (as in llama.cpp), not count as e^floor each (which would add ~0.05 nats here)."""
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(20, 50000, generator=g) * 6, dim=-1)
    chunks = type("C", (), {"scored_per_chunk": 20})()
    store = quality.CompactLogProbs(tmp_path / "c", chunks, 50000)
    store[0] = logp
    back = store[0]
    assert (torch.isinf(back).sum(-1) > 1000).all()  # most of the vocabulary is outside the window
    assert quality.kl_divergence(back, logp).abs().max().item() < 1e-3
    finite = torch.isfinite(back)
    assert (back[finite] - logp[finite]).abs().max().item() <= 16 / 65535
