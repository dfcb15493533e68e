"""A run killed with SIGKILL in the middle of a GPTQ (or AWQ) build keeps its work; the same command continues after
the last finished layer, does not evaluate the base again, and writes the same bytes as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import build_tiny_llama, write_recipe
from quantize import pipeline
from quantize.recipe import load_recipe

FIRST = {"gptq": {"name": "gptq", "bits": 4, "group_size": 64, "sym": True},
         "awq": {"name": "awq", "bits": 4, "group_size": 64, "sym": True},
         "int8-w8a8": {"name": "int8", "scheme": "w8a8"}}  # SmoothQuant's log continues too
VARIANT = {"gptq": "gptq-w4-sym-g64", "awq": "awq-w4-sym-g64", "rtn": "rtn-w4-sym-g64", "int8-w8a8": "int8-w8a8"}
SETTINGS = dict(calibration={"samples": 16, "seq_len": 64},
                eval={"perplexity": {"n_ctx": 128, "max_chunks": 2}, "speed": {"enabled": False}})


def files_of(out, names):
    return {n: json.loads((out / VARIANT[n] / "manifest.json").read_text()) for n in names}


@pytest.mark.parametrize("first", sorted(FIRST))
def test_kill_9_mid_build_then_resume_is_byte_identical(first, tmp_path):
    methods = [FIRST[first], {"name": "rtn", "bits": 4, "group_size": 64}]
    model = build_tiny_llama(tmp_path / "m", num_hidden_layers=6)
    reference = tmp_path / "reference"
    pipeline.run(load_recipe(write_recipe(tmp_path / "ref.yaml", str(model), methods, reference, **SETTINGS)))

    out = tmp_path / "out"
    write_recipe(tmp_path / "r.yaml", str(model), methods, out, **SETTINGS)
    command = [sys.executable, "-m", "quantize.cli", "run", "r.yaml"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.glob(f".out.work-*/{VARIANT[first]}.partial/.resume-state.pt"))
        if found:
            state = found[0]
            break
        time.sleep(0.01)
    assert state is not None, "the build never saved a layer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and state.parent.is_dir()  # nothing published, the work kept

    r = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing the interrupted run" in r.stderr
    assert "base model: evaluated before the interruption" in r.stderr
    resumed, uninterrupted = files_of(out, [first, "rtn"]), files_of(reference, [first, "rtn"])
    assert resumed[first]["result"]["resumed_at_layer"] >= 1
    for name in resumed:
        assert resumed[name]["files"] == uninterrupted[name]["files"], name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []  # nothing left behind
