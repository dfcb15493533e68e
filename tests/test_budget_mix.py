"""The budgeted GGUF mix (method auto): ggml's quantiser as llama.cpp runs it, the exact knapsack, the layer re-run
the sensitivity probe relies on, and the whole method through the pipeline on a tiny Llama evaluated by llama.cpp."""

import itertools
import json

import numpy as np
import pytest
import torch

from conftest import build_tiny_llama, write_recipe
from quantize.common.errors import QuantizeError
from quantize.formats import gguf_convert
from quantize.methods.auto import assign
from quantize.methods.sensitivity import Probe
from quantize.runtimes import llamacpp


def test_roundtrip_is_llama_cpp_quantiser_byte_for_byte(tiny_model, tmp_path):
    """The bytes `roundtrip` stores for a tensor are the bytes llama.cpp's quantiser writes for it with a
    --tensor-type override and the same importance: what the sensitivity table measures is what the file holds."""
    import gguf

    source = gguf_convert.convert(tiny_model, tmp_path / "f16.gguf", "F16")
    types = {"blk.0.ffn_down.weight": "Q4_K", "blk.0.attn_v.weight": "IQ4_NL", "blk.1.ffn_up.weight": "Q3_K",
             "blk.1.attn_output.weight": "Q5_1", "blk.1.ffn_gate.weight": "Q2_K", "output.weight": "Q6_K"}
    rng = np.random.default_rng(0)
    tensors = {t.name: t for t in gguf.GGUFReader(source).tensors}
    importance = {n: rng.random(tensors[n].shape[0]).astype(np.float32) + 0.1 for n in types if n != "output.weight"}
    out = tmp_path / "mixed.gguf"
    llamacpp.quantize(source, out, "Q8_0", importance, tensor_types=types)
    written = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name, kind in types.items():
        assert written[name].tensor_type.name == kind
        w = np.asarray(tensors[name].data, dtype=np.float32)
        deq, stored = llamacpp.roundtrip(kind, w, importance.get(name))
        assert np.array_equal(np.asarray(written[name].data).reshape(-1).view(np.uint8), stored), name
        assert deq.shape == w.shape and np.abs(deq - w).max() < np.abs(w).max()
    assert written["blk.0.ffn_up.weight"].tensor_type.name == "Q8_0"  # not overridden: the file type's
    with pytest.raises(QuantizeError, match="cannot hold rows of 100"):
        llamacpp.roundtrip("Q4_K", np.ones((2, 100), dtype=np.float32))


def test_probe_never_takes_a_type_that_refinds_the_grid():
    """A type that holds the tensor exactly (a base dequantized from that type) is never the probe: its KLD would be
    noise, and noise / ~0 error would be the gain for every other type. It keeps a ~0 prediction."""
    from quantize.formats.gguf_types import bits_per_weight
    from quantize.methods.sensitivity import Group, probe_type

    g = Group("blk.3.attn_output.weight", ["m"], 640, 1024, 3,
              {"Q4_K": {"bytes": 1, "error": 2e-6}, "Q4_0": {"bytes": 1, "error": 0.8}, "Q5_0": {"bytes": 1, "error": 0.2},
               "Q8_0": {"bytes": 1, "error": 2e-3}, "Q3_K": {"bytes": 1, "error": 3.0}})
    assert probe_type(g, list(g.options), bits_per_weight, 4.5) == "Q4_0"  # Q4_K (4.5 bpw) is the grid re-found
    g.options["Q4_K"]["error"] = 0.5  # an ordinary tensor: the nearest type is the probe
    assert probe_type(g, list(g.options), bits_per_weight, 4.5) == "Q4_K"


def test_assign_is_the_exact_optimum_and_the_bound_holds():
    rng = np.random.default_rng(1)
    for trial in range(20):
        options = [{k: (int(rng.integers(5, 60)), float(rng.random())) for k in ("a", "b", "c")} for _ in range(6)]
        budget = int(rng.integers(60, 250))
        feasible = [(sum(options[g][k][1] for g, k in enumerate(c)), c)
                    for c in itertools.product("abc", repeat=6)
                    if sum(options[g][k][0] for g, k in enumerate(c)) <= budget]
        if not feasible:
            with pytest.raises(QuantizeError, match="below the smallest mix"):
                assign(options, budget)
            continue
        best = min(feasible)[0]
        choices, facts = assign(options, budget)  # budget < 20000 units: one byte per unit, no rounding
        assert facts["unit_bytes"] == 1
        assert sum(options[g][k][0] for g, k in enumerate(choices)) <= budget
        assert facts["predicted_kld"] == pytest.approx(best, abs=1e-12)
        assert facts["lagrangian_lower_bound"] <= best + 1e-12


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_probe_reruns_each_layer_as_the_model_computes(tmp_path, model_type):
    extra = {"sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
             "head_dim": 64} if model_type == "gemma3_text" else {}
    folder = build_tiny_llama(tmp_path / model_type, model_type=model_type, **extra)
    ids = torch.randint(3, 500, (2, 40))
    probe = Probe(folder, ids)
    with torch.no_grad():
        full = probe.model(ids, use_cache=False).logits
        for first in range(len(probe.layers)):
            assert (probe.logits(first) - full).abs().max() < 1e-5
    module = "model.layers.1.mlp.down_proj"
    w = probe.model.get_submodule(module).weight.data
    assert probe.kld({module: w.clone()}, 1) < 1e-9  # the unchanged weight: no divergence
    assert probe.kld({module: w + 0.05 * torch.randn_like(w)}, 1) > 1e-6
    assert torch.equal(probe.model.get_submodule(module).weight.data, w)  # restored


def run_tiny(model, tmp_path, methods) -> None:
    """`quantize run` of `methods` on the tiny model: 4 × 64 calibration tokens, 2 chunks of 64, no speed."""
    from typer.testing import CliRunner

    from quantize.cli import app

    recipe = write_recipe(tmp_path / "r.yaml", str(model), methods, tmp_path / "out",
                          calibration={"source": "bundled:wiki", "samples": 4, "seq_len": 64},
                          eval={"perplexity": {"source": "bundled:wiki", "n_ctx": 64, "max_chunks": 2},
                                "speed": {"enabled": False}})
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 0, result.output


def test_budgeted_mix_builds_loads_and_fits(tiny_model, tmp_path, monkeypatch):
    """Through the pipeline: the mix fits its budget (bytes from the file's tensor infos), every tensor has the type
    mix.json gives it, it mixes types, llama.cpp loads and scores it; a bpw budget reuses the cached table."""
    import gguf

    from quantize.fit.shape import shape_from_config
    from quantize.fit.vram import weight_budget

    monkeypatch.setenv("QUANTIZE_CACHE", str(tmp_path / "cache"))
    f16 = sum(int(t.n_bytes) for t in gguf.GGUFReader(gguf_convert.convert(tiny_model, tmp_path / "f.gguf")).tensors)
    budget = int(f16 * 0.35)  # between all-Q2_K and all-Q8_0
    # kv_dtype auto at a batch whose q8_0 cache leaves 45 % of the F16 weights' bytes: an f16 cache leaves nothing,
    # q4_0 leaves gigabytes (every tensor Q8_0), so the choice trades the cache's error against the weights'
    shape = shape_from_config(json.loads((tiny_model / "config.json").read_text()))
    one, _ = weight_budget(shape, "RTX 3060", 1024, 1, "q8_0")
    two, _ = weight_budget(shape, "RTX 3060", 1024, 2, "q8_0")
    batch = 1 + (one - int(0.45 * f16)) // (one - two)
    methods = [{"name": "auto", "budget": {"bytes": budget}, "candidates": ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0"]},
               {"name": "auto", "budget": {"bpw": 5.0}, "candidates": ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0"]},
               {"name": "auto", "budget": {"gpu": "RTX 3060", "context": 4096}, "candidates": ["Q4_K", "Q8_0"]},
               {"name": "auto", "budget": {"gpu": "RTX 3060", "context": 1024, "batch": batch, "kv_dtype": "auto"},
                "candidates": ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0"]},
               {"name": "auto", "budget": {"gpu": "RTX 3060", "context": 4096, "kv_dtype": "q4_0"},
                "candidates": ["Q4_K", "Q8_0"]}]
    run_tiny(tiny_model, tmp_path, methods)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for name, limit in ((f"auto-gguf-{budget}B", budget), ("auto-gguf-5bpw", None)):
        folder = tmp_path / "out" / name
        manifest = json.loads((folder / "manifest.json").read_text())["result"]
        mix = json.loads((folder / "mix.json").read_text())
        reader = gguf.GGUFReader(folder / "model.gguf")
        size = sum(int(t.n_bytes) for t in reader.tensors)
        limit = limit or int(5.0 * sum(int(t.n_elements) for t in reader.tensors) / 8)
        assert size <= limit and size == manifest["bytes"]
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert all(types[m["tensor"]] == m["type"] for m in mix["tensors"])
        assert len({m["type"] for m in mix["tensors"]}) >= 2
        solver = mix["solver"]
        assert solver["lagrangian_lower_bound"] <= solver["predicted_kld"] + 1e-12
        assert manifest["predicted_kld"] == pytest.approx(sum(m["predicted_kld"] for m in mix["tensors"]))
        variant = results["variants"][name]
        assert variant["loader"].startswith("llama.cpp") and variant["perplexity"]["kld"]["mean"] > 0
    assert "cache" in mix["sensitivity"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Budgeted mixes (method auto): predicted and measured" in report
    assert f"| {name} | {limit:,} | {size:,} |" in report
    # a GPU budget: the bytes fit leaves at that context (far more than this model needs: every tensor Q8_0)
    manifest = json.loads((tmp_path / "out" / "auto-gguf-rtx-3060-4096" / "manifest.json").read_text())["result"]
    left, _ = weight_budget(shape, "RTX 3060", 4096, 1, "f16")
    assert manifest["budget"]["bytes_resolved"] == left
    assert manifest["mix"]["tensors_by_type"] == {"Q8_0": 16}  # 2 layers × 7 linears, the embedding, the output
    assert "kv_cache" not in results["variants"]["auto-gguf-rtx-3060-4096"]  # no cache chosen, none scored
    # kv_dtype auto: each cache type's weight budget is fit's, its mix is the one of those bytes, the chosen type is
    # the least predicted sum; the variant is scored with that cache and its fit rows assume it
    name = f"auto-gguf-rtx-3060-1024-b{batch}-kv-auto"
    manifest = json.loads((tmp_path / "out" / name / "manifest.json").read_text())["result"]
    choice = manifest["kv_cache"]
    assert set(choice["options"]) == {"f16", "q8_0", "q4_0"}
    assert not choice["options"]["f16"]["fits"] and choice["options"]["f16"]["weight_budget_bytes"] == 0
    for kv in ("q8_0", "q4_0"):
        o = choice["options"][kv]
        assert o["fits"] and o["weight_budget_bytes"] == weight_budget(shape, "RTX 3060", 1024, batch, kv)[0]
        assert o["predicted_kld"] == pytest.approx(o["predicted_weights_kld"] + o["kv_kld"]) and o["kv_kld"] > 0
    assert choice["options"]["q8_0"]["predicted_weights_kld"] > choice["options"]["q4_0"]["predicted_weights_kld"]
    assert choice["chosen"] == min(("q8_0", "q4_0"), key=lambda kv: choice["options"][kv]["predicted_kld"])
    assert manifest["budget"]["bytes_resolved"] == choice["options"][choice["chosen"]]["weight_budget_bytes"]
    assert manifest["bytes"] <= manifest["budget"]["bytes_resolved"]
    variant = results["variants"][name]
    assert list(variant["kv_cache"]) == [choice["chosen"]] and variant["kv_cache"][choice["chosen"]]["loader"].startswith(
        f"KV cache {choice['chosen'].upper()}, flash attention on, CPU kernels ")
    assert {r["kv_dtype"] for r in variant["fit"]["rows"]} == {choice["chosen"]}
    assert f"| {name} | {choice['chosen']} (chosen) |" in report
    # a fixed cache type in a gpu budget: the variant's fit rows and a KV row use it too
    fixed = results["variants"]["auto-gguf-rtx-3060-4096-kv-q4_0"]
    assert list(fixed["kv_cache"]) == ["q4_0"] and {r["kv_dtype"] for r in fixed["fit"]["rows"]} == {"q4_0"}


def test_budget_keys_are_checked_before_any_work(tiny_model, tmp_path):
    from quantize.recipe import parse_recipe

    base = {"name": "x", "model": str(tiny_model)}
    with pytest.raises(QuantizeError, match=r"method.budget: give exactly one of bytes, bpw, mix, scheme or gpu"):
        parse_recipe({**base, "method": {"name": "auto", "budget": {"bytes": 10, "bpw": 4}}}, "r.yaml")
    with pytest.raises(QuantizeError, match=r"gpu and context go together"):
        parse_recipe({**base, "method": {"name": "auto", "budget": {"gpu": "RTX 4090"}}}, "r.yaml")
    with pytest.raises(QuantizeError, match=r"budget.gpu: .*RTX 9999"):
        parse_recipe({**base, "method": {"name": "auto", "budget": {"gpu": "RTX 9999", "context": 4096}}}, "r.yaml")
    with pytest.raises(QuantizeError, match=r"unknown GGML types \['Q9_K'\]"):
        parse_recipe({**base, "method": {"name": "auto", "budget": {"bpw": 4}, "candidates": ["Q9_K"]}}, "r.yaml")
    with pytest.raises(QuantizeError, match=r"unknown schemes \['w3g128'\].*vLLM"):
        parse_recipe({**base, "method": {"name": "auto", "target": "compressed-tensors", "budget": {"bpw": 4},
                                         "candidates": ["w3g128"]}}, "r.yaml")
    with pytest.raises(QuantizeError, match=r"kv_dtype auto chooses the KV cache type with the weights for a gpu"):
        parse_recipe({**base, "method": {"name": "auto", "budget": {"bpw": 4, "kv_dtype": "auto"}}}, "r.yaml")
    with pytest.raises(QuantizeError, match=r"budget.kv_dtype auto chooses among llama.cpp's KV cache types"):
        parse_recipe({**base, "method": {"name": "auto", "target": "compressed-tensors",
                                         "budget": {"gpu": "RTX 4090", "context": 4096, "kv_dtype": "auto"}}}, "r.yaml")
    with pytest.raises(QuantizeError, match=r"weight_bytes is computed from gpu and context"):
        parse_recipe({**base, "method": {"name": "auto", "budget": {"gpu": "RTX 4090", "context": 4096,
                                                                    "weight_bytes_by_kv": {"f16": 1}}}}, "r.yaml")
    with pytest.raises(QuantizeError, match=r"budget.mix is llama.cpp's"):
        parse_recipe({**base, "method": {"name": "auto", "target": "compressed-tensors",
                                         "budget": {"mix": "Q4_K_M"}}}, "r.yaml")
    with pytest.raises(QuantizeError, match=r"per_module schemes: rtn and gptq"):
        parse_recipe({**base, "method": {"name": "awq", "per_module": [{"match": "x", "bits": 8,
                                                                        "group_size": -1}]}}, "r.yaml")


def test_weight_budget_is_fits_arithmetic(tiny_model):
    from quantize.fit.gpus import gpu_by_name
    from quantize.fit.shape import shape_from_config
    from quantize.fit.vram import fit_one, weight_budget

    shape = shape_from_config(json.loads((tiny_model / "config.json").read_text()))
    left, how = weight_budget(shape, "RTX 4090", 8192, 2, "q8_0")
    row = fit_one(left, shape, gpu_by_name("RTX 4090"), 8192, 2, "q8_0")
    assert row.fits and row.headroom_bytes == 0 and "RTX 4090" in how
    assert not fit_one(left + 1, shape, gpu_by_name("RTX 4090"), 8192, 2, "q8_0").fits
    with pytest.raises(QuantizeError, match="nothing is left for the weights"):
        weight_budget(shape, "RTX 3060", 10**9, 1, "f16")


def test_fit_to_writes_a_recipe_run_accepts(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from quantize.cli import app
    from quantize.recipe import load_recipe

    out = tmp_path / "fit.yaml"
    args = ["fit-to", str(tiny_model), "--gpu", "RTX 3060", "--ctx", "8192", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    recipe = load_recipe(out)
    assert recipe.methods[0].name == "auto" and recipe.methods[0].budget.gpu == "RTX 3060"
    assert recipe.methods[0].budget.context == 8192
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output
    auto = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "auto.yaml"), "--kv-dtype", "auto"])
    assert auto.exit_code == 0, auto.output
    assert all(f"(llama.cpp's {kv} cache, context 8192" in auto.output for kv in ("f16", "q8_0", "q4_0"))
    recipe = load_recipe(tmp_path / "auto.yaml")
    assert recipe.methods[0].budget.kv_dtype == "auto" and recipe.fit.kv_dtype == "f16"
    # fit's flags mean the same here: without flash attention the compute buffer leaves the weights less
    nofa = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "nofa.yaml"), "--no-flash-attn"])
    assert nofa.exit_code == 0 and load_recipe(tmp_path / "nofa.yaml").fit.flash_attn is False
    assert float(nofa.output.split(" GiB for weights")[0].split()[-1]) < float(
        result.output.split(" GiB for weights")[0].split()[-1])


def test_per_module_schemes_write_config_groups_transformers_loads(tiny_model, tmp_path):
    """RTN with per_module schemes (a per-layer mix): each linear on its own grid, one compressed-tensors config
    group per scheme, reloaded by transformers to the model computed here; the size estimate from the
    architecture matches the file."""
    from quantize.fit.footprint import expected_bytes
    from quantize.formats.tensors import weight_bytes
    from quantize.methods import grids
    from quantize.methods.configs import RtnMethod
    from quantize.methods.registry import METHODS
    from quantize.runtimes.load import load
    from quantize.sources.models import load_model, meta_model, resolve_model

    method = RtnMethod(name="rtn", bits=4, group_size=64, per_module=[
        {"match": r"layers\.0\.self_attn\.", "bits": 8, "group_size": -1},
        {"match": r"mlp\.down_proj$", "bits": 4, "group_size": 32}])
    assert method.scheme_for("model.layers.0.self_attn.q_proj") == (8, -1)
    assert method.scheme_for("model.layers.1.mlp.down_proj") == (4, 32)
    assert method.scheme_for("model.layers.1.self_attn.q_proj") == (4, 64)
    info = METHODS["rtn"].build(method, resolve_model(str(tiny_model)), tmp_path, None)
    assert info["scheme"] == "mixed"
    groups = info["quantization_config"]["config_groups"]
    assert sorted((g["weights"]["num_bits"], g["weights"]["group_size"]) for g in groups.values()) == [
        (4, 32), (4, 64), (8, None)]
    expected_model = load_model(tiny_model, "float32")
    with torch.no_grad():
        for name, lin in expected_model.named_modules():
            if isinstance(lin, torch.nn.Linear) and ".layers." in name:
                bits, gs = method.scheme_for(name)
                scale, zero = grids.scale_zero(lin.weight.data, bits, True, gs)
                scale = grids.storable_scale(scale, torch.float16)
                lin.weight.data = grids.dequantize(grids.quantize(lin.weight.data, scale, zero, bits, True, gs),
                                                   scale, zero, gs)
        ids = torch.arange(3, 131)[None]
        model, loader, _ = load(tmp_path, "float32")
        assert (model(ids).logits - expected_model(ids).logits).abs().max() < 1e-4
    written = sum(weight_bytes(tmp_path).values())
    assert abs(expected_bytes(method, meta_model(tiny_model)) - written) <= 16 * 14  # weight_shape: 2 int64 each


def test_compressed_tensors_mix_fits_the_uniform_schemes_bytes(tiny_model, tmp_path, monkeypatch):
    """target compressed-tensors: a mix at the bytes of uniform RTN W4 g128 (computed from the table, checked here
    against the uniform artefact itself), built by RTN with per_module schemes and fp16 groups, reloaded by
    transformers, with q/k/v and gate/up each on one scheme (vLLM fuses them)."""
    from quantize.formats.tensors import weight_bytes

    monkeypatch.setenv("QUANTIZE_CACHE", str(tmp_path / "cache"))
    methods = [{"name": "rtn", "bits": 4, "group_size": 128},
               {"name": "auto", "target": "compressed-tensors", "quantizer": "rtn", "budget": {"scheme": "w4g128"}},
               {"name": "auto", "target": "compressed-tensors", "quantizer": "gptq", "budget": {"bpw": 9.0},
                "candidates": ["w4g128", "w8ch", "fp16"]}]
    run_tiny(tiny_model, tmp_path, methods)
    out = tmp_path / "out"
    uniform = sum(weight_bytes(out / "rtn-w4-sym-g128").values())
    results = json.loads((out / "results.json").read_text())
    for name in ("auto-ct-rtn-as-w4g128", "auto-ct-gptq-9bpw"):
        manifest = json.loads((out / name / "manifest.json").read_text())["result"]
        mix = json.loads((out / name / "mix.json").read_text())
        written = sum(weight_bytes(out / name).values())
        assert written == manifest["bytes"] <= manifest["budget"]["bytes_resolved"]
        assert results["variants"][name]["loader"].startswith("transformers")
        groups = json.loads((out / name / "config.json").read_text())["quantization_config"]["config_groups"]
        scheme_of = {t: (g["weights"]["num_bits"], g["weights"]["group_size"]) for g in groups.values()
                     for t in g["targets"]}
        for entry in mix["tensors"]:
            got = {scheme_of.get(m, "fp16") for m in entry["modules"]}
            assert len(got) == 1  # fused linears share one scheme
            want = "fp16" if entry["type"] == "fp16" else (int(entry["type"][1]), None if entry["type"].endswith(
                "ch") else int(entry["type"].split("g")[1]))
            assert got == {want}
    assert json.loads((out / "auto-ct-rtn-as-w4g128" / "manifest.json").read_text())["result"]["budget"][
        "bytes_resolved"] == uniform
