"""The base store is llama.cpp's --kl-divergence-base file, and the KLD against it is llama-perplexity's: both
checked against tools/perplexity/perplexity.cpp's loops, written out here one position at a time in float32."""

import struct

import numpy as np
import pytest
import torch

from quantize.measure import kld_base


def nearest_int(f: np.float32) -> int:  # perplexity.cpp's nearest_int: float add of 12582912, then the bits
    val = np.float32(f) + np.float32(12582912.0)
    i = struct.unpack("<i", struct.pack("<f", val))[0]
    return (i & 0x007FFFFF) - 0x00400000


def cpp_encode_row(logits: np.ndarray) -> np.ndarray:
    """perplexity.cpp log_softmax(n_vocab, logits, uint16_t * log_prob, tok), line by line."""
    f32 = np.float32
    max_logit, min_logit = f32(logits.max()), f32(logits.min())
    min_logit = max(min_logit, f32(max_logit - f32(16)))
    sum_exp = float(np.sum(np.exp(logits - max_logit).astype(np.float64)))
    log_sum_exp = f32(np.log(sum_exp))
    min_log_prob = f32(f32(min_logit - max_logit) - log_sum_exp)
    scale = f32(f32(max_logit - min_logit) / f32(65535))
    out = np.zeros(kld_base.row_width(len(logits)), dtype=np.uint16)
    out[:4] = np.array([scale, min_log_prob], dtype=np.float32).view(np.uint16)
    with np.errstate(divide="ignore"):
        inv_scale = f32(1) / scale
    for i, x in enumerate(logits):
        out[4 + i] = nearest_int(f32(inv_scale * f32(x - min_logit))) if x > min_logit else 0
    return out


def cpp_kld_row(logits: np.ndarray, base_row: np.ndarray, tok: int) -> tuple[float, float, float, bool]:
    """perplexity.cpp log_softmax(n_vocab, logits, const uint16_t * base_log_prob, tok, kld): (KLD, NLL, base NLL,
    same top)."""
    f32 = np.float32
    imax = int(np.argmax(logits))
    max_logit = f32(logits[imax])
    log_sum_exp = f32(np.log(float(np.sum(np.exp(logits - max_logit).astype(np.float64)))))
    scale, min_log_prob = base_row[:4].view(np.float32)
    codes = base_row[4 : 4 + len(logits)]
    nll = f32(f32(max_logit + log_sum_exp) - logits[tok])
    nll_base = -f32(f32(scale * f32(codes[tok])) + min_log_prob)
    max_logit = f32(max_logit + log_sum_exp)
    total, imax_base, best = 0.0, -1, f32(0)
    for i in range(len(logits)):
        p_log_base = f32(f32(scale * f32(codes[i])) + min_log_prob)
        if i == 0 or p_log_base > best:
            best, imax_base = p_log_base, i
        if p_log_base > f32(-16):
            total += float(np.exp(p_log_base)) * float(f32(f32(p_log_base - logits[i]) + max_logit))
    return total, float(nll), float(nll_base), imax == imax_base


@pytest.fixture()
def logits():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 301, generator=g) * 4  # odd vocabulary: rows carry one pad entry
    base[0] = 0.0  # a flat row: scale 0, every code 0 (perplexity.cpp's memset branch)
    base[1, :] = torch.linspace(-3, 3, 301)  # every logit within 16 of the top: lo is the smallest logit
    noisy = base + torch.randn(6, 301, generator=g) * 0.7
    return base, noisy


def test_rows_equal_perplexity_cpp_bit_for_bit(logits):
    base, _ = logits
    ours = kld_base.encode(base)
    for r in range(base.shape[0]):
        assert np.array_equal(ours[r], cpp_encode_row(base[r].numpy())), r


def test_kld_against_the_file_equals_perplexity_cpp(logits):
    base, noisy = logits
    rows = kld_base.encode(base)
    targets = torch.tensor([3, 17, 250, 0, 99, 300])
    ours = kld_base.against_base(rows, noisy, targets)
    for r in range(base.shape[0]):
        kld, nll, base_nll, same = cpp_kld_row(noisy[r].numpy(), rows[r], int(targets[r]))
        assert ours["kld"][r].item() == pytest.approx(kld, rel=1e-5, abs=1e-6), r
        assert ours["nll"][r].item() == pytest.approx(nll, rel=1e-6, abs=1e-6), r
        assert ours["base_nll"][r].item() == pytest.approx(base_nll, rel=1e-6, abs=1e-6), r
        assert bool(ours["same_top"][r]) == same, r


def test_entries_below_the_cut_drop_out():
    """A peaked distribution over a large vocabulary puts most entries more than 16 nats down: they must drop out
    (llama.cpp), not count as e^floor each (which would add ~0.05 nats here); the kept ones are exact to one
    code step."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 50000, generator=g) * 6
    rows = kld_base.encode(logits)
    back = kld_base.decode(rows, 50000)
    logp = torch.log_softmax(logits, -1)
    kept = back > kld_base.CUT
    assert ((~kept).sum(-1) > 1000).all()
    assert kld_base.against_base(rows, logits, torch.zeros(20, dtype=torch.long))["kld"].abs().max() < 1e-3
    step = (rows[:, :4].view(np.float32)[:, 0]).max()
    assert (back[kept] - logp[kept]).abs().max().item() <= step


def test_file_round_trip_and_header(tmp_path):
    """The header and layout llama-perplexity reads: magic, n_ctx, n_vocab, n_chunk, the tokens, then the rows
    of the scored positions chunk after chunk."""
    ids = torch.arange(3 * 16).reshape(3, 16) % 11
    g = torch.Generator().manual_seed(1)
    chunks_logits = [torch.randn(16 - 1 - 8, 11, generator=g) for _ in range(3)]
    path = tmp_path / "base.kld"
    writer = kld_base.KldBaseWriter(path, ids, 11)
    for i, x in enumerate(chunks_logits):
        writer.write(i, x)
    writer.close()
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_" and struct.unpack("<Iii", raw[8:20]) == (16, 11, 3)
    nv = kld_base.row_width(11)
    assert nv == 16 and len(raw) == 20 + 4 * 48 + 3 * 7 * nv * 2 == kld_base.file_bytes(3, 16, 11)
    f = kld_base.KldBaseFile(path)
    f.check(ids)
    assert np.array_equal(f.chunk(2), kld_base.encode(chunks_logits[2]))
    with pytest.raises(AssertionError):
        f.check(ids + 1)


def test_noise_floor_is_not_reported_as_zero_under_a_bfloat16_evaluation(tiny_model):
    """The floor rounds the base's logits to bfloat16; under a bfloat16 evaluation they already are, so the floor
    would be exactly 0 and every difference would look like signal: it is reported as not measurable instead."""
    from quantize.measure import quality
    from quantize.sources.models import load_model, load_tokenizer
    from quantize.sources.texts import bundled_wiki

    chunks = quality.make_chunks(load_tokenizer(tiny_model), bundled_wiki("eval"), 64, 2)
    fp32 = quality.score_model(load_model(tiny_model, "float32"), chunks, None)["noise_floor"]
    bf16 = quality.score_model(load_model(tiny_model, "bfloat16"), chunks, None)["noise_floor"]
    assert fp32["kld_mean"] > 0
    assert bf16["kld_mean"] is None and "already bfloat16" in bf16["what"]


def test_parallel_jobs_compute_the_base_store_once(tmp_path, monkeypatch):
    """Two evaluations against the same base at the same time (parallel CI jobs sharing a cache folder): one takes
    the store's lock and computes it, the other waits on the lock and reuses what the first published."""
    import threading
    import time

    from quantize.measure.quality import Chunks

    monkeypatch.setenv("QUANTIZE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    ids = torch.arange(2 * 16).reshape(2, 16) % 11
    chunks = Chunks(ids, 16, False, 32, {"source": "t", "sha256": "0", "chars": 1}, "tok")
    calls, results = [], {}

    def compute(writer):
        calls.append(threading.get_ident())
        time.sleep(1.0)  # the first job is still computing when the second arrives
        for i in range(2):
            writer.write(i, torch.randn(7, 11))
        return {"ppl": 1.0}

    def job(name, delay):
        time.sleep(delay)
        results[name] = kld_base.cached(tmp_path, chunks, "float32", "cpu", compute, 11)[2]

    threads = [threading.Thread(target=job, args=("a", 0.0)), threading.Thread(target=job, args=("b", 0.3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results["a"]["state"] == "computed" and "waited_for_another_process_s" not in results["a"]
    assert results["b"]["state"] == "reused" and results["b"]["waited_for_another_process_s"] >= 0.5
    assert results["a"]["file"] == results["b"]["file"]
