"""Quality: perplexity and KL divergence to the base model, with llama.cpp's `llama-perplexity` protocol.

Protocol (llama.cpp tools/perplexity): tokenize the whole text once (BOS first when the tokenizer adds one), cut
it into non-overlapping chunks of n_ctx tokens, replace the first token of each chunk by BOS when it adds one, run
each chunk from an empty cache and score only the second half: the logits at positions j = n_ctx/2 … n_ctx-2
predict token j+1, so n_ctx/2 - 1 tokens per chunk. PPL = exp(mean NLL), ± exp(mean)·sqrt(var(NLL)/(N-1)).

KLD (llama.cpp --kl-divergence): on the same positions, KL(P_base ‖ P_q) = Σ_v p_base(v)·(ln p_base(v) − ln p_q(v));
llama.cpp's whole report (kld_statistics): mean ± sqrt(var/(N-1)), percentiles from 99.9% to 0.1%, the change of
the right token's probability Δp (mean ±, percentiles, RMS ±), ln(PPL(Q)/PPL(base)) ± with the covariance of the
two runs, and "same top" = share of positions where both argmaxes agree, ± sqrt(p(1-p)/(N-1)). The base model's
log-probabilities go once into llama.cpp's own --kl-divergence-base file (kld_base.py) and are read back chunk by
chunk for each artefact, so memory stays one chunk whatever the text size; the KLD against it follows llama.cpp's
arithmetic, cut-off included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantize.common.divergence import kl_divergence  # noqa: F401  (quality.kl_divergence, as before)
from quantize.common.errors import QuantizeError
from quantize.common.ui import track
from quantize.measure.kld_base import KldBaseFile, KldBaseWriter, against_base
from quantize.sources.models import tokenizer_adds_bos, tokenizer_sha256
from quantize.sources.texts import Text


@dataclass(frozen=True)
class Chunks:
    ids: torch.Tensor  # [n_chunks, n_ctx], BOS already put in place where the tokenizer uses one
    n_ctx: int
    bos_replaced: bool
    text_tokens: int  # tokens in the whole text, before cutting
    text: dict  # source, sha256, chars
    tokenizer_sha256: str
    scored_bytes: int = 0  # UTF-8 bytes of the scored target tokens (decoded per chunk), for bits per byte

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.n_ctx - 1 - self.first

    def protocol(self) -> dict:
        return {
            "protocol": "llama.cpp llama-perplexity (non-overlapping chunks, second half scored)",
            "text": self.text,
            "text_tokens": self.text_tokens,
            "n_ctx": self.n_ctx,
            "chunks": int(self.ids.shape[0]),
            "tokens_scored": int(self.ids.shape[0] * self.scored_per_chunk),
            "first_scored_position": self.first,
            "bos": ("BOS before the text and in place of each chunk's first token" if self.bos_replaced
                    else "no BOS (tokenizer adds none)"),
            "tokenizer_sha256": self.tokenizer_sha256,
            "scored_bytes": self.scored_bytes,
            "bits_per_byte": "sum of NLL over scored tokens / ln 2 / UTF-8 bytes of those tokens (decoded per chunk)",
        }


def make_chunks(tokenizer, text: Text, n_ctx: int, max_chunks: int | None) -> Chunks:
    """The text tokenized whole as llama-perplexity does (common_tokenize with special tokens: BOS first when the
    tokenizer adds one), cut into chunks of n_ctx, each chunk's first token replaced by BOS when it adds one."""
    bos = tokenizer_adds_bos(tokenizer)
    ids = tokenizer(text.text, add_special_tokens=False).input_ids
    ids = torch.tensor(([tokenizer.bos_token_id] if bos else []) + ids, dtype=torch.long)
    n_chunks = ids.numel() // n_ctx
    if n_chunks < 1:
        raise QuantizeError(f"{text.name}: {ids.numel()} tokens is less than one chunk of n_ctx={n_ctx}")
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    chunks = ids[: n_chunks * n_ctx].reshape(n_chunks, n_ctx).clone()
    if bos:
        chunks[:, 0] = tokenizer.bos_token_id
    first = n_ctx // 2
    scored_bytes = sum(len(tokenizer.decode(row[first + 1 :].tolist()).encode()) for row in chunks)
    return Chunks(chunks, n_ctx, bos, int(ids.numel()), text.describe(), tokenizer_sha256(tokenizer), scored_bytes)


# positions whose statistics are taken together: each row's numbers are the same in any block (every reduction is
# along the vocabulary), and a block of 8 rows of a 262k vocabulary keeps its temporaries in the CPU's cache
# instead of streaming 256 × 262k floats through memory once per step (Gemma 3: 0.72 → 0.20 s per chunk)
ROW_BLOCK = 8


def _mean_unc(x: np.ndarray) -> tuple[float, float]:
    mean = float(x.mean())
    var = float((x.astype(np.float64) ** 2).mean() - mean**2)
    return mean, math.sqrt(max(var, 0.0) / (len(x) - 1))


def forward_logits(model, ids: torch.Tensor, first: int = 0) -> torch.Tensor:
    """[n - first, vocab] logits of positions first… of one sequence ids [1, n] from a torch model or a runtime with
    `logits(ids, first)` (llama.cpp's LlamaCppModel, mlx-lm's MlxModel). The output layer runs on those positions
    only (transformers' logits_to_keep; llama.cpp's per-token output flags): the scored half of a chunk. llama.cpp's
    result lives in its model's buffer until the next call (the scoring loops take each chunk's numbers first)."""
    if isinstance(model, torch.nn.Module):  # on the model's device; the scoring is on the CPU
        keep = ids.shape[1] - first
        return model(ids.to(model.device), use_cache=False, logits_to_keep=keep).logits[0, -keep:].cpu()
    if getattr(model, "reuses_logits", False):  # llama.cpp: valid until the next call, as the scoring loops use it
        return model.logits(ids[0].tolist(), first, reuse=True)
    return model.logits(ids[0].tolist(), first)


def _scored_logits(model, chunks: Chunks, label: str):
    """(chunk index, logits [scored, vocab], target ids [scored]) for every chunk, one at a time (a streamed model,
    measure/streamed.py, computes all chunks layer by layer first)."""
    first = chunks.first
    if getattr(model, "streamed", False):
        for i, logits in track(model.chunk_logits(chunks.ids), f"perplexity {label} (streamed)",
                               total=chunks.ids.shape[0]):
            yield i, logits[first:-1].float(), chunks.ids[i, first + 1 :]
        return
    for i in track(range(chunks.ids.shape[0]), f"perplexity {label}"):
        ids = chunks.ids[i : i + 1]
        yield i, forward_logits(model, ids, first)[:-1].float(), ids[0, first + 1 :]


def _perplexity(nll: np.ndarray, chunks: Chunks) -> dict:
    mean, unc = _mean_unc(nll)
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_unc": ppl * unc, "mean_nll": mean, "tokens_scored": int(nll.size),
            "bits_per_byte": float(nll.sum() / math.log(2) / chunks.scored_bytes) if chunks.scored_bytes else None}


@torch.inference_mode()
def score_model(model, chunks: Chunks, store: KldBaseWriter | None, label: str = "base", floor: bool = True) -> dict:
    """Perplexity of any model scored on its own, with no base to compare against: the base itself, whose
    log-probabilities go to `store` (when given) for the KLD of every variant after it, or an artefact evaluated
    without a base. With `floor`, also the bfloat16 noise floor: a property of a base, the scale below which its
    variants' KLDs differ by rounding alone; an artefact scored without a base has no KLD for it to qualify."""
    if not floor:
        return _perplexity_only(model, chunks, store, label)
    nll, floors, on_bf16_grid = [], [], True
    for i, logits, targets in _scored_logits(model, chunks, label):
        for rows, tgt in zip(logits.split(ROW_BLOCK), targets.split(ROW_BLOCK)):
            logp = torch.log_softmax(rows, dim=-1)
            nll.append(-logp.gather(1, tgt[:, None])[:, 0])
            rounded = rows.bfloat16().float()
            on_bf16_grid = on_bf16_grid and torch.equal(rounded, rows)
            floors.append(kl_divergence(logp, torch.log_softmax(rounded, dim=-1)))
        if store is not None:
            store.write(i, logits)
    out = _perplexity(torch.cat(nll).double().numpy(), chunks)
    if on_bf16_grid:  # a bfloat16 evaluation: rounding its logits to bfloat16 changes nothing, the "floor" is 0
        out["noise_floor"] = {"kld_mean": None, "kld_unc": None, "kld_p99": None,
                              "what": "not measurable here: the base's logits are already bfloat16 (eval.dtype "
                                      "bfloat16), so rounding them to bfloat16 changes nothing; evaluate in float32 "
                                      "for a floor"}
        return out
    floor_kld = torch.cat(floors).double().numpy()
    mean, unc = _mean_unc(floor_kld)
    out["noise_floor"] = {"kld_mean": mean, "kld_unc": unc, "kld_p99": float(np.percentile(floor_kld, 99)),
                          "what": "KL(base ‖ base with its logits rounded to bfloat16), per scored position: "
                                  "differences of mean KLD below this are rounding noise (as ExLlamaV3's qbench)"}
    return out


def _perplexity_only(model, chunks: Chunks, store: KldBaseWriter | None, label: str) -> dict:
    """score_model without the floor: each position's NLL as logsumexp(logits) − logit(target), the exponentials
    written into one buffer of ROW_BLOCK rows for the whole text. A fresh temporary of that size per block (what
    torch.logsumexp allocates) lands where glibc returns freed memory to the system and takes it back, and the page
    faults made the statistics 9x slower on some runs (perf: clear_page_erms; bench/results/gguf_eval_speed.md)."""
    nll, buf = [], None
    for i, logits, targets in _scored_logits(model, chunks, label):
        if buf is None:
            buf = torch.empty(ROW_BLOCK, logits.shape[1])
        for rows, tgt in zip(logits.split(ROW_BLOCK), targets.split(ROW_BLOCK)):
            top = rows.amax(dim=-1, keepdim=True)
            e = buf[: rows.shape[0]]
            torch.sub(rows, top, out=e).exp_()
            lse = e.sum(dim=-1).log_() + top[:, 0]
            nll.append(lse - rows.gather(1, tgt[:, None])[:, 0])
        if store is not None:
            store.write(i, logits)
    return _perplexity(torch.cat(nll).double().numpy(), chunks)


def base_file(model, chunks: Chunks, path: Path, label: str = "base") -> tuple[KldBaseFile, dict]:
    """score_model with its log-probabilities written to a base file at `path` (outside the cache: benches, tests)."""
    writer = KldBaseWriter(path, chunks.ids)
    try:
        scores = score_model(model, chunks, writer, label)
    finally:
        writer.close()
    return KldBaseFile(path), scores


@torch.inference_mode()
def score(model, chunks: Chunks, base: KldBaseFile, label: str, positions: Path | None = None) -> dict:
    """Perplexity of `model` on the chunks and its KLD against the base file, as llama-perplexity --kl-divergence
    computes them. With `positions`, the KLD of every scored position is also saved there (.npy, float32), for
    paired comparisons of variants scored on the same positions (paired_difference), and beside it (nll_file) the
    model's and the base's NLL of the right token at each position [2, positions] (the engine check's reference)."""
    base.check(chunks.ids)
    rows = {"kld": [], "nll": [], "base_nll": [], "same_top": []}
    for i, logits, targets in _scored_logits(model, chunks, label):  # against_base takes its own log-softmax
        base_rows = base.chunk(i)
        for s in range(0, logits.shape[0], ROW_BLOCK):
            part = slice(s, s + ROW_BLOCK)
            for name, values in against_base(base_rows[part], logits[part], targets[part]).items():
                rows[name].append(values)
    kld, nll, base_nll, same = (torch.cat(rows[k]).double().numpy() for k in ("kld", "nll", "base_nll", "same_top"))
    out = _perplexity(nll, chunks)
    out["kld"] = kld_statistics(kld, nll, base_nll, same)
    if positions is not None:
        positions.parent.mkdir(parents=True, exist_ok=True)
        np.save(positions, kld.astype(np.float32))
        np.save(nll_file(positions), np.stack([nll, base_nll]).astype(np.float32))
    return out


def nll_file(positions: Path) -> Path:
    """Where score() keeps the per-position NLLs of the model whose KLDs are in `positions`."""
    return positions.with_name(positions.stem + ".nll.npy")


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean KLD of a − mean KLD of b, with the standard error of the per-position differences: both are scored
    on the same positions, so the noise they share cancels and the error is far below either one's own."""
    assert a.shape == b.shape, "paired only on the same positions"
    d = a.astype(np.float64) - b.astype(np.float64)
    mean, unc = _mean_unc(d)
    return {"difference": mean, "unc": unc, "z": mean / unc if unc else None}


# the percentiles llama-perplexity --kl-divergence prints (tools/perplexity/perplexity.cpp)
KLD_PERCENTILES = (99.9, 99, 95, 90, 10, 5, 1, 0.1)
DELTA_P_PERCENTILES = (99.9, 99, 95, 90, 75, 25, 10, 5, 1, 0.1)


def kld_statistics(kld: np.ndarray, nll: np.ndarray, base_nll: np.ndarray, same: np.ndarray) -> dict:
    """llama.cpp's KL-divergence report, per scored position: KLD mean ± and percentiles; Δp (the change of the
    probability given to the right token, p_Q − p_base) mean ±, percentiles and RMS ±; ln(PPL(Q)/PPL(base)) ±
    with the covariance of the two NLLs; same top ±. Percentiles interpolate linearly between ranks and the
    median is the middle value (or the mean of the two), as llama.cpp and numpy both do."""
    dp = np.exp(-nll) - np.exp(-base_nll)
    k_mean, k_unc = _mean_unc(kld)
    p_same = float(same.mean())
    nll_mean, nll_unc = _mean_unc(nll)
    base_mean, base_unc = _mean_unc(base_nll)
    n = len(nll)
    cov = float(((nll * base_nll).mean() - nll.mean() * base_nll.mean()) / (n - 1))  # of the two means
    ratio_unc = math.sqrt(max(nll_unc**2 + base_unc**2 - 2 * cov, 0.0))
    ppl, base_ppl = math.exp(nll_mean), math.exp(base_mean)
    dp_mean, dp_unc = _mean_unc(dp)
    mse, mse_unc = _mean_unc(dp**2)
    rms = math.sqrt(mse)
    pct = lambda x, q: float(np.percentile(x, q))  # noqa: E731
    return {
        "mean": k_mean,
        "unc": k_unc,
        "median": pct(kld, 50),
        "p99": pct(kld, 99),
        "max": float(kld.max()),
        "min": float(kld.min()),
        "percentiles": {str(q): pct(kld, q) for q in KLD_PERCENTILES},
        "same_top": p_same,
        "same_top_unc": math.sqrt(p_same * (1 - p_same) / (len(same) - 1)),
        "ln_ppl_ratio": nll_mean - base_mean,
        "ln_ppl_ratio_unc": ratio_unc,
        "ppl_ratio": ppl / base_ppl,
        "ppl_ratio_unc": ppl / base_ppl * ratio_unc,
        "ppl_correlation": cov / (nll_unc * base_unc) if nll_unc and base_unc else None,
        "delta_p": {"mean": dp_mean, "unc": dp_unc, "max": float(dp.max()), "median": pct(dp, 50),
                    "min": float(dp.min()), "percentiles": {str(q): pct(dp, q) for q in DELTA_P_PERCENTILES}},
        "delta_p_rms": rms,
        "delta_p_rms_unc": 0.5 / rms * mse_unc if rms else 0.0,
    }
