"""LiteRT (TensorFlow Lite) artefacts made and scored by LiteRT's own tools in the managed `litert` environment
(`quantize engine install litert`, which .ci/run does): litert-torch's export, ai-edge-quantizer holding our codes,
ai-edge-litert's interpreter. Skipped where the engine is not installed; the recipe checks run everywhere."""

import json

import numpy as np
import pytest
import torch

from quantize.runtimes import engines

needs_engine = pytest.mark.skipif(not engines.installed("litert"),
                                  reason="the LiteRT engine is not installed: quantize engine install litert")


@pytest.mark.fast
@pytest.mark.parametrize("settings, message", [
    ({"sym": False}, "symmetric grids only"),
    ({"group_size": 128, "bits": 8}, "8-bit weights per output channel"),
    ({"bits": 3, "group_size": 32}, r"bits 4 \(blockwise\) or 8"),
    ({"litert_compute": "float"}, "8-bit per-channel weights"),
    ({"format": "compressed-tensors", "litert_compute": "float"}, "a setting of format 'litert'"),
    ({"on_indivisible": "channel"}, "one block size per file"),
])
def test_recipe_refuses_what_litert_cannot_hold(settings, message):
    from pydantic import ValidationError

    from quantize.methods.configs import GptqMethod

    with pytest.raises(ValidationError, match=message):
        GptqMethod.model_validate({"name": "gptq", "group_size": 32, "format": "litert", **settings})


@pytest.mark.fast
def test_expected_bytes_count_litert_layouts(tiny_model):
    """The plan's size of a LiteRT file: int4 codes + an fp16 scale per block of 32 for the decoder's linears and
    float32 for the rest (lm_head and embedding included), or LiteRT's own recipe's int4 embedding table."""
    from quantize.fit.footprint import expected_bytes
    from quantize.methods.configs import LitertMethod, RtnMethod
    from quantize.sources.models import meta_model

    meta = meta_model(tiny_model)
    linears = sum(m.weight.numel() for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n)
    rest = sum(p.numel() for p in meta.parameters()) - linears
    ours = expected_bytes(RtnMethod(name="rtn", group_size=32, format="litert"), meta)
    assert ours == linears // 2 + linears // 32 * 2 + rest * 4
    theirs = expected_bytes(LitertMethod(name="litert"), meta)
    assert theirs < ours  # the embedding table and lm_head at 4 bits too


@pytest.fixture(scope="module")
def tiny_litert(tiny_model, tmp_path_factory):
    """The tiny Llama's float export (a LiteRT folder: model.tflite + config.json), and RTN int4 g32 and GPTQ int8
    per channel (float compute) as `format: litert` artefacts, each with the model the method left in process."""
    from quantize.formats import litert as litert_format
    from quantize.methods.configs import GptqMethod, RtnMethod
    from quantize.methods.registry import METHODS
    from quantize.runtimes import litert
    from quantize.sources.models import resolve_model

    base = resolve_model(str(tiny_model))
    out = {"float": tmp_path_factory.mktemp("litert-float")}
    dense = out["float"] / "dense"
    litert_format.dense_checkpoint(tiny_model, dense)
    litert.export(dense, out["float"], tiny_model)
    (out["float"] / "config.json").write_text((dense / "config.json").read_text())
    calib = torch.randint(3, 500, (8, 128), generator=torch.Generator().manual_seed(0))
    for name, method in {"rtn-int4": RtnMethod(name="rtn", group_size=32, format="litert"),
                         "gptq-int8-float": GptqMethod(name="gptq", bits=8, group_size=-1, format="litert",
                                                       litert_compute="float")}.items():
        out[name] = tmp_path_factory.mktemp(name)
        keep = {}
        info = METHODS[method.name].build(method, base, out[name], calib if method.needs_calibration else None,
                                          keep=keep)
        out[name + ":info"], out[name + ":keep"] = info, keep
    return out


def torch_logprobs(model_dir, ids: torch.Tensor, state: dict | None = None) -> np.ndarray:
    """float32 log-probabilities of the tiny model, with `state` (the method's in-process layers) loaded over it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state:
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        assert not unexpected
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits.double(), -1).float().numpy()


def litert_logprobs(folder, ids: torch.Tensor) -> np.ndarray:
    from quantize.runtimes.litert import LiteRTModel

    return np.stack([rows.numpy() for _, rows in LiteRTModel(folder).chunk_logits(ids)])


IDS = torch.randint(3, 500, (2, 96), generator=torch.Generator().manual_seed(1))


@needs_engine
def test_float_file_scores_as_torch(tiny_litert, tiny_model):
    """litert-torch's float export, teacher-forced through the decode signature: torch's log-probabilities to 1e-3."""
    diff = np.abs(litert_logprobs(tiny_litert["float"], IDS) - torch_logprobs(tiny_model, IDS)).max()
    print(f"float file: max |Δ log p| {diff:.2e}")
    assert diff <= 1e-3


@needs_engine
def test_int8_float_compute_equals_our_evaluation_of_the_same_codes(tiny_litert, tiny_model):
    """GPTQ int8 codes in LiteRT's INT8 layout with the weights dequantized in the graph: LiteRT's log-probabilities
    equal torch's with the layers GPTQ left (codes × scales) to 1e-3; every linear read back equal."""
    info = tiny_litert["gptq-int8-float:info"]["litert"]
    assert info["read_back_equal"] == info["linears"] == 14 and "DEQUANTIZE" in info["activations"]
    ours = torch_logprobs(tiny_model, IDS, tiny_litert["gptq-int8-float:keep"])
    diff = np.abs(litert_logprobs(tiny_litert["gptq-int8-float"], IDS) - ours).max()
    print(f"GPTQ int8, float compute: max |Δ log p| against our evaluation {diff:.2e}")
    assert diff <= 1e-3


@needs_engine
def test_int4_file_holds_our_codes_and_scores_near_our_evaluation(tiny_litert, tiny_model):
    """RTN int4 g32 in LiteRT's blockwise INT4: every linear read back from the written file equal to ours, no
    checkpoint left beside it; on LiteRT's dynamic-range kernels (int8 activations) the distributions differ from
    our float evaluation of the same codes by far less than the codes differ from the base."""
    folder, info = tiny_litert["rtn-int4"], tiny_litert["rtn-int4:info"]
    assert info["format"] == "litert" and info["quantization_config"] is None
    assert info["litert"]["read_back_equal"] == info["litert"]["linears"] == 14
    assert info["litert"]["weights"] == "our codes: INT4 blocks of 32, float16 scales"
    assert not list(folder.glob("*.safetensors")) and "quantization_config" not in json.loads(
        (folder / "config.json").read_text())
    base = torch_logprobs(tiny_model, IDS)
    ours = torch_logprobs(tiny_model, IDS, tiny_litert["rtn-int4:keep"])
    theirs = litert_logprobs(folder, IDS)
    kl = lambda p, q: float((np.exp(p) * (p - q)).sum(-1).mean())  # noqa: E731
    print(f"KL(base ‖ ours) {kl(base, ours):.3e}, KL(ours ‖ LiteRT) {kl(ours, theirs):.3e}")
    assert kl(ours, theirs) < 0.25 * kl(base, ours)


@needs_engine
def test_codes_that_are_not_the_exported_weights_are_refused(tiny_litert, tmp_path):
    """The worker finds each exported weight among our codes by its bytes: a codes file one code off leaves that
    linear unmatched, and the build refuses it rather than write a file that is not ours."""
    from safetensors.numpy import load_file, save_file

    from quantize.formats import litert as litert_format
    from quantize.runtimes import litert

    from quantize.methods import rtn
    from quantize.methods.configs import RtnMethod
    from quantize.methods.weight_only import build_streamed
    from quantize.sources.models import resolve_model

    # RTN g32 sym as compressed-tensors with bfloat16-valued scales (ai-edge-quantizer stores scales as bfloat16
    # values: with the float32 scales of a float32 base, none of the 14 linears reads back equal)
    dense, source = tiny_litert["float"] / "dense", tmp_path / "ct"
    source.mkdir()
    method = RtnMethod(name="rtn", group_size=32)
    build_streamed(method, resolve_model(str(dense)), source, None, rtn.solver(method, torch.bfloat16))
    info = litert_format.dense_and_codes(source, tmp_path / "dense", tmp_path / "codes.safetensors")
    codes = load_file(str(tmp_path / "codes.safetensors"))
    name = "model.layers.1.mlp.down_proj.codes"
    codes[name][0, 0] = 0 if codes[name][0, 0] != 0 else 1
    save_file(codes, str(tmp_path / "codes.safetensors"))
    litert.export(tmp_path / "dense", tmp_path / "float", source)
    answer = litert.run_worker({"action": "quantize", "model": str(tmp_path / "float" / "model.tflite"),
                                "codes": str(tmp_path / "codes.safetensors"), "bits": info["bits"],
                                "out": str(tmp_path / "model.tflite")}, "test")
    assert answer["missing"] == ["model.layers.1.mlp.down_proj"] and answer["check"]["equal"] == 13


@needs_engine
def test_run_compares_litert_baseline_with_our_codes(tiny_model, tmp_path):
    """`quantize run` with LiteRT's own recipe (on the decoder's linears, as ours) and our RTN codes in the same
    LiteRT layout: both built, reloaded on LiteRT's interpreter and scored against the same base; the report shows
    each file's memory on the device instead of a GPU fit; the serve check runs the .litertlm on LiteRT-LM; `plan`
    predicted each file's constant bytes within 2 %."""
    from conftest import write_recipe
    from quantize import pipeline, preflight
    from quantize.recipe import load_recipe

    methods = [{"name": "litert", "recipe": "dynamic_wi4b32_afp32", "linears_only": True},
               {"name": "rtn", "bits": 4, "group_size": 32, "format": "litert"}]
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), methods, tmp_path / "out",
                                      eval={"perplexity": {"source": "bundled:wiki", "n_ctx": 128, "max_chunks": 2},
                                            "speed": {"prompt_tokens": 16, "gen_tokens": 4, "repetitions": 2,
                                                      "threads": [1]},
                                            "serve": {"enabled": True}}))
    planned = preflight.plan(recipe)["variants"]
    out = pipeline.run(recipe)
    results = json.loads((out / "results.json").read_text())
    for name in ("litert-dynamic_wi4b32_afp32-linears", "rtn-w4-sym-g32-litert"):
        v = results["variants"][name]
        assert v["format"] == "litert" and v["loader"].startswith("LiteRT") and v["eval_dtype"] == "litert"
        assert 0 < v["perplexity"]["kld"]["mean"] < 0.5
        # no OpenAI server: the .litertlm bundle answered on LiteRT-LM's engine (a random tiny model may answer
        # with its end token at once: empty, but loaded and run)
        assert (out / name / "model.litertlm").is_file()
        assert v["serve"]["status"] in ("generated", "empty") and v["serve"]["answer_s"] > 0, v["serve"]
        built = sum(v["fit"]["weight_bytes_by_dtype"].values())
        assert abs(planned[name]["expected_bytes"] - built) / built < 0.02, (name, planned[name]["expected_bytes"], built)
        assert v["fit"]["on_device"]["kv_cache_bytes"] == planned[name]["fit"]["on_device"]["kv_cache_bytes"]
        assert "ms per token" in v["speed"]["skipped"]  # the decode rate LiteRT's scoring measured, no bench
    report = (out / "report.md").read_text()
    assert "LiteRT files on the device (no GPU fit): **litert-dynamic_wi4b32_afp32-linears**" in report
    assert "Not in the table: " in report and "rtn-w4-sym-g32-litert: LiteRT: no llama-bench run" in report
