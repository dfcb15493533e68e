"""GPTQ and AWQ calibration across torch.distributed ranks (methods/ranks.py): torchrun with 2 CPU processes (gloo)
writes the same artefact, byte for byte, as one process at the same threads per process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_recipe
from quantize.common.errors import QuantizeError
from quantize.methods.ranks import Ranks
from quantize.methods.statistics import Hessian, accumulate_hessian

GPTQ = {"name": "gptq", "bits": 4, "group_size": 64, "sym": False}
AWQ = {"name": "awq", "bits": 4, "group_size": 64, "search_samples": 3, "clip_tokens": 100}
RTN = {"name": "rtn", "bits": 4, "group_size": 64}
QUICK_EVAL = {"perplexity": {"source": "bundled:wiki", "n_ctx": 128, "max_chunks": 2}, "speed": {"enabled": False}}


def test_each_rank_takes_whole_forward_batches():
    assert Ranks(0, 2).parts(24) == [range(0, 16), range(16, 24)]
    assert Ranks(0, 4).parts(33) == [range(0, 16), range(16, 24), range(24, 32), range(32, 33)]
    calib = torch.arange(24)[:, None].expand(24, 3)
    assert torch.equal(Ranks(1, 2).local(calib), calib[16:])
    with pytest.raises(QuantizeError, match=r"calibration.samples. ≥ 16"):
        Ranks(0, 2).parts(8)


def test_hessian_sums_of_parts_add_up_in_any_grouping():
    """What the all-reduce relies on: Σ XᵀX kept in float64 is the same bits whether the parts are added one after
    another (one process) or in two halves that are then added (two ranks)."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(512, 96, generator=g) * torch.rand(96, generator=g) * 10 for _ in range(4)]
    one = Hessian.zeros(96)
    for p in parts:
        accumulate_hessian(one, p)
    halves = []
    for pair in (parts[:2], parts[2:]):
        h = Hessian.zeros(96)
        for p in pair:
            accumulate_hessian(h, p)
        halves.append(h)
    both = Hessian(halves[0].xtx + halves[1].xtx, halves[0].n + halves[1].n)
    assert both.n == one.n == 2048
    assert torch.equal(both.H, one.H)


def run(args: list[str], cwd: Path, threads: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def torchrun(recipe: Path, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "quantize.cli", "run", str(recipe)], cwd)


def same_log(a: Path, b: Path) -> None:
    """Two build logs with the same rows, fields and choices; a loss (a float32 forward's error summed over the
    tokens) may differ in its last digits, because ranks split the tokens into other batches and a CPU's BLAS may
    round a product of another shape differently (an AMX Xeon does where an EPYC did not: 7th digit)."""
    rows_a, rows_b = ([json.loads(line) for line in f.read_text().splitlines()] for f in (a, b))
    assert len(rows_a) == len(rows_b), a
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys(), a
        for key in ra:
            if "loss" in key and ra[key] is not None:
                assert math.isclose(ra[key], rb[key], rel_tol=1e-5), (a, ra, rb)
            elif key != "seconds":
                assert ra[key] == rb[key], (a, key, ra, rb)


def test_two_ranks_write_the_single_process_artefact(tiny_model, tmp_path):
    """24 samples: rank 0 takes batches 0-1 (16 sequences), rank 1 batch 2 (8); GPTQ's Hessians are all-reduced,
    each solve runs on rank 0 and is broadcast; AWQ's statistics are summed over the ranks (its 3 judged sequences,
    0, 12 and 23, lie on both). Every file of both artefacts but the manifest and results equals the single
    process's (1 thread each: the thread count changes BLAS summation order in one process too). The RTN variant
    of the same run is built by rank 0 alone while rank 1 waits."""
    outs = {}
    for name in ("one", "two"):
        outs[name] = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.yaml", str(tiny_model), [GPTQ, AWQ, RTN], outs[name],
                              calibration={"samples": 24, "seq_len": 128}, eval=QUICK_EVAL)
        done = run([sys.executable, "-m", "quantize.cli", "run", str(recipe)], tmp_path) if name == "one" \
            else torchrun(recipe, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    for variant in ("gptq-w4-asym-g64", "awq-w4-asym-g64-search3", "rtn-w4-sym-g64"):
        a, b = outs["one"] / variant, outs["two"] / variant
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        for n in names:
            if n == "quantize-log.jsonl":  # the losses are float sums over each rank's batches: equal to rounding
                same_log(a / n, b / n)
            elif n not in ("manifest.json", "results.json"):  # these two hold times
                assert (a / n).read_bytes() == (b / n).read_bytes(), f"{variant}/{n} differs"
    for variant in ("gptq-w4-asym-g64", "awq-w4-asym-g64-search3"):
        made = json.loads((outs["two"] / variant / "manifest.json").read_text())["result"]
        assert made["ranks"]["world"] == 2 and made["ranks"]["backend"] == "gloo"
        assert made["ranks"]["samples_per_rank"] == [16, 8]
    assert "ranks" not in json.loads((outs["two"] / "rtn-w4-sym-g64" / "manifest.json").read_text())["result"]
    log = [json.loads(line) for line in (outs["two"] / "gptq-w4-asym-g64" / "quantize-log.jsonl").read_text().splitlines()]
    assert {r["samples"] for r in log} == {24} and {r["tokens"] for r in log} == {24 * 128}


def test_too_few_samples_for_the_ranks_is_refused_before_work(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model), [GPTQ], tmp_path / "out",
                          calibration={"samples": 8, "seq_len": 128}, eval=QUICK_EVAL)
    done = torchrun(recipe, tmp_path)
    assert done.returncode != 0
    assert "key `methods[0]` under torchrun (2 processes)" in done.stderr and "calibration.samples` ≥ 16" in done.stderr
    # torchrun prints its own traceback (ChildFailedError) for a child that exits non-zero; ours print none
    assert "/quantize/" not in "".join(line for line in done.stderr.splitlines() if line.lstrip().startswith("File "))
    assert not (tmp_path / "out").exists()


def test_a_gptq_nested_in_a_method_rank_0_runs_alone_stays_on_rank_0(tiny_model, tmp_path, monkeypatch):
    """`auto` (compressed-tensors, quantizer gptq) is built by rank 0 alone while the others wait for the next
    spread job; the GPTQ it runs inside must not reach for the other ranks (it would wait forever on a collective
    they never join). Under torchrun it finishes and writes the single process's artefact."""
    monkeypatch.setenv("QUANTIZE_CACHE", str(tmp_path / "cache"))
    method = {"name": "auto", "target": "compressed-tensors", "quantizer": "gptq", "budget": {"scheme": "w4g64"}}
    outs = {}
    for name in ("one", "two"):
        outs[name] = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.yaml", str(tiny_model), [method], outs[name],
                              calibration={"samples": 16, "seq_len": 64}, eval=QUICK_EVAL)
        done = run([sys.executable, "-m", "quantize.cli", "run", str(recipe)], tmp_path) if name == "one" \
            else torchrun(recipe, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    (variant,) = [p.name for p in outs["one"].iterdir() if (p / "manifest.json").is_file()]
    a, b = outs["one"] / variant, outs["two"] / variant
    for n in sorted(p.name for p in a.iterdir()):
        if n not in ("manifest.json", "results.json"):
            assert (a / n).read_bytes() == (b / n).read_bytes(), f"{variant}/{n} differs"
