"""The base model's log-probabilities in llama.cpp's own `--kl-divergence-base` file, and the KLD of another model
against it with llama-perplexity's arithmetic (tools/perplexity/perplexity.cpp: log_softmax, process_logits).

One store serves `quantize run` and `quantize eval`, every backend, and llama.cpp itself: `llama-perplexity -m Q.gguf
--kl-divergence-base FILE --kl-divergence` reads our file, and we read one it wrote.

File (little-endian):
    b"_logits_", uint32 n_ctx, int32 n_vocab, int32 n_chunk, int32 tokens[n_chunk × n_ctx]
    then for each chunk, for each scored position j = n_ctx/2 … n_ctx−2, a row of nv = 2·⌈n_vocab/2⌉ + 4 uint16:
        float32 scale, float32 min_log_prob (the first four uint16), then one uint16 code per vocabulary entry.
    log p(v) = scale·code(v) + min_log_prob. With m = max logit, lo = max(min logit, m − 16) and lse the log of
    Σ exp(logit − m): scale = (m − lo)/65535, min_log_prob = lo − m − lse, code = round((logit − lo)/scale) for
    logit > lo, else 0. So the top 16 nats of each distribution are kept to 2.4e-4 nats.

KLD of a model Q at a position (llama.cpp's log_softmax against the base): Σ over entries with log p_base > −16 of
p_base·(log p_base − log p_Q); the base's NLL of the right token and its argmax ("same top") come from the stored
codes too; entries at or below −16 drop out of the sum instead of counting as e^floor each.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from quantize.common.cache import cache_root
from quantize.common.files import files_sha256

MAGIC = b"_logits_"
CUT = -16.0  # llama.cpp: base entries with log p ≤ −16 drop out of the KLD sum, and codes span 16 nats
STORE = "llama.cpp --kl-divergence-base file (uint16 codes over the top 16 nats per position)"


def row_width(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4


def file_bytes(n_chunk: int, n_ctx: int, n_vocab: int) -> int:
    """Size of a base file: header, tokens, and one row per scored position."""
    return 20 + 4 * n_chunk * n_ctx + 2 * n_chunk * (n_ctx - 1 - n_ctx // 2) * row_width(n_vocab)


def encode(logits: torch.Tensor) -> np.ndarray:
    """[n, n_vocab] float32 logits → [n, nv] uint16 rows, as perplexity.cpp's log_softmax(…, uint16_t *, …)."""
    x = logits.float().numpy()
    n, n_vocab = x.shape
    top = x.max(axis=1)
    lo = np.maximum(x.min(axis=1), top - np.float32(16))
    lse = np.log(np.exp(x - top[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)
    scale = ((top - lo) / np.float32(65535)).astype(np.float32)
    rows = np.zeros((n, row_width(n_vocab)), dtype=np.uint16)
    head = rows[:, :4].view(np.float32)  # [n, 2] floats over the first four uint16
    head[:, 0] = scale
    head[:, 1] = (lo - top - lse).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(scale > 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
    codes = np.rint(inv[:, None] * (x - lo[:, None]))  # float32 products, rounded half to even like nearest_int
    rows[:, 4 : 4 + n_vocab] = np.where(x > lo[:, None], codes, 0).astype(np.uint16)
    return rows


def decode(rows: np.ndarray, n_vocab: int) -> torch.Tensor:
    """[n, nv] uint16 rows → [n, n_vocab] float32 base log-probabilities (scale·code + min_log_prob)."""
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    codes = torch.from_numpy(rows[:, 4 : 4 + n_vocab]).float()  # uint16 → float32, exact (torch's is threaded)
    return codes.mul_(torch.from_numpy(head[:, 0:1].copy())).add_(torch.from_numpy(head[:, 1:2].copy()))


def _double_sum(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Row sums of x [n, v] with a float64 total: blocks of `block` summed in float32, the blocks in float64
    (2.3x faster than converting every term on a 262k vocabulary; within 4e-8 relative of the all-double sum). A
    vocabulary that is not a multiple of the block is summed term by term in float64."""
    n, v = x.shape
    if v % block:
        return x.sum(-1, dtype=torch.float64)
    return x.view(n, v // block, block).sum(-1).sum(-1, dtype=torch.float64)


def against_base(rows: np.ndarray, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position, as llama.cpp scores a model against a base file: KLD, the model's NLL of the right token, the
    base's (from its codes), and whether both put the same token on top."""
    logits = logits.float()
    base = decode(rows, logits.shape[1])  # [n, n_vocab]
    # log q = logit − max − log Σ exp(logit − max), the sum in double as perplexity.cpp does: torch's float32
    # log_softmax put our mean KLD a near-constant ~1e-5 nats below llama-perplexity's
    top = logits.max(-1, keepdim=True).values
    logq = torch.sub(logits, top)
    lse = torch.log(_double_sum(torch.exp(logq))).float()[:, None]
    logq.sub_(lse)
    terms = torch.sub(base, logq).mul_(base.exp()).masked_fill_(base <= CUT, 0)  # p·(log p − log q), cut rows 0
    kld = _double_sum(terms)  # float terms, double sum
    del terms
    return {"kld": kld,
            "nll": -logq.gather(1, targets[:, None])[:, 0],
            "base_nll": -base.gather(1, targets[:, None])[:, 0],
            "same_top": base.argmax(-1) == logits.argmax(-1)}


class KldBaseFile:
    """A finished base file, read one chunk at a time with plain reads (not a memory map, whose pages would stay
    mapped and count in the process's RSS: 2 GB for 16 chunks of a 262k vocabulary)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            if f.read(8) != MAGIC:
                raise ValueError(f"{path}: not a llama.cpp --kl-divergence-base file (no _logits_ magic)")
            self.n_ctx, self.n_vocab, self.n_chunk = (int(v) for v in np.frombuffer(f.read(12), dtype="<i4"))
            self.tokens = np.fromfile(f, dtype="<i4", count=self.n_chunk * self.n_ctx).reshape(self.n_chunk,
                                                                                               self.n_ctx)
        self.scored = self.n_ctx - 1 - self.n_ctx // 2
        self.offset = 20 + 4 * self.n_chunk * self.n_ctx
        self.chunk_values = self.scored * row_width(self.n_vocab)

    def chunk(self, i: int) -> np.ndarray:
        """[scored, nv] uint16 rows of chunk i."""
        assert 0 <= i < self.n_chunk, (i, self.n_chunk)
        rows = np.fromfile(self.path, dtype="<u2", count=self.chunk_values, offset=self.offset + 2 * i * self.chunk_values)
        assert rows.size == self.chunk_values, f"{self.path} is truncated"
        return rows.reshape(self.scored, row_width(self.n_vocab))

    def check(self, ids: torch.Tensor) -> None:
        """The file was made for these chunks (token ids [n_chunk, n_ctx], BOS already in place)."""
        assert tuple(ids.shape) == (self.n_chunk, self.n_ctx), (tuple(ids.shape), self.n_chunk, self.n_ctx)
        assert np.array_equal(self.tokens, ids.numpy()), f"{self.path} was made for other tokens"


class KldBaseWriter:
    """Writes the file chunk by chunk, in order; the header once the first chunk tells the vocabulary's size."""

    def __init__(self, path: Path, ids: torch.Tensor, n_vocab: int | None = None):
        self.ids, self.n_vocab, self.next = ids, n_vocab, 0
        self.file = open(path, "wb")

    def write(self, i: int, logits: torch.Tensor) -> None:
        assert i == self.next, (i, self.next)
        if i == 0:
            self.n_vocab = self.n_vocab or logits.shape[1]
            n_chunk, n_ctx = self.ids.shape
            self.file.write(MAGIC + np.array([n_ctx], "<u4").tobytes()
                            + np.array([self.n_vocab, n_chunk], "<i4").tobytes())
            self.file.write(self.ids.numpy().astype("<i4").tobytes())
        assert logits.shape[1] == self.n_vocab, f"logits of width {logits.shape[1]}, the file's vocabulary {self.n_vocab}"
        self.file.write(encode(logits).astype("<u2").tobytes())
        self.next += 1

    def close(self) -> None:
        self.file.close()


@contextlib.contextmanager
def exclusive(path: Path):
    """An exclusive lock on the file `path` (flock, released when the process ends, however it ends), so that
    parallel CI jobs that score variants against the same base compute its store once; yields whether it had to
    wait for another holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            fcntl.flock(fh, fcntl.LOCK_EX)
            waited = True
        try:
            yield waited
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _compute_into(folder: Path, key_src: dict, chunks, compute, n_vocab: int) -> None:
    """compute(writer) into a partial folder, published as `folder` by a rename once complete."""
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        writer = KldBaseWriter(partial / "base.kld", chunks.ids, n_vocab)
        try:
            scores = compute(writer)
        finally:
            writer.close()
        assert writer.next == chunks.ids.shape[0], "the base file misses chunks"
        (partial / "done.json").write_text(json.dumps({**scores, "key": key_src}, default=str))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        partial.rename(folder)
    except OSError:  # published meanwhile by a process that did not take the lock (an older quantize): as good
        shutil.rmtree(partial, ignore_errors=True)


def cached(model_path: Path, chunks, dtype: str, backend: str,
           compute: Callable[[KldBaseWriter], dict], n_vocab: int) -> tuple[KldBaseFile, dict, dict]:
    """(base file, base scores, cache record) for this model's files, text, protocol, dtype and backend: reused
    when `run` or `eval` computed it before, else `compute(writer)` fills a new one, published by a rename only
    once complete (a killed computation leaves nothing that looks finished)."""
    key_src = {"model": files_sha256(model_path), "protocol": chunks.protocol(), "dtype": dtype,
               "backend": backend, "store": STORE}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:24]
    folder = cache_root() / "kld-base" / key
    state, waited = "reused", None
    if not (folder / "done.json").is_file():
        start = time.perf_counter()
        with exclusive(folder.with_name(f"{key}.lock")) as blocked:  # parallel jobs: one computes, the others wait
            waited = round(time.perf_counter() - start, 3) if blocked else None
            if not (folder / "done.json").is_file():
                state = "computed"
                _compute_into(folder, key_src, chunks, compute, n_vocab)
    store = KldBaseFile(folder / "base.kld")
    store.check(chunks.ids)
    scores = json.loads((folder / "done.json").read_text())
    scores.pop("key", None)
    return store, scores, {"key": key, "state": state, "file": str(folder / "base.kld"), "format": STORE,
                           **({"waited_for_another_process_s": waited} if waited is not None else {})}
