"""lm-evaluation-harness on the model already in memory (`HFLM(pretrained=<model object>)`), offline.

Local tasks are YAML files under eval/tasks/ (`wiki_rolling`, `wiki_cloze`); their data are JSON lines this
module writes from the held-out bundled Wikipedia articles into the cache. Any other task name goes to
lm-eval's own registry (wikitext, hellaswag, arc_easy, …), which needs the hub: offline it fails at once with
a message saying so.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from quantize.common.cache import cache_root
from quantize.common.errors import QuantizeError
from quantize.sources.texts import wiki_split

TASK_DIR = Path(__file__).resolve().parents[1] / "eval_tasks"  # package data (in the repository: eval/tasks)
LOCAL_TASKS = {p.stem: p.resolve() for p in sorted(TASK_DIR.glob("*.yaml"))}
CLOZE_CONTEXT_WORDS = 60


def data_dir() -> Path:
    folder = cache_root() / "lmeval-data"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_data(folder: Path) -> None:
    """The held-out articles (one document each) and cloze passages built from them, as JSON lines."""
    articles = wiki_split("eval")
    with open(folder / "wiki_eval_articles.jsonl.partial", "w") as fh:
        for page_id, title, text in articles:
            fh.write(json.dumps({"id": page_id, "title": title, "text": f"= {title} =\n\n{text}"}) + "\n")
    (folder / "wiki_eval_articles.jsonl.partial").replace(folder / "wiki_eval_articles.jsonl")
    with open(folder / "wiki_cloze.jsonl.partial", "w") as fh:
        for page_id, _, text in articles:
            for doc in cloze_passages(text):
                fh.write(json.dumps({"id": page_id, **doc}) + "\n")
    (folder / "wiki_cloze.jsonl.partial").replace(folder / "wiki_cloze.jsonl")


def cloze_passages(text: str) -> list[dict]:
    """Sentences that end in an alphabetic word of ≥ 4 letters: context = the words before it (up to
    CLOZE_CONTEXT_WORDS, same paragraph), word = that last word (no punctuation). One per paragraph."""
    docs = []
    for paragraph in text.split("\n\n"):
        words = paragraph.split()
        for end in range(len(words) - 1, CLOZE_CONTEXT_WORDS // 2, -1):
            match = re.fullmatch(r"([A-Za-z]{4,})\.", words[end])
            if match:
                start = max(0, end - CLOZE_CONTEXT_WORDS)
                docs.append({"context": " ".join(words[start:end]), "word": match.group(1)})
                break
    return docs


def task_config(name: str, folder: Path) -> dict:
    config = yaml.safe_load(LOCAL_TASKS[name].read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {k: v.replace("{data}", str(folder)) for k, v in files.items()}
    return config


def run_or_skip(model, tokenizer, tasks: list[str], limit: int | None = None) -> dict:
    """lm-eval on a torch model in memory; for an artefact another engine runs, the reason it is skipped."""
    import torch

    if not isinstance(model, torch.nn.Module):
        return {"skipped": "lm-eval runs on the torch model in memory; GGUF artefacts run on llama.cpp, MLX "
                           "artefacts on mlx-lm, streamed ones layer by layer, vLLM's in its own process"}
    return run(model, tokenizer, tasks, limit)


def run(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
        max_length: int | None = None) -> dict:
    """{task: {metric: value}} plus the protocol, for a torch model in memory."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise QuantizeError(f"eval.tasks needs lm-eval (pip install lm-eval==0.4.13): {exc}") from None
    import lm_eval

    folder = data_dir()
    if any(t in LOCAL_TASKS for t in tasks) and not (folder / "wiki_cloze.jsonl").is_file():
        write_data(folder)
    specs = []
    for t in tasks:
        if t in LOCAL_TASKS:
            specs.append(task_config(t, folder))
        elif os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise QuantizeError(f"eval.tasks: {t!r} is an lm-eval hub task and the hub is offline (HF_HUB_OFFLINE=1); "
                                f"local tasks: {', '.join(LOCAL_TASKS)}")
        else:
            specs.append(t)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device),
              max_length=max_length)  # None: the model's own (8192 for SmolLM2: slow windows on CPU)
    out = simple_evaluate(model=lm, tasks=specs, limit=limit, log_samples=False, bootstrap_iters=0,
                          random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    results = {}
    for name, metrics in out["results"].items():
        results[name] = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float))
                         and not k.startswith("alias") and "stderr" not in k}
    return {"results": results, "protocol": {"lm_eval": lm_eval.__version__, "tasks": tasks, "limit": limit,
                                             "num_fewshot": 0, "batch_size": batch_size,
                                             "max_length": lm.max_length, "data": str(folder)}}
