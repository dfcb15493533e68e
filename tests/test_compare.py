"""`quantize compare`: the Pareto front by hand on made-up points, and the CLI over a real run's folder."""

import json
import subprocess
import sys

from conftest import write_recipe
from quantize import pipeline
from quantize.report.compare import Row, mark_pareto
from quantize.recipe import load_recipe


def row(name, size, kld, protocol="p"):
    return Row(run="r", name=name, method="m", fmt="f", size=size, bpw=None, ppl=1.0, d_ppl=0.0, kld=kld,
               same_top=None, pp=None, tg=None, fits={}, protocol=protocol)


def test_pareto_front_by_hand():
    rows = [row("base", 100, None), row("a", 30, 0.30), row("b", 40, 0.10), row("c", 45, 0.20),  # c: b is smaller and better
            row("d", 50, 0.05), row("e", 30, 0.40), row("f", 20, 0.90), row("x", 10, 2.0, protocol="other")]
    mark_pareto(rows)
    # base (KLD 0, largest) is on the front: nothing is as good; e loses to a (same size, lower KLD)
    assert {r.name for r in rows if r.pareto} == {"base", "a", "b", "d", "f", "x"}


def test_compare_cli_table_png_html(tiny_model, tmp_path):
    methods = [{"name": "rtn", "bits": 4, "group_size": 64}, {"name": "rtn", "bits": 8, "group_size": -1},
               {"name": "int8", "scheme": "w8a16"}]
    out = tmp_path / "tinyrun"
    pipeline.run(load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), methods, out,
                                          eval={"perplexity": {"n_ctx": 64, "max_chunks": 2},
                                                "speed": {"enabled": False}})))
    png, page = tmp_path / "c.png", tmp_path / "c.html"
    res = subprocess.run([sys.executable, "-m", "quantize.cli", "compare", str(out), "--png", str(png),
                          "--html", str(page)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("| tinyrun |") == 4  # base + 3 artefacts
    assert res.stdout.count("★") >= 2  # the base and the smallest artefact are always on the front
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    assert "data:image/png;base64," in text and "http" not in text.replace("http-equiv", "")  # no network needed
    bad = subprocess.run([sys.executable, "-m", "quantize.cli", "compare", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "results.json" in bad.stderr and "Traceback" not in bad.stderr
    # review §2: a typo is an error, not a table without that run; --json writes no chart unless asked
    typo = subprocess.run([sys.executable, "-m", "quantize.cli", "compare", str(out), str(tmp_path / "tinyrnu")],
                          capture_output=True, text=True)
    assert typo.returncode == 2 and "tinyrnu: not a run folder" in typo.stderr and "Traceback" not in typo.stderr
    js = subprocess.run([sys.executable, "-m", "quantize.cli", "compare", str(out), "--json"], capture_output=True,
                        text=True, cwd=tmp_path)
    assert js.returncode == 0 and json.loads(js.stdout)["chart"] is None
    assert not (tmp_path / "compare.png").exists()


def test_the_base_is_labelled_as_what_it_is():
    """Review §1: the report and `compare` called every base "fp16 safetensors". The label comes from the base's
    stored dtypes and, for a base converted from a GGUF file, names that file."""
    from quantize.report.markdown import base_label

    assert base_label({"fit": {"weight_bytes_by_dtype": {"BF16": 10}}}) == "bfloat16 safetensors"
    assert base_label({"fit": {"weight_bytes_by_dtype": {"F32": 2, "F16": 10}},
                       "source_file": "/x/gemma-3-270m-Q4_K_M.gguf"}) == \
        "float16+float32 safetensors (dequantised from gemma-3-270m-Q4_K_M.gguf)"
