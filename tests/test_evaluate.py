"""Perplexity and KLD against independent computations on the tiny model."""

import json
import math

import pytest
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
    # as llama-perplexity: BOS before the text, so the first chunk's first text token is the text's first token
    ids = tok(bundled_wiki("eval").text, add_special_tokens=False).input_ids
    assert chunks.ids[0, 1:].tolist() == ids[:63] and chunks.ids[1, 1:].tolist() == ids[64:127]
    assert chunks.text_tokens == len(ids) + 1


def test_calibration_windows_start_with_bos_when_the_tokenizer_adds_one():
    from quantize.sources.texts import calibration_batches

    ids = torch.arange(1000) + 10
    plain = calibration_batches(ids, 8, 32, seed=3)
    with_bos = calibration_batches(ids, 8, 32, seed=3, bos=1)
    assert (with_bos[:, 0] == 1).all() and torch.equal(with_bos[:, 1:], plain[:, 1:])
    assert (plain[:, 0] >= 10).all()  # no BOS asked, none put


def test_perplexity_matches_cross_entropy_and_self_kld_is_zero(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    model = load_model(tiny_model, "float32")
    chunks = quality.make_chunks(tok, bundled_wiki("eval"), n_ctx=64, max_chunks=3)
    store, base = quality.base_file(model, chunks, tmp_path / "b.kld")
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
    store, _ = quality.base_file(model, chunks, tmp_path / "b.kld")
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
    out = quality.score_model(load_model(tiny_model, "float32"), chunks, None, "base")
    assert math.isclose(out["bits_per_byte"] * math.log(2) * chunks.scored_bytes,
                        out["mean_nll"] * out["tokens_scored"], rel_tol=1e-9)
    # an artefact scored alone (no floor): NLL as logsumexp − target logit, the same numbers to float rounding
    alone = quality.score_model(load_model(tiny_model, "float32"), chunks, None, "alone", floor=False)
    assert "noise_floor" in out and "noise_floor" not in alone
    assert math.isclose(alone["mean_nll"], out["mean_nll"], rel_tol=1e-6) and alone["tokens_scored"] == 62


def test_kld_statistics_follow_llama_perplexity():
    """Percentiles, median and uncertainties as tools/perplexity/perplexity.cpp computes them (its formulas written
    out here on random data): linear interpolation at fraction × (n − 1), the median of an even count as the mean
    of the two middle values, sqrt(var / (n − 1)), and the ratio's uncertainty with the NLLs' covariance."""
    import math

    import numpy as np

    rng = np.random.default_rng(0)
    n = 1000
    base_nll = rng.gamma(2.0, 1.5, n)
    nll = base_nll + rng.normal(0.05, 0.2, n)
    kld = rng.gamma(0.5, 0.1, n)
    same = (rng.random(n) < 0.9).astype(float)
    s = quality.kld_statistics(kld, nll, base_nll, same)

    def percentile(values, fraction):  # perplexity.cpp's lambda
        values = sorted(values)
        p = fraction * (len(values) - 1)
        ip = int(p)
        p -= ip
        return (1 - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)]

    def mean_and_uncertainty(x):
        f = sum(x) / len(x)
        df = sum(v * v for v in x) / len(x) - f * f
        return f, math.sqrt(df / (len(x) - 1))

    for q in quality.KLD_PERCENTILES:
        assert abs(s["percentiles"][str(q)] - percentile(kld, q / 100)) < 1e-12
    ordered = sorted(kld)
    assert abs(s["median"] - 0.5 * (ordered[n // 2] + ordered[n // 2 - 1])) < 1e-15
    dp = np.exp(-nll) - np.exp(-base_nll)
    for q in quality.DELTA_P_PERCENTILES:
        assert abs(s["delta_p"]["percentiles"][str(q)] - percentile(dp, q / 100)) < 1e-12
    assert np.allclose((s["mean"], s["unc"]), mean_and_uncertainty(kld), rtol=1e-12)
    (a, da), (b, db) = mean_and_uncertainty(nll), mean_and_uncertainty(base_nll)
    cov = (sum(nll * base_nll) / n - a * b) / (n - 1)
    assert math.isclose(s["ln_ppl_ratio_unc"], math.sqrt(da * da + db * db - 2 * cov), rel_tol=1e-9)
    mse, dmse = mean_and_uncertainty(dp**2)
    assert math.isclose(s["delta_p_rms"], math.sqrt(mse)) and math.isclose(s["delta_p_rms_unc"], 0.5 / math.sqrt(mse) * dmse)


def test_paired_difference_cancels_shared_noise():
    """Two variants scored on the same positions: the paired error of their difference is far below either one's
    own error when they share most of their per-position noise."""
    import numpy as np

    rng = np.random.default_rng(1)
    shared = rng.gamma(0.5, 0.2, 5000)
    a, b = shared + 0.010 + rng.normal(0, 0.001, 5000), shared + rng.normal(0, 0.001, 5000)
    d = quality.paired_difference(a, b)
    unc_a = a.std() / np.sqrt(len(a) - 1)
    assert abs(d["difference"] - 0.010) < 1e-4 and d["unc"] < unc_a / 20 and d["z"] > 100


def test_speed_follows_llama_bench_definitions(tiny_model, tmp_path):
    """Review §1: pp computes the last token's logits only (llama-bench asks llama.cpp for no others), and GB/s counts
    the bytes a decode step reads: every weight but an untied input embedding (one row of it); a tied one is read
    whole by the output projection. Same rule for the GGUF of the same model on llama.cpp."""
    from quantize.formats.gguf_convert import convert
    from quantize.measure import speed
    from quantize.sources.models import load_model

    model = load_model(tiny_model, "float32")
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    speed._pp(model, torch.randint(3, 500, (1, 16)))
    hook.remove()
    assert shapes == [(1, 1, model.config.vocab_size)]
    embed = model.model.embed_tokens.weight
    assert speed.weight_bytes_per_token(model) == speed.weight_bytes_in_memory(model) - embed.numel() * 4
    model.lm_head.weight = embed  # tied
    assert speed.weight_bytes_per_token(model) == speed.weight_bytes_in_memory(model)
    gguf = convert(tiny_model, tmp_path / "m.gguf", "F16")
    assert speed.untied_token_embedding_bytes(gguf) == embed.numel() * 2  # token_embd F16, output.weight apart


def test_engine_check_finds_an_excess_beyond_the_base_and_not_within_noise():
    """measure/on_engine.describe on per-token NLLs: an engine that costs the variant what it costs the base
    delivers; one that adds 3 % perplexity on top does not, and says by how much."""
    import numpy as np

    from quantize.measure.on_engine import describe

    rng = np.random.default_rng(0)
    reference = rng.uniform(0.5, 6, 4000)
    base_delta = rng.normal(0.004, 0.02, 4000)  # the engine's dtype: +0.4 % on the base, noisy per token
    same = describe("vllm", "bfloat16", reference + base_delta + rng.normal(0, 0.002, 4000), reference, base_delta)
    worse = describe("vllm", "bfloat16", reference + base_delta + 0.03, reference, base_delta)
    assert same["delivers"] and abs(same["excess"]) < 0.001
    assert not worse["delivers"] and worse["excess"] == pytest.approx(0.03)
    assert "+3.0% perplexity on vllm" in worse["verdict"]


def test_bundled_wiki_kept_parsed_in_the_cache_folder_gives_the_same_articles(tmp_path, monkeypatch):
    """The parsed articles are kept as JSON in the cache folder (gensim's filter takes seconds); read back they are
    the articles the parser gives, and the split built on them is unchanged."""
    from quantize.sources import texts

    monkeypatch.setenv("QUANTIZE_CACHE", str(tmp_path))
    texts._wiki_articles.cache_clear()
    try:
        parsed = texts.wiki_articles()  # parses, writes texts/wiki-<key>.json
        kept = list((tmp_path / "texts").glob("wiki-*.json"))
        assert len(kept) == 1 and not list((tmp_path / "texts").glob("*.partial-*"))
        texts._wiki_articles.cache_clear()
        read_back = texts.wiki_articles()  # from the JSON
        assert read_back == parsed == tuple(texts._parse_wiki(texts._wiki_dump()))
        kept[0].write_text("[[1, \"trunc")  # a damaged file is parsed again and replaced
        texts._wiki_articles.cache_clear()
        assert texts.wiki_articles() == parsed and json.loads(kept[0].read_text())[0][0] == parsed[0][0]
        assert len(parsed) == 105 and [a[0] for a in parsed] == sorted(a[0] for a in parsed)
    finally:
        texts._wiki_articles.cache_clear()
