"""The console command: user errors are one message and exit 2, without a traceback or partial output."""

import os
import subprocess
import sys

from conftest import REPO, write_recipe


def quantize(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "quantize.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bad_recipe_exit_2_no_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\nmodel: bundled:smollm2-135m\nmethod: {name: gptqq}\nbogus: 1\n")
    r = quantize("run", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "bad.yaml" in r.stderr and "unknown method 'gptqq'" in r.stderr and "bogus: unknown key" in r.stderr
    assert len(r.stderr.splitlines()) < 25


def test_missing_model_and_offline_hub_id(tmp_path):
    for model, expected in [("./nowhere", "no such file or directory"), ("org/model", "the hub is switched off (HF_HUB_OFFLINE=1)")]:
        write_recipe(tmp_path / "r.yaml", model, [{"name": "int8"}], tmp_path / "out")
        r = quantize("run", "r.yaml", cwd=tmp_path)
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # nothing half-written


def test_finished_output_not_overwritten_without_force(tmp_path, tiny_model):
    out = tmp_path / "done"
    out.mkdir()
    (out / "report.md").write_text("finished earlier")
    write_recipe(tmp_path / "r.yaml", str(tiny_model), [{"name": "int8"}], out)
    r = quantize("run", "r.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "--force" in r.stderr
    assert (out / "report.md").read_text() == "finished earlier"


def test_recipes_and_plan(tmp_path, tiny_model):
    r = quantize("recipes", cwd=REPO)
    assert r.returncode == 0 and "smollm2-int8.yaml" in r.stdout
    write_recipe(tmp_path / "r.yaml", str(tiny_model), [{"name": "int8"}], tmp_path / "out")
    r = quantize("plan", "r.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "int8-w8a16: expected" in r.stdout and "RTX 4090" in r.stdout
    assert not (tmp_path / "out").exists()
