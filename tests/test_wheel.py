"""The package installs like a real one: a built wheel (not the editable checkout) carries the bundled recipes and
the local lm-eval tasks as package data, and its `quantize` command lists and plans a bundled recipe from a folder
that is not the repository.

The fresh venv gets only the wheel (--no-deps); its dependencies are the test venv's, seen through a .pth line
(site-packages of the running interpreter), which adds their folder to sys.path without running the editable
install's own .pth, so `quantize` can only come from the wheel (the test checks where it came from)."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from conftest import REPO


def test_wheel_ships_recipes_and_tasks_and_runs_from_anywhere(tmp_path):
    # built from a copy of the tracked files, so setuptools' build/ folder lands there, not in the checkout
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    for name in tracked.splitlines():
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_symlink():
            target.symlink_to(os.readlink(REPO / name))
        else:
            shutil.copy2(REPO / name, target)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(dist), str(src)], check=True, capture_output=True)
    wheel = next(dist.glob("quantize-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": ""}

    def run(*args):
        return subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)

    where = run(str(python), "-c", "import quantize, quantize.measure.lmeval as m; print(quantize.__file__); "
                                   "print(sorted(m.LOCAL_TASKS))")
    assert where.returncode == 0, where.stderr
    assert where.stdout.splitlines()[0].startswith(str(site)), where.stdout  # the wheel, not the checkout
    assert where.stdout.splitlines()[1] == "['wiki_cloze', 'wiki_rolling']"
    listed = run(str(env_dir / "bin" / "quantize"), "recipes")
    assert listed.returncode == 0, listed.stderr
    names = sorted(Path(line.split()[0]).name for line in listed.stdout.splitlines())
    assert names == sorted(p.name for p in (REPO / "recipes").glob("*.yaml")), listed.stdout
    assert all(line.startswith(str(site)) for line in listed.stdout.splitlines())
    assert "INVALID" not in listed.stdout
    plan = run(str(env_dir / "bin" / "quantize"), "plan", "recipes/smollm2-int8.yaml")  # the README's spelling
    assert plan.returncode == 0, plan.stderr
    assert "recipe smollm2-int8" in plan.stdout and "variant int8-w8a16" in plan.stdout
    missing = run(str(env_dir / "bin" / "quantize"), "plan", "no-such-recipe")
    assert missing.returncode == 2 and "bundled recipes: gemma3-270m, llama3-int4" in missing.stderr
    assert "Traceback" not in missing.stderr
