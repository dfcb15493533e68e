"""report.html in a real browser: Debian's headless Chromium renders the page to a screenshot with no console
message and no request other than the page itself (its network log lists every URL it asked for)."""

import json
import re
import shutil
import subprocess

import pytest

from conftest import write_recipe
from quantize import pipeline
from quantize.recipe import load_recipe

CHROMIUM = shutil.which("chromium")


def test_report_html_renders_in_chromium_without_errors_or_requests(tiny_model, tmp_path):
    methods = [{"name": "rtn", "bits": 4, "group_size": 64}, {"name": "int8"}]
    out = tmp_path / "run"
    pipeline.run(load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), methods, out,
                                          eval={"perplexity": {"n_ctx": 128, "max_chunks": 2},
                                                "speed": {"enabled": False}},
                                          gates={"max_kld": 1.0})))
    results = json.loads((out / "results.json").read_text())
    floor = results["base"]["perplexity"]["noise_floor"]
    rtn, int8 = (results["variants"][n]["perplexity"]["kld"]["mean"] for n in ("rtn-w4-sym-g64", "int8-w8a16"))
    assert 0 < floor["kld_mean"] < rtn  # bf16 rounding of the logits moves less than 4-bit weights do
    pair = results["paired_kld"]["rtn-w4-sym-g64 − int8-w8a16"]
    assert abs(pair["difference"] - (rtn - int8)) < 1e-6 and pair["z"] > 2
    page = (out / "report.html").read_text()
    assert "Noise floor" in page and "Paired differences" in page
    assert "<h2>Gates</h2>" in page and "<table>" in page and "rtn-w4-sym-g64" in page
    # KLD against size; the fit chart's bars would all be equal (each fits its whole 1024-token context): words
    assert page.count("src='data:image/png;base64,") == 1
    assert "Every artefact fits on every GPU of the recipe" in page and "(1024 tokens)" in page
    from quantize.report import html

    gpu = next(iter(results["base"]["fit"]["largest_context"]))
    results["variants"]["int8-w8a16"]["fit"]["largest_context"][gpu] = 100  # one that does not: the chart
    again = html.render("r", results, (out / "report.md").read_text(), out)
    assert again.count("src='data:image/png;base64,") == 2 and "Every artefact fits" not in again
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page)  # nothing fetched from elsewhere
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (.ci/setup installs it)")
    shot, stderr, requests = render(out / "report.html", tmp_path / "chromium")
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    assert "CONSOLE" not in stderr, [line for line in stderr.splitlines() if "CONSOLE" in line]
    assert requests == [], requests
    # the check sees a page's request: the same browser on a page with one external image reports it
    planted = tmp_path / "planted.html"
    planted.write_text("<!doctype html><img src='http://127.0.0.1:9/x.png'>")
    assert [u for _, u in render(planted, tmp_path / "planted")[2]] == ["http://127.0.0.1:9/x.png"]


def render(page, work):
    """Headless Chromium (flags as this machine's probe runs it) renders `page` to a screenshot; returns the
    screenshot, Chromium's log, and the (initiator, URL) of every network request the page made. Requests of
    the browser itself (time sync, account checks) have no origin as initiator and are left out."""
    work.mkdir()
    shot, netlog = work / "shot.png", work / "net.json"
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={work / 'profile'}", "--enable-logging=stderr", "--v=0",
                        f"--log-net-log={netlog}", f"--screenshot={shot}", "--window-size=1400,2400",
                        page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    text = netlog.read_text().rstrip()
    events = json.loads(text if text.endswith("}") else text.rstrip(",") + "]}")["events"]
    requests = sorted({(e["params"]["initiator"], e["params"]["url"]) for e in events
                       if "initiator" in e.get("params", {}) and e["params"]["initiator"] != "not an origin"})
    return shot, r.stderr, requests
