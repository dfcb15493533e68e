"""Text for calibration and evaluation: the bundled offline Wikipedia articles, local files, hub datasets.

The bundled corpus is the 105 real Wikipedia articles (redirects and stubs under 500 characters dropped) that the
`gensim` wheel carries as test data: 84 for calibration, 21 held out. They are split by article, deterministically, into a calibration part and a held-out evaluation part that never
overlap: articles sorted by page id, every fifth one (index % 5 == 4) held out.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from quantize.common.cache import cache_root
from quantize.common.errors import QuantizeError
from quantize.common.files import read_text, write_json

Split = Literal["calibration", "eval"]
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELD_OUT_EVERY = 5


@dataclass(frozen=True)
class Text:
    name: str  # e.g. "bundled:wiki/eval"
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def describe(self) -> dict:
        return {"source": self.name, "sha256": self.sha256, "chars": len(self.text)}


def wiki_articles() -> tuple[tuple[int, str, str], ...]:
    """(page id, title, plain text) of every real article (redirects dropped), sorted by page id. gensim's wiki
    filter takes about 4 s of a 2-core machine, so the result is kept: in this process, and as JSON in the cache
    folder (texts/<key>.json, the key naming gensim's version and the dump file's path, size and modification time)."""
    path = _wiki_dump()
    stat = path.stat()
    from importlib.metadata import version

    return _wiki_articles(path, f"{version('gensim')}|{path}|{stat.st_size}|{stat.st_mtime_ns}")


def _wiki_dump() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise QuantizeError("bundled:wiki needs the `gensim` package (pip install gensim==4.4.0)")
    path = Path(list(spec.submodule_search_locations)[0]) / WIKI_FILE
    if not path.is_file():
        raise QuantizeError(f"bundled:wiki: {path} is missing from the installed gensim wheel")
    return path


@functools.lru_cache(maxsize=2)
def _wiki_articles(path: Path, key: str) -> tuple[tuple[int, str, str], ...]:
    file = cache_root() / "texts" / f"wiki-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if file.is_file():
        try:
            return tuple(tuple(a) for a in json.loads(file.read_text(encoding="utf-8")))
        except (ValueError, OSError):  # damaged by hand or by the disk: parsed again and rewritten
            pass
    articles = tuple(_parse_wiki(path))
    file.parent.mkdir(parents=True, exist_ok=True)
    write_json(file, articles)  # whole or absent; a process that got there first wrote the same articles
    return articles


def _parse_wiki(path: Path) -> list[tuple[int, str, str]]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.BZ2File(path) as fh:
        for title, markup, page_id in extract_pages(fh):
            text = filter_wiki(markup)
            if text.lstrip().upper().startswith("#REDIRECT") or len(text) < 500:
                continue
            text = text.replace("'''", "").replace("''", "")
            text = re.sub(r"[ \t]+\n", "\n", text)
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            articles.append((int(page_id), title, text))
    return sorted(articles)


def wiki_split(split: Split) -> list[tuple[int, str, str]]:
    """The articles of one split: every HELD_OUT_EVERY-th (by page id) is held out for evaluation."""
    return [a for i, a in enumerate(wiki_articles()) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == (split == "eval")]


def bundled_wiki(split: Split) -> Text:
    body = "\n\n".join(f"= {title} =\n\n{text}" for _, title, text in wiki_split(split))
    return Text(f"bundled:wiki/{split}", body)


def _join_column(rows, column: str, where: str) -> str:
    if column not in rows.column_names:
        raise QuantizeError(f"{where}: no column {column!r}; columns: {', '.join(rows.column_names)} (set `field:`)")
    return "\n\n".join(str(t) for t in rows[column] if t)


def load_text(source: str, split: Split, field: str = "text") -> Text:
    """Resolve a recipe's text `source` for one split. Local files and hub datasets are used whole; only the
    bundled corpus is split, because a user who gives a file has chosen it for that purpose."""
    if source == "bundled:wiki":
        return bundled_wiki(split)
    if source.startswith("bundled:"):
        raise QuantizeError(f"unknown bundled text {source!r}; accepted: bundled:wiki, a local file, hf:<dataset>")
    if source.startswith("hf:"):
        return _hub_text(source[3:], split, field)
    path = Path(source)
    if not path.exists():
        raise QuantizeError(f"text source {source}: no such file (accepted: bundled:wiki, .txt/.jsonl/.parquet, hf:<id>)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return Text(str(path), read_text(path, "a UTF-8 text file (convert it: iconv -f latin1 -t utf-8)"))
    if suffix in (".jsonl", ".json", ".parquet"):
        import datasets

        builder = "parquet" if suffix == ".parquet" else "json"
        rows = datasets.load_dataset(builder, data_files=str(path), split="train")
        return Text(str(path), _join_column(rows, field, str(path)))
    raise QuantizeError(f"text source {source}: unsupported file type {suffix!r}; accepted: .txt, .jsonl, .parquet")


def _hub_text(spec: str, split: Split, field: str) -> Text:
    import datasets

    name, _, config = spec.partition(":")
    hub_split = "train" if split == "calibration" else "test"
    try:
        rows = datasets.load_dataset(name, config or None, split=hub_split)
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise QuantizeError(
            f"hub dataset {name!r} split {hub_split!r} could not be loaded{hint}: {type(exc).__name__}: {exc}. "
            "Offline, give a local .txt/.jsonl/.parquet file or bundled:wiki instead."
        ) from None
    return Text(f"hf:{spec}/{hub_split}", _join_column(rows, field, f"hf:{spec}"))


def calibration_batches(token_ids: torch.Tensor, samples: int, seq_len: int, seed: int,
                        bos: int | None = None) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens drawn at seeded random offsets (as the GPTQ reference draws from
    C4). Shape [samples, seq_len]. `bos`: the id that replaces each window's first token, for a model whose
    tokenizer adds BOS (Llama 3, Gemma): windows then start as the model always sees text, and as evaluation
    chunks do (llama.cpp's perplexity and imatrix tools replace the first token the same way)."""
    n = token_ids.numel()
    if n <= seq_len:
        raise QuantizeError(f"calibration text has {n} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len, (samples,), generator=gen)
    batches = torch.stack([token_ids[s : s + seq_len] for s in starts.tolist()])
    if bos is not None:
        batches[:, 0] = bos
    return batches
