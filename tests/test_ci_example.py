"""examples/ci/quantize.yml: every `run:` step of the workflow, in order, with its own env (RECIPE, QUANTIZE_SET,
QUANTIZE_GATES), on the tiny model: setup is skipped (the test already runs in the set-up environment)."""

import os
import subprocess

import yaml

from conftest import REPO, write_recipe


def test_workflow_run_steps(tiny_model, tmp_path):
    workflow = yaml.safe_load((REPO / "examples" / "ci" / "quantize.yml").read_text())
    steps = [s for s in workflow["jobs"]["build"]["steps"] if "run" in s and "ci/setup" not in s["run"]]
    assert [s["name"] for s in steps][:2] == ["check the recipe before any work", "build, evaluate, judge"]
    (tmp_path / ".venv").symlink_to(REPO / ".venv")  # the steps call .venv/bin/quantize from the checkout
    (tmp_path / "recipes").mkdir()
    write_recipe(tmp_path / "recipes" / "tiny.yaml", str(tiny_model), [{"name": "int8"}],
                 tmp_path / "outputs" / "tiny", eval={"perplexity": {"n_ctx": 128, "max_chunks": 2},
                                                      "speed": {"enabled": False}})
    env = {**os.environ, **{k: str(v) for k, v in workflow["env"].items() if "${{" not in str(v)},
           "RECIPE": "recipes/tiny.yaml", "QUANTIZE_CACHE": str(tmp_path / "cache")}
    for step in steps:
        r = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        print(f"{step['name']}: exit {r.returncode}\n{r.stdout[-1000:]}")
        assert r.returncode == 0, (step["name"], r.stderr[-2000:])
    assert (tmp_path / "outputs" / "tiny" / "report.html").is_file()
    assert (tmp_path / "quantize-exit-code").read_text().strip() == "0"

    # the same steps with a gate the artefact cannot meet: the run step records 3, the last step fails with it
    env["QUANTIZE_GATES"] = "--gate max_kld=1e-12"
    env["QUANTIZE_SET"] = f"--set output={tmp_path / 'outputs' / 'strict'}"
    codes = [subprocess.run(["bash", "-e", "-c", s["run"]], cwd=tmp_path, env=env, capture_output=True,
                            timeout=600).returncode for s in steps]
    assert codes[:-1] == [0] * (len(steps) - 1) and codes[-1] == 3
    assert (tmp_path / "outputs" / "strict" / "int8-w8a16" / "manifest.json").is_file()  # still written, to upload
