"""MLX export (format: mlx): mlx-lm's affine layout written from our integer codes, loaded by real mlx-lm on MLX's
CPU backend, its logits compared with transformers running the compressed-tensors artefact of the same codes."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tiny_llama, write_recipe
from quantize import pipeline
from quantize.common.errors import QuantizeError
from quantize.formats import mlx as mlx_format
from quantize.recipe import load_recipe
from quantize.runtimes.load import detect, load
from quantize.sources.models import load_model

pytest.importorskip("mlx_lm")
mx = pytest.importorskip("mlx.core")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
FAMILIES = {  # (model_type, config overrides), as tests/test_families.py builds them
    "llama": ("llama", {}),
    "llama3.1": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 64}),
    "gemma3_text": ("gemma3_text", {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 128,
                                    "num_hidden_layers": 6}),
    "phi3": ("phi3", {"pad_token_id": 0}),
    # tied embeddings, as every Gemma 2 (mlx-lm's Gemma 2 has no lm_head of its own)
    "gemma2": ("gemma2", {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 128, "num_hidden_layers": 4,
                          "tie_word_embeddings": True}),
}
TOLERANCE = 1e-4  # max |Δlogit| between mlx-lm and transformers on the same codes, fp32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_is_mx_quantize_packing(bits):
    """Our bit stream equals what MLX's own mx.quantize packs for the same codes, and unpack inverts it."""
    w = np.random.default_rng(bits).standard_normal((16, 256)).astype(np.float32)
    packed, scales, biases = mx.quantize(mx.array(w), group_size=64, bits=bits)
    deq = np.array(mx.dequantize(packed, scales, biases, group_size=64, bits=bits))
    codes = np.rint((deq - np.repeat(np.array(biases), 64, 1)) / np.repeat(np.array(scales), 64, 1))
    codes = torch.from_numpy(codes.astype(np.int64))
    ours = mlx_format.pack(codes, bits)
    assert ours.dtype == torch.uint32 and tuple(ours.shape) == tuple(packed.shape)
    assert np.array_equal(ours.numpy(), np.array(packed))
    assert torch.equal(mlx_format.unpack(ours, bits, 256), codes)


def _same_codes_model(ct_folder, base_folder):
    """transformers on the compressed-tensors artefact (its linears decompressed by compressed-tensors), with the
    unquantized tensors (embeddings, norms, lm_head) taken from the fp32 base, as the MLX artefact stores them."""
    model, *_ = load(ct_folder, "float32")
    dense = load_model(base_folder, "float32").state_dict()
    packed = {n.removesuffix(".weight_packed") for n in json.loads(
        (ct_folder / "model.safetensors.index.json").read_text())["weight_map"] if n.endswith(".weight_packed")}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in dense and name.removesuffix(".weight") not in packed:
                p.copy_(dense[name])
    return model


def _rewrite_packing(folder, repack):
    """Rewrite every packed weight of an MLX folder with `repack(codes, bits)`: a negative control."""
    config = json.loads((folder / "config.json").read_text())
    bits = config["quantization"]["bits"]
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        for name in [n for n in tensors if n.endswith(".scales")]:
            weight = name.removesuffix(".scales") + ".weight"
            cols = tensors[weight].shape[1] * 32 // bits
            tensors[weight] = repack(mlx_format.unpack(tensors[weight], bits, cols), bits)
        save_file(tensors, shard, metadata={"format": "mlx"})


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, tmp_path_factory):
    """One fp32 tiny model per family, RTN W4 g64 sym and asym, each as compressed-tensors and as MLX."""
    model_type, overrides = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param.replace(".", "_"))
    base = build_tiny_llama(root / "base", model_type=model_type, dtype="float32", **overrides)
    methods = [{"name": "rtn", "bits": 4, "group_size": 64, "sym": sym, "format": fmt}
               for sym in (True, False) for fmt in ("compressed-tensors", "mlx")]
    out = root / "run"
    recipe = load_recipe(write_recipe(root / "r.yaml", str(base), methods, out,
                                      eval={"perplexity": {"n_ctx": 128, "max_chunks": 2}, "speed": {"enabled": False}}))
    pipeline.run(recipe)
    return request.param, base, out


def test_mlx_logits_match_transformers_on_the_same_codes(family_run, tmp_path):
    family, base, out = family_run
    ids = list(range(3, 131))
    for grid in ("sym", "asym"):
        mlx_folder = out / f"rtn-w4-{grid}-g64-mlx"
        assert detect(mlx_folder) == "mlx"
        with torch.no_grad():
            expected = _same_codes_model(out / f"rtn-w4-{grid}-g64", base)(torch.tensor([ids])).logits[0]
        model, loader, dtype = load(mlx_folder)
        assert loader.startswith("mlx-lm") and dtype == "mlx-float32"
        got = model.logits(ids)
        diff = (got - expected).abs().max().item()
        print(f"{family} {grid}: mlx-lm vs transformers (compressed-tensors), same codes, fp32: max |Δlogit| "
              f"{diff:.3g} (logits up to {expected.abs().max():.3g})")
        assert diff <= TOLERANCE
    # negative control: codes packed most-significant first within each word; the same check sees it
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in mlx_folder.iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    per_word = 32 // 4
    _rewrite_packing(wrong, lambda q, bits: mlx_format.pack(q.reshape(q.shape[0], -1, per_word).flip(-1)
                                                            .reshape(q.shape), bits))
    model, *_ = load(wrong)
    bad = (model.logits(ids) - expected).abs().max().item()
    print(f"{family}: wrong packing: max |Δlogit| {bad:.3g}")
    assert bad > 100 * TOLERANCE


def test_mlx_in_a_run(family_run):
    """The run evaluates the MLX variants on mlx-lm: the same codes, so the same KLD as compressed-tensors to the
    float error of an fp16-stored vs fp32-stored embedding and norms; `quantize eval` gives the run's numbers."""
    family, base, out = family_run
    variants = json.loads((out / "results.json").read_text())["variants"]
    for grid in ("sym", "asym"):
        ct, mlx = variants[f"rtn-w4-{grid}-g64"], variants[f"rtn-w4-{grid}-g64-mlx"]
        assert mlx["format"] == "mlx" and mlx["loader"].startswith("mlx-lm")
        assert mlx["perplexity"]["kld"]["mean"] == pytest.approx(ct["perplexity"]["kld"]["mean"], rel=0.01)
    config = json.loads((out / "rtn-w4-sym-g64-mlx" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert "quantization_config" not in config  # transformers would take the folder for its own format
    if family == "llama":  # `quantize eval` of an MLX folder: mlx-lm again, the run's base file, the same numbers
        from quantize.measure import scorecard

        res = scorecard.evaluate_artefact(out / "rtn-w4-sym-g64-mlx", str(base),
                                          load_recipe(out / "recipe.yaml").eval)
        assert res["format"] == "mlx" and res["loader"].startswith("mlx-lm")
        assert res["perplexity"] == variants["rtn-w4-sym-g64-mlx"]["perplexity"]


@pytest.mark.parametrize("method, message", [
    ({"name": "gptq", "group_size": -1, "format": "mlx"}, "format 'mlx' takes group_size 32, 64, 128"),
    ({"name": "rtn", "group_size": 256, "format": "mlx"}, "format 'mlx' takes group_size 32, 64, 128"),
    ({"name": "awq", "group_size": 128, "format": "mlx", "on_indivisible": "channel"}, "per-channel fallback"),
])
def test_mlx_refuses_what_it_cannot_hold(tmp_path, method, message):
    with pytest.raises(QuantizeError, match=message):
        load_recipe(write_recipe(tmp_path / "r.yaml", "bundled:smollm2-135m", [method], tmp_path / "out"))


def test_gptq_and_awq_as_mlx(tiny_model, tmp_path):
    """GPTQ (act_order's static groups too) and AWQ write MLX from the same codes as their compressed-tensors
    artefacts: the same KLD on the fp16 tiny Llama, to the rounding of MLX's fp16 biases (−scale·zero)."""
    methods = [{"name": "gptq", "bits": 4, "group_size": 64, "act_order": True, "format": fmt}
               for fmt in ("compressed-tensors", "mlx")]
    methods += [{"name": "awq", "bits": 4, "group_size": 64, "format": fmt} for fmt in ("compressed-tensors", "mlx")]
    out = tmp_path / "run"
    pipeline.run(load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), methods, out,
                                          calibration={"samples": 8, "seq_len": 64},
                                          eval={"perplexity": {"n_ctx": 128, "max_chunks": 2},
                                                "speed": {"prompt_tokens": 16, "gen_tokens": 4, "repetitions": 2,
                                                          "threads": [1]}})))
    variants = json.loads((out / "results.json").read_text())["variants"]
    for name in ("gptq-w4-sym-g64", "awq-w4-asym-g64"):
        ct, mlx = variants[name], variants[name + "-mlx"]
        print(f"{name}: KLD compressed-tensors {ct['perplexity']['kld']['mean']:.6f}, MLX "
              f"{mlx['perplexity']['kld']['mean']:.6f}; MLX tg {mlx['speed']['rows'][0]['tg']['median']:.1f} tok/s")
        assert mlx["perplexity"]["kld"]["mean"] == pytest.approx(ct["perplexity"]["kld"]["mean"], rel=0.02)
        assert mlx["speed"]["backend"] == "mlx" and mlx["speed"]["rows"][0]["tg"]["median"] > 0
        ct_log = (out / name / "quantize-log.jsonl").read_text()
        assert (out / (name + "-mlx") / "quantize-log.jsonl").read_text() == ct_log  # the same solve, row for row



def test_a_folder_from_mlx_lm_convert_is_mlx(tmp_path):
    """mlx_lm.convert writes its `quantization` entry twice, also as a `quantization_config` without quant_method."""
    entry = {"group_size": 64, "bits": 4, "mode": "affine"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization": entry,
                                                       "quantization_config": entry}))
    assert detect(tmp_path) == "mlx"
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    assert detect(tmp_path) == "gptq"
