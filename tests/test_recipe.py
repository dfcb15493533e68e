"""Recipe validation: good recipes load, bad ones fail with the file, the key path and what is accepted."""

import time

import pytest
import yaml

from quantize.common.errors import QuantizeError
from quantize.sources.models import resolve_model
from quantize.recipe import bundled_recipes, load_recipe

GOOD = {"name": "r", "model": "bundled:smollm2-135m", "method": {"name": "int8", "scheme": "w8a16"}}


def write(tmp_path, data) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def error_of(path) -> str:
    with pytest.raises(QuantizeError) as exc:
        load_recipe(path)
    return str(exc.value)


def test_bundled_recipes_are_valid():
    assert bundled_recipes(), "no bundled recipes found"
    for path in bundled_recipes():
        recipe = load_recipe(path)
        assert recipe.methods


def test_defaults_filled_and_single_method_is_a_list(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert [m.default_variant() for m in recipe.methods] == ["int8-w8a16"]
    assert recipe.methods[0].ignore == ["lm_head"]
    assert str(recipe.output_dir) == "outputs/r"
    assert recipe.eval.perplexity.n_ctx == 512 and recipe.fit.kv_dtype == "f16"
    assert len(recipe.sha256()) == 64


def test_unknown_key_names_file_and_key_path(tmp_path):
    path = write(tmp_path, {**GOOD, "eval": {"perplexity": {"n_ctxx": 512}}})
    msg = error_of(path)
    assert path in msg and "eval.perplexity.n_ctxx: unknown key" in msg


def test_unknown_method_lists_accepted(tmp_path):
    msg = error_of(write(tmp_path, {**GOOD, "method": {"name": "gptqq"}}))
    assert "method: unknown method 'gptqq'; accepted: int8" in msg


def test_bad_scheme_lists_accepted(tmp_path):
    msg = error_of(write(tmp_path, {**GOOD, "method": {"name": "int8", "scheme": "w4a4"}}))
    assert "method.scheme" in msg and "'w8a16'" in msg and "'llm.int8'" in msg


def test_unknown_gpu_and_kv_dtype(tmp_path):
    msg = error_of(write(tmp_path, {**GOOD, "fit": {"gpus": ["RTX 9999"], "kv_dtype": "q5_9"}}))
    assert "fit.gpus" in msg and "RTX 9999" in msg and "RTX 4090" in msg
    assert "fit.kv_dtype" in msg and "q8_0" in msg


def test_not_a_mapping_and_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("- just\n- a list\n")
    assert "a recipe is a YAML mapping" in error_of(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("name: [unclosed\n")
    assert "not valid YAML" in error_of(tmp_path / "b.yaml")
    assert "no such recipe file" in error_of(tmp_path / "missing.yaml")


def test_duplicate_variants_rejected(tmp_path):
    data = {**GOOD}
    del data["method"]
    data["methods"] = [{"name": "int8"}, {"name": "int8"}]
    assert "variant names must be unique" in error_of(write(tmp_path, data))


def test_missing_model_path():
    with pytest.raises(QuantizeError, match="no such file or directory"):
        resolve_model("./no/such/model")
    with pytest.raises(QuantizeError, match="no such GGUF file"):
        resolve_model("missing.gguf")


def test_hub_id_offline_fails_fast_with_hint():
    start = time.time()
    with pytest.raises(QuantizeError, match=r"'someone/not-a-cached-model'.*HF_HUB_OFFLINE=1.*--set model=DIR"):
        resolve_model("someone/not-a-cached-model")
    assert time.time() - start < 20


def test_bad_gptq_device_and_forward_dtype_list_accepted(tmp_path):
    msg = error_of(write(tmp_path, {**GOOD, "method": {"name": "gptq", "device": "gpu"}}))
    assert "recipe.yaml" in msg and "method.device" in msg and "accepted: auto, cpu, cuda, cuda:N" in msg
    msg = error_of(write(tmp_path, {**GOOD, "method": {"name": "gptq", "forward_dtype": "float16"}}))
    assert "method.forward_dtype" in msg and "float32" in msg and "bfloat16" in msg


def test_hub_errors_say_what_to_do():
    """Each cause of a failed hub fetch (the hub client's own error types) becomes advice, not a class name."""
    import httpx2
    from huggingface_hub import errors

    from quantize.sources.models import hub_error

    def response(code):
        return httpx2.Response(code, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/m"))

    gated = str(hub_error("org/m", None, errors.GatedRepoError("403", response=response(403))))
    assert "gated" in gated and "https://huggingface.co/org/m" in gated and "HF_TOKEN" in gated
    missing = str(hub_error("org/m", "abc", errors.RevisionNotFoundError("404", response=response(404))))
    assert "no revision 'abc'" in missing and "`revision:`" in missing
    unknown = str(hub_error("org/m", None, errors.RepositoryNotFoundError("404", response=response(404))))
    assert "no such repository" in unknown
    for message in (gated, missing, unknown):
        assert "Error" not in message


def test_set_overrides_are_validated_and_recorded(tmp_path):
    from quantize.recipe import load_recipe

    path = write(tmp_path, {**GOOD, "method": {"name": "rtn", "bits": 4, "group_size": 64}})
    r = load_recipe(path, ["model=/some/dir", "eval.perplexity.max_chunks=8", "method.bits=3",
                           "fit.contexts=[1024, 2048]", "calibration.seed=7"])
    assert (r.model, r.eval.perplexity.max_chunks, r.methods[0].bits, r.fit.contexts, r.calibration.seed) == (
        "/some/dir", 8, 3, [1024, 2048], 7)
    assert r.resolved()["overrides"][0] == "model=/some/dir"
    for bad, expected in [(["eval.perplexity.max_chunk=8"], "eval.perplexity.max_chunk: unknown key"),
                          (["method.bits=5"], "method.bits: got 5"), (["methods.3.bits=4"], "needs an index 0..0"),
                          (["model"], "expected KEY=VALUE"), (["name.x=1"], "`name` is a value, not a mapping")]:
        with pytest.raises(QuantizeError) as err:
            load_recipe(path, bad)
        assert expected in str(err.value) and "--set" in str(err.value), (bad, str(err.value))
