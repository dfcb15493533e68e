"""`quantize plan` (and the first step of `quantize run`) catch what would fail later, from the config alone, in
seconds, naming the recipe key."""

import json
import shutil

import pytest

from conftest import build_tiny_llama, write_recipe
from test_cli import quantize


def edited_copy(tiny_model, folder, **config):
    shutil.copytree(tiny_model, folder)
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, **config}))
    return folder


CASES = {
    "group size": ({"name": "gptq", "bits": 4, "group_size": 128}, "not divisible by group_size 128"),
    "model type": ({"name": "awq", "bits": 4, "group_size": 64}, "model type 'qwen2_moe' has no row"),
    "rope type": ({"name": "gguf", "type": "Q8_0"}, "rope type 'yarn' is not supported"),
    # llama.cpp refuses IQ2 types without an importance matrix: said at plan time, from the config alone
    "imatrix off": ({"name": "gguf", "type": "IQ2_XS", "imatrix": False}, "without an importance matrix"),
    "dense MXFP4_MOE": ({"name": "gguf", "type": "MXFP4_MOE"}, "has no experts"),
    # a GPU budget whose KV cache (every type, for kv_dtype auto) leaves the weights nothing: said before any work
    "gpu budget": ({"name": "auto", "budget": {"gpu": "RTX 3060", "context": 1024, "batch": 100000,
                                               "kv_dtype": "auto"}}, "no KV cache type leaves room for the weights"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_fails_early_naming_the_key(case, tiny_model, tmp_path):
    method, expected = CASES[case]
    if case == "group size":
        model = build_tiny_llama(tmp_path / "m", hidden_size=192)  # 192 input columns: no g128 groups
    elif case == "model type":
        model = edited_copy(tiny_model, tmp_path / "m", model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"])
    elif case in ("imatrix off", "dense MXFP4_MOE", "gpu budget"):
        model = tiny_model
    else:
        model = edited_copy(tiny_model, tmp_path / "m", rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "rope_theta": 10000.0})
    write_recipe(tmp_path / "r.yaml", str(model), [method, {"name": "int8"}], tmp_path / "out")
    r = quantize("plan", "r.yaml", cwd=tmp_path)
    print(f"{case}: {r.stderr.strip()}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "key `methods[0]`" in r.stderr and expected in r.stderr


def test_run_fails_before_evaluating_the_base(tiny_model, tmp_path):
    """The same checks open `quantize run`: the base model is not evaluated and nothing is written."""
    model = build_tiny_llama(tmp_path / "m", hidden_size=192)
    write_recipe(tmp_path / "r.yaml", str(model), [{"name": "rtn", "bits": 4, "group_size": 128}], tmp_path / "out")
    r = quantize("run", "r.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "key `method`" in r.stderr and "not divisible by group_size 128" in r.stderr
    assert "base model:" not in r.stderr and not (tmp_path / "out").exists()


def test_memory_check_names_the_step_that_does_not_fit(tiny_model, tmp_path, monkeypatch):
    """The estimated peaks (fit/build_memory.py) against what the machine can give; here the machine is made
    small by replacing its /proc/meminfo reading, the one thing this test controls."""
    from quantize import preflight
    from quantize.common.errors import QuantizeError
    from quantize.fit import build_memory
    from quantize.measure import memory
    from quantize.recipe import load_recipe
    from quantize.sources.models import meta_model

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model),
                                      [{"name": "int8"}, {"name": "gptq", "bits": 4, "group_size": 64}],
                                      tmp_path / "out", calibration={"samples": 64, "seq_len": 512}))
    meta = meta_model(tiny_model)
    need = preflight.memory_needed(recipe, meta)
    assert set(need) == {"methods[0]", "methods[1]", "eval.dtype"}
    # the GPTQ build holds 64 × 512 tokens of activations: at least (2 × hidden + MLP width) floats each
    assert need["methods[1]"] - build_memory.PROCESS_BYTES >= 64 * 512 * (2 * 256 + 512) * 4
    preflight.check_memory(recipe, meta)  # this machine has room
    monkeypatch.setattr(memory, "available_bytes", lambda: need["methods[1]"] - 1)
    with pytest.raises(QuantizeError, match=r"key `methods\[1\]`: needs about .*calibration\.samples"):
        preflight.check_memory(recipe, meta)


def test_streamed_evaluation_is_estimated_per_layer_not_per_model(tiny_model, tmp_path, monkeypatch):
    """Under eval.stream the evaluation's estimate is the stream's (one layer or the head at a time plus every
    chunk's hidden states), so a model bigger than memory passes the check; its chunk count moves it."""
    from quantize import preflight
    from quantize.common.errors import QuantizeError
    from quantize.fit import build_memory
    from quantize.fit.shape import shape_from_config
    from quantize.measure import memory
    from quantize.recipe import load_recipe
    from quantize.sources.models import meta_model

    def need(stream: bool, chunks: int) -> dict:
        recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), [{"name": "rtn", "bits": 4}],
                                          tmp_path / "out", eval={"stream": stream,
                                                                  "perplexity": {"max_chunks": chunks}}))
        return recipe, preflight.memory_needed(recipe, meta)

    meta = meta_model(tiny_model)
    shape = shape_from_config(meta.config.to_dict())
    _, whole = need(False, 4)
    recipe, streamed = need(True, 4)
    assert "eval.dtype" in whole and set(streamed) == {"method", "eval.stream"}
    layer = build_memory.layer_params(shape) + 2 * shape.hidden_size  # its linears and its two norms
    assert streamed["eval.stream"] == build_memory.PROCESS_BYTES + build_memory.stream_eval_bytes(shape, 4, 512, layer)
    # 60 more chunks: their hidden states (3 × n_ctx × hidden floats each), and a batch of 8 chunks' MLP, not 4
    more = 3 * 60 * 512 * shape.hidden_size * 4 + 3 * 4 * 512 * shape.intermediate_size * 4
    assert need(True, 64)[1]["eval.stream"] - streamed["eval.stream"] == more
    # the chunks the run actually cut replace max_chunks
    assert preflight.memory_needed(recipe, meta, 64)["eval.stream"] == need(True, 64)[1]["eval.stream"]
    monkeypatch.setattr(memory, "available_bytes", lambda: streamed["eval.stream"] - 1)
    with pytest.raises(QuantizeError, match=r"key `eval.stream`: needs about .*max_chunks"):
        preflight.check_memory(recipe, meta)


def test_engine_checks_are_refused_before_any_work_when_they_cannot_run(tiny_model, tmp_path, monkeypatch):
    """eval.engines names an engine this machine lacks (an empty cache folder): plan and run say how to install it;
    eval.engines without the base store (kld: false) is a recipe error naming the key."""
    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model), [{"name": "int8"}], tmp_path / "out")
    data = json.loads(recipe.read_text())
    data["eval"]["engines"] = ["vllm"]
    recipe.write_text(json.dumps(data))
    monkeypatch.setenv("QUANTIZE_CACHE", str(tmp_path / "empty-cache"))
    for command in ("plan", "run"):
        r = quantize(command, "r.yaml", cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "key `eval.engines`: vllm is not installed here; `quantize engine install vllm`" in r.stderr
    assert not (tmp_path / "out").exists()
    data["eval"]["kld"] = False
    recipe.write_text(json.dumps(data))
    r = quantize("plan", "r.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "eval" in r.stderr and "needs the base store" in r.stderr, r.stderr
