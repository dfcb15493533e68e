"""`quantize serve`: the real engines' OpenAI-compatible servers on loopback, driven by the official openai client,
and gone afterwards; bad ports and artefacts the engine cannot load give exit 2 and one clear message."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from openai import OpenAI

from conftest import REPO


def serve(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "quantize.cli", "serve", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_for_url(process, timeout=240):
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"base URL: (\S+)\s+\(engine: (\S+); model: (\S+)\)", line)
        if found:
            return found.groups()
    process.kill()
    raise AssertionError("no base URL: " + "".join(lines) + process.stderr.read())


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def chat_round_trip(url: str, model: str, engine: str) -> None:
    client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    models = [m.id for m in client.models.list()]
    if engine == "llama.cpp":  # transformers serve lists the hub cache instead of the model it was given
        assert models == [model]
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert isinstance(reply.choices[0].message.content, str) and reply.usage.completion_tokens >= 1
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True) if c.choices]
    assert any(p for p in pieces), pieces


def served_then_stopped(artefact, tmp_path, *extra):
    process = serve(artefact, "--threads", "1", *extra, cwd=tmp_path)
    url, engine, model = wait_for_url(process)
    assert url.startswith("http://127.0.0.1:")
    try:
        chat_round_trip(url, model, engine)
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    pid = int(re.search(r"serving \(pid (\d+)\)", err).group(1))
    assert process.returncode == 0, err
    assert gone(pid), f"the {engine} server (pid {pid}) is still running"
    assert "Traceback" not in err
    return engine


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory):
    from quantize.formats.gguf_convert import convert

    return convert(tiny_model, tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf", "Q8_0")


def test_gguf_on_llama_cpp_server(tiny_gguf, tmp_path):
    assert served_then_stopped(tiny_gguf, tmp_path) == "llama.cpp"


def test_an_engine_that_dies_by_itself_is_exit_1_not_a_user_error(tiny_gguf, tmp_path):
    """Review §2: the engine killed under a running `quantize serve` is a runtime failure (exit 1, the log named),
    not a user error (exit 2)."""
    process = serve(tiny_gguf, "--threads", "1", cwd=tmp_path)
    wait_for_url(process)
    lines = []
    while not (lines and "serving (pid" in lines[-1]):
        lines.append(process.stderr.readline())
        assert lines[-1], "".join(lines)
    pid = int(re.search(r"serving \(pid (\d+)\)", lines[-1]).group(1))
    os.killpg(pid, signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1, err
    assert "server stopped by itself" in err and "log:" in err and "Traceback" not in err


def test_compressed_tensors_on_transformers_serve(tiny_model, tmp_path):
    from quantize.methods.configs import RtnMethod
    from quantize.methods.registry import METHODS
    from quantize.sources.models import resolve_model

    folder = tmp_path / "rtn"
    folder.mkdir()
    METHODS["rtn"].build(RtnMethod(name="rtn", bits=4, group_size=64, sym=True), resolve_model(str(tiny_model)),
                         folder, None)
    assert served_then_stopped(folder, tmp_path) == "transformers"


@pytest.fixture(scope="module")
def tiny_mlx(tiny_model, tmp_path_factory):
    from quantize.methods.configs import RtnMethod
    from quantize.methods.registry import METHODS
    from quantize.sources.models import resolve_model

    folder = tmp_path_factory.mktemp("mlx") / "rtn-mlx"
    folder.mkdir()
    METHODS["rtn"].build(RtnMethod(name="rtn", bits=4, group_size=64, format="mlx"), resolve_model(str(tiny_model)),
                         folder, None)
    return folder


def test_mlx_on_mlx_lm_server(tiny_mlx, tmp_path):
    pytest.importorskip("mlx_lm")
    assert served_then_stopped(tiny_mlx, tmp_path) == "mlx"


def test_a_corrupt_mlx_folder_exits_2(tiny_mlx, tmp_path):
    pytest.importorskip("mlx_lm")
    corrupt = tmp_path / "corrupt-mlx"
    corrupt.mkdir()
    for f in tiny_mlx.iterdir():
        data = f.read_bytes()
        (corrupt / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    bad = serve(corrupt, "--timeout", "60", cwd=tmp_path)
    _, err = bad.communicate(timeout=120)
    assert bad.returncode == 2 and "the mlx server failed to load the model" in err, err
    assert "invalid data offsets" in err and "Traceback" not in err, err


def test_port_in_use_and_a_corrupt_artefact_exit_2(tiny_gguf, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = serve(tiny_gguf, "--port", port, cwd=tmp_path)
        _, err = busy.communicate(timeout=60)
    assert busy.returncode == 2 and f"127.0.0.1:{port} is in use" in err and "Traceback" not in err
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    bad = serve(corrupt, "--timeout", "60", cwd=tmp_path)
    _, err = bad.communicate(timeout=120)
    # the server's log shows the load failure, or the server has already exited: both are reported, no hang
    assert bad.returncode == 2 and ("the llama.cpp server exited" in err or "failed to load the model" in err)
    assert "Traceback" not in err, err


def test_an_engine_that_cannot_load_it_is_refused(tiny_gguf, tmp_path):
    wrong = serve(tiny_gguf, "--engine", "transformers", cwd=tmp_path)
    _, err = wrong.communicate(timeout=60)
    assert wrong.returncode == 2 and "served by --engine llama.cpp" in err


def test_dtype_is_refused_where_the_engine_computes_in_the_artefacts_types(tiny_gguf, tmp_path):
    """--dtype applies to transformers and vLLM; llama.cpp runs the GGUF's own types, and an unknown dtype is named."""
    for args, words in (((tiny_gguf, "--dtype", "float16"), "--dtype: llama.cpp computes in the artefact's own types"),
                        ((tiny_gguf, "--engine", "llama.cpp", "--dtype", "fp8"), "--dtype 'fp8'; accepted: bfloat16")):
        bad = serve(*args, cwd=tmp_path)
        _, err = bad.communicate(timeout=60)
        assert bad.returncode == 2 and words in err and "Traceback" not in err, err


def test_vllm_serves_in_the_dtype_it_is_scored_in(tmp_path):
    """vLLM's server computes in bfloat16 unless told otherwise (the dtype of `quantize eval --engine vllm`), not in
    its "auto" (the checkpoint's dtype: a float16 W8A8 folder served so on CI's AMX Xeon dropped the first request)."""
    from quantize.runtimes import serve as runtime

    default, _ = runtime.command(tmp_path, "vllm", "127.0.0.1", 8000, None, 256, None)
    chosen, _ = runtime.command(tmp_path, "vllm", "127.0.0.1", 8000, None, 256, None, "float32")
    assert default[default.index("--dtype") + 1] == runtime.VLLM_DTYPE == "bfloat16"
    assert chosen[chosen.index("--dtype") + 1] == "float32"
