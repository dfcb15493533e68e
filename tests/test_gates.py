"""CI use: quality gates decide the exit code (0 pass, 3 a gate failed, 2 a user error), `--json` leaves one JSON
document on stdout, and a failed gate still writes and marks the artefacts."""

import json

from conftest import write_recipe
from test_cli import quantize

METHODS = [{"name": "rtn", "bits": 4, "group_size": 64}, {"name": "int8"}]
FAST_EVAL = {"perplexity": {"n_ctx": 128, "max_chunks": 2}, "speed": {"enabled": False}}


def test_gates_pass_exit_0_with_json(tiny_model, tmp_path):
    write_recipe(tmp_path / "r.yaml", str(tiny_model), METHODS, tmp_path / "out", eval=FAST_EVAL)
    r = quantize("run", "r.yaml", "--json", "--gate", "max_kld=1.0", "--gate", "min_same_top=0.1",
                 "--gate", "must_fit=[{gpu: RTX 4090, context: 4096}]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)  # stdout holds the JSON and nothing else
    assert result["exit_code"] == 0 and result["gates"]["passed"] is True and result["gates"]["failed"] == []
    for name, v in result["variants"].items():
        gates = {c["gate"]: c for c in v["gates"]["checks"]}
        assert gates["max_kld"]["measured"] == v["kld_mean"] and gates["max_kld"]["passed"]
        assert gates["must_fit"]["measured"]["headroom_bytes"] > 0
    assert "## Gates" in (tmp_path / "out" / "report.md").read_text()
    r = quantize("compare", "out", "--json", "--png", "c.png", cwd=tmp_path)
    rows = {row["name"]: row for row in json.loads(r.stdout)["rows"]}
    assert r.returncode == 0 and set(rows) == {"base", *result["variants"]}
    assert rows["int8-w8a16"]["kld"] == result["variants"]["int8-w8a16"]["kld_mean"]


def test_gate_fails_exit_3_artefacts_written_and_marked(tiny_model, tmp_path):
    write_recipe(tmp_path / "r.yaml", str(tiny_model), METHODS, tmp_path / "out", eval=FAST_EVAL,
                 gates={"max_kld": 1e-9})
    r = quantize("run", "r.yaml", "--json", cwd=tmp_path)
    assert r.returncode == 3, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["exit_code"] == 3 and result["gates"]["passed"] is False
    check = result["variants"]["rtn-w4-sym-g64"]["gates"]["checks"][0]
    assert check == {"gate": "max_kld", "limit": 1e-9, "measured": result["variants"]["rtn-w4-sym-g64"]["kld_mean"],
                     "passed": False}
    assert "gate failed: rtn-w4-sym-g64: max_kld" in r.stderr
    assert (tmp_path / "out" / "rtn-w4-sym-g64" / "manifest.json").is_file()  # written, and marked:
    marked = json.loads((tmp_path / "out" / "rtn-w4-sym-g64" / "results.json").read_text())
    assert marked["gates"]["passed"] is False
    assert "**FAIL**" in (tmp_path / "out" / "report.md").read_text()


def test_gate_on_something_not_measured_is_a_user_error(tiny_model, tmp_path):
    write_recipe(tmp_path / "r.yaml", str(tiny_model), METHODS, tmp_path / "out", eval=FAST_EVAL)
    r = quantize("run", "r.yaml", "--gate", "min_tg_tps=10", cwd=tmp_path)
    assert r.returncode == 2 and "gates.min_tg_tps needs `eval.speed.enabled: true`" in r.stderr
    r = quantize("run", "r.yaml", "--gate", "must_fit=[{gpu: RTX 9999, context: 4096}]", cwd=tmp_path)
    assert r.returncode == 2 and "unknown GPU 'RTX 9999'" in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_zero_limit_is_a_gate():
    """max_ppl_delta: 0 ("no worse than the base") is a limit, not an unset gate; must_serve: false is unset."""
    from quantize.recipe import Gates

    assert Gates(max_ppl_delta=0).is_set and Gates(max_kld=0.0).is_set
    assert not Gates().is_set and not Gates(must_serve=False).is_set and Gates(must_serve=True).is_set
