"""W8A8-INT8 (int8 scheme w8a8), FP8 (method fp8) and NVFP4 (method fp4): SmoothQuant's fold, each artefact's
layout as compressed-tensors and transformers reload it, our evaluation's activation-quantized forward against
kernel references written from their definitions, and a run with them side by side. vLLM's own kernels on the same
artefacts: tests/test_vllm.py."""

import json

import pytest
import torch

from conftest import build_outlier_llama, build_tiny_llama
from quantize.methods.configs import Int8Method
from quantize.methods.registry import METHODS
from quantize.sources.models import load_model, resolve_model


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    return build_outlier_llama(tmp_path_factory.mktemp("outliers") / "tiny-outliers")


def transformers_reload(folder):
    """The artefact through transformers and compressed-tensors, its weights decompressed (on the first forward)."""
    model = load_model(folder, "float32")
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long))
    return model


def calibration(n=16, seq=128, seed=0):
    return torch.randint(3, 512, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def artefacts(outlier_model, tmp_path_factory):
    base = resolve_model(str(outlier_model))
    out = {}
    for name, method in {"sq-gptq": Int8Method(name="int8", scheme="w8a8", forward_dtype="float32"),
                         "rtn": Int8Method(name="int8", scheme="w8a8", weights="rtn", smoothing_strength=None)}.items():
        folder = tmp_path_factory.mktemp(name)
        out[name] = (folder, METHODS["int8"].build(method, base, folder, calibration()))
    return out


def test_smoothquant_fold_leaves_the_fp32_logits_unchanged(outlier_model):
    from quantize.methods.engine import awq_rows, stream_layers
    from quantize.methods.smoothquant import smooth_layer
    from quantize.sources.architectures import ARCHITECTURES

    arch, smoothed, log = ARCHITECTURES["llama"], {}, []

    def process(i, layer, acts):
        log.extend(smooth_layer(layer, acts, awq_rows(arch, layer), 0.8))

    for i, layer in stream_layers(outlier_model, calibration(4, 64), process):
        smoothed.update({f"model.layers.{i}.{k}": v.clone() for k, v in layer.state_dict().items()})
    model = load_model(outlier_model, "float32")
    ids = calibration(2, 96, seed=1)
    with torch.no_grad():
        before = model(ids).logits
        model.load_state_dict(smoothed, strict=False)
        after = model(ids).logits
    diff = (after - before).abs().max().item()
    print(f"max |Δlogit| after SmoothQuant's fold: {diff:.3g}; largest input channel "
          f"{[round(r['act_max_before'], 2) for r in log]} → {[round(r['act_max_after'], 2) for r in log]}")
    assert [r["norm"] for r in log] == ["input_layernorm", "post_attention_layernorm"] * 2  # norms only
    assert all(r["act_max_after"] < r["act_max_before"] / 3 for r in log)  # the outliers really moved
    assert diff <= 1e-5


def test_w8a8_artefact_is_int_quantized_and_transformers_reloads_it(artefacts):
    """On disk as llm-compressor writes W8A8 (int8 codes in `weight`, per-channel `weight_scale`, dynamic per-token
    int8 input_activations); compressed-tensors' own decompression (transformers) gives the weights our evaluation
    dequantizes."""
    from safetensors import safe_open

    from quantize.formats.compressed_tensors import DequantizedShards

    folder, info = artefacts["sq-gptq"]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == group["format"] == "int-quantized" and qc["ignore"] == ["lm_head"]
    assert group["weights"] | {"observer": None} == group["weights"] | {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False, "observer": None}
    assert {k: group["input_activations"][k] for k in ("num_bits", "type", "symmetric", "strategy", "dynamic")} == {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    assert info["smoothed_norms"] == 4 and info["quantized_linears"] == 14
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj"
    with safe_open(folder / index[name + ".weight"], "pt") as f:
        assert f.get_tensor(name + ".weight").dtype == torch.int8
        assert f.get_tensor(name + ".weight_scale").shape == (256, 1)

    reloaded = transformers_reload(folder)
    ours = DequantizedShards(folder)
    for n in (name, "model.layers.0.self_attn.q_proj"):
        assert torch.equal(reloaded.get_submodule(n).weight.data, ours.get(n + ".weight"))


def test_activation_quantized_forward_equals_the_integer_kernel(artefacts):
    """Each linear of our evaluation's model (runtimes/load.py → kernels.py), on the inputs it really gets, against
    a reference written from the kernel's definition and the artefact's stored tensors: per-token int8 codes of the
    input, an exact integer dot product with the stored int8 weight codes (int64 here), times both scales."""
    from safetensors import safe_open

    from quantize.runtimes import load as loader
    from quantize.runtimes.kernels import InputQuantizedLinear

    folder, _ = artefacts["sq-gptq"]
    ours, description, _ = loader.load(folder, "float32")
    assert "W8A8 kernel reference" in description and "14 linears" in description
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]

    def stored(name):
        with safe_open(folder / index[name], "pt") as f:
            return f.get_tensor(name)

    seen = {}
    linears = {n: m for n, m in ours.named_modules() if isinstance(m, InputQuantizedLinear)}
    hooks = [m.register_forward_hook((lambda n: lambda mod, inp, out: seen.__setitem__(n, (inp[0], out)))(n))
             for n, m in linears.items()]
    with torch.no_grad():
        ours(calibration(2, 64, seed=2))
    for h in hooks:
        h.remove()
    assert len(seen) == 14 and not isinstance(ours.lm_head, InputQuantizedLinear)
    worst = 0.0
    for name, (x, y) in seen.items():
        q_w, s_w = stored(name + ".weight").long(), stored(name + ".weight_scale").double()  # [out, in], [out, 1]
        s_x = x.abs().amax(-1, keepdim=True) / 127
        q_x = torch.clamp(torch.round(x * (1 / s_x)), -128, 127).long()
        expected = (q_x @ q_w.T).double() * s_x.double() * s_w.T
        worst = max(worst, ((y.double() - expected).abs().max() / expected.abs().max()).item())
    print(f"largest |Δ| of a linear's output, ours vs the integer kernel, relative to its largest output: {worst:.3g}")
    assert worst <= 1e-6


def test_smoothquant_lowers_the_w8a8_error_on_outlier_channels(artefacts, outlier_model):
    """Same model, same tokens: with SmoothQuant + GPTQ the W8A8 model's KLD to the fp32 base is below plain RTN
    W8A8's (the per-token grid of an input with 30× channels wastes most of its levels)."""
    from quantize.measure.quality import kl_divergence
    from quantize.runtimes import load as loader

    ids = calibration(4, 128, seed=3)
    base = load_model(outlier_model, "float32")
    with torch.no_grad():
        ref = torch.log_softmax(base(ids).logits, -1).reshape(-1, 512)
        klds = {}
        for name, (folder, _) in artefacts.items():
            model, _, _ = loader.load(folder, "float32")
            klds[name] = kl_divergence(ref, torch.log_softmax(model(ids).logits, -1).reshape(-1, 512)).mean().item()
    print("KLD to the base:", {k: f"{v:.3g}" for k, v in klds.items()})
    assert klds["sq-gptq"] < 0.5 * klds["rtn"]


def test_w8a8_settings_belong_to_w8a8():
    with pytest.raises(ValueError, match="smoothing_strength: settings of scheme w8a8"):
        Int8Method(name="int8", smoothing_strength=0.5)
    assert Int8Method(name="int8", scheme="w8a8", weights="rtn", smoothing_strength=0.5).default_variant() == \
        "int8-w8a8-rtn-sq0.5"


# ---- FP8 (method fp8) ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp8_artefacts(outlier_model, tmp_path_factory):
    from quantize.methods.configs import Fp8Method

    base = resolve_model(str(outlier_model))
    out = {}
    for scheme in ("dynamic", "block", "w8a16"):
        folder = tmp_path_factory.mktemp(f"fp8-{scheme}")
        out[scheme] = (folder, METHODS["fp8"].build(Fp8Method(name="fp8", scheme=scheme), base, folder))
    return out


@pytest.mark.parametrize("scheme,scale_shape,inputs", [("dynamic", (256, 1), "token"), ("block", (2, 4), "group"),
                                                      ("w8a16", (256, 1), None)])
def test_fp8_artefact_is_float_quantized_and_transformers_reloads_it(fp8_artefacts, scheme, scale_shape, inputs):
    """e4m3 codes in `weight`, the scale per channel ([256, 1]) or per 128 × 128 block ([2, 4] for down_proj's
    256 × 512), the presets' input_activations; compressed-tensors' decompression (transformers) gives the weights
    our evaluation dequantizes."""
    from safetensors import safe_open

    from quantize.formats.compressed_tensors import DequantizedShards

    folder, info = fp8_artefacts[scheme]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "float-quantized" and group["weights"]["type"] == "float"
    assert (group["input_activations"] or {}).get("strategy") == inputs
    assert info["scheme"] == f"fp8-{scheme}" and info["quantized_linears"] == 14
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj"
    with safe_open(folder / index[name + ".weight"], "pt") as f:
        assert f.get_tensor(name + ".weight").dtype == torch.float8_e4m3fn
        assert tuple(f.get_tensor(name + ".weight_scale").shape) == scale_shape
    ours = DequantizedShards(folder).get(name + ".weight")
    assert torch.equal(transformers_reload(folder).get_submodule(name).weight.data, ours)


def test_fp8_inputs_are_quantized_as_vllm_quantfp8():
    """kernels.fp8_per_token / fp8_per_group against their definition written out here element by element
    (scale = max|x| / 448 per token or per 128-group, floored at 1/(448·512); the code is the e4m3 number nearest
    x / scale, found by searching every finite e4m3 value), on rows spanning four decades."""
    from quantize.runtimes.kernels import fp8_per_group, fp8_per_token

    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = values[torch.isfinite(values)].unique()  # every finite e4m3 number, sorted

    def nearest_e4m3(v: torch.Tensor) -> torch.Tensor:  # exact ties do not occur in these random rows
        return values[(v[:, None] - values[None, :]).abs().argmin(dim=1)]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=g) * torch.logspace(-2, 2, 256)
    for quantize, group in ((fp8_per_token, 256), (fp8_per_group, 128)):
        G = x.reshape(16, -1, group)
        scale = (G.abs().amax(-1, keepdim=True) / 448).clamp(min=1 / (448 * 512))
        expected = (nearest_e4m3((G / scale).reshape(-1)).reshape(G.shape) * scale).reshape(x.shape)
        got = quantize(x)
        assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_fp8_block_refuses_linears_that_are_not_whole_blocks(tmp_path):
    from quantize.common.errors import QuantizeError
    from quantize.methods.configs import Fp8Method

    folder = build_tiny_llama(tmp_path / "kv64", num_key_value_heads=1)  # k/v: 64 output rows
    with pytest.raises(QuantizeError, match=r"not made of whole blocks: model\.layers\.0\.self_attn\.k_proj \[64 × 256\]"):
        METHODS["fp8"].build(Fp8Method(name="fp8", scheme="block"), resolve_model(str(folder)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme, group", [("nvfp4a16", 16), ("mxfp4a16", 32)])
def test_fp4_refuses_inputs_that_are_not_whole_groups(tmp_path, scheme, group):
    from quantize.common.errors import QuantizeError
    from quantize.methods.configs import Fp4Method

    folder = build_tiny_llama(tmp_path / "m", hidden_size=200, intermediate_size=400, head_dim=40)  # 200 % 16 = 8
    with pytest.raises(QuantizeError, match=rf"{scheme[:5].upper()} takes groups of {group} input columns; not "
                                            r"divisible: model\.layers\.0\.self_attn\.q_proj \(input 200\)"):
        METHODS["fp4"].build(Fp4Method(name="fp4", scheme=scheme), resolve_model(str(folder)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_run_reports_w8a16_w8a8_and_fp8_side_by_side(outlier_model, tmp_path):
    """`quantize run` of a recipe with INT8 W8A16 and W8A8, FP8 dynamic and block, NVFP4A16 variants: each built, reloaded
    by its loader (the activation-quantized ones through the kernel reference), scored against one base, its size
    as `plan` predicted it, and named by its layout in the report."""
    from conftest import write_recipe
    from quantize import pipeline, preflight
    from quantize.formats.tensors import weight_bytes_safetensors
    from quantize.recipe import load_recipe

    methods = [{"name": "int8", "scheme": "w8a16"}, {"name": "int8", "scheme": "w8a8"},
               {"name": "fp8", "scheme": "dynamic"}, {"name": "fp8", "scheme": "block"}, {"name": "fp4"},
               {"name": "fp4", "scheme": "mxfp4a16"}]
    out = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(outlier_model), methods, out,
                                      calibration={"source": "bundled:wiki", "samples": 8, "seq_len": 128}))
    planned = preflight.plan(recipe)["variants"]
    assert pipeline.run(recipe) == out
    results = json.loads((out / "results.json").read_text())
    expected = {"int8-w8a16": "compressed-tensors", "int8-w8a8": "compressed-tensors (int-quantized)",
                "fp8-dynamic": "compressed-tensors (float-quantized)", "fp8-block": "compressed-tensors (float-quantized)",
                "fp4-nvfp4a16": "compressed-tensors (nvfp4-pack-quantized)",
                "fp4-mxfp4a16": "compressed-tensors (mxfp4-pack-quantized)"}
    for name, fmt in expected.items():
        v = results["variants"][name]
        assert v["format"] == fmt and 0 < v["perplexity"]["kld"]["mean"] < 0.5
        assert ("kernel reference" in v["loader"]) == (name not in ("int8-w8a16", "fp4-nvfp4a16", "fp4-mxfp4a16"))
        assert ("FP4 unpack, exact in float32" in v["loader"]) == name.startswith("fp4")
        actual = sum(weight_bytes_safetensors(out / name).values())
        assert abs(planned[name]["expected_bytes"] - actual) / actual < 0.01, (name, planned[name], actual)
    report = (out / "report.md").read_text()
    assert "compressed-tensors (float-quantized)" in report and "W8A8 kernel reference" in report
    print({n: round(v["perplexity"]["kld"]["mean"], 6) for n, v in results["variants"].items()})


def written_fp4(folder, outlier_model):
    """(a stored tensor by name, the float32 base, the 15 e2m1 values, our dense reading) of an FP4 folder."""
    from safetensors import safe_open

    from quantize.formats.compressed_tensors import DequantizedShards

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    return (lambda n: safe_open(folder / index[n], "pt").get_tensor(n), load_model(outlier_model, "float32"),
            torch.cat([-e2m1.flip(0), e2m1]), DequantizedShards(folder))


# ---- NVFP4 (method fp4) ----------------------------------------------------------------------------------------
def test_nvfp4_artefact_follows_the_definition_and_transformers_reloads_it(outlier_model, tmp_path):
    """nvfp4-pack-quantized as llm-compressor's NVFP4A16 writes it; every weight is its e2m1 code × its group's
    e4m3 scale ÷ the tensor's global scale, with g = 448·6 / max|W| shared by q/k/v (and by gate/up), the group
    scale e4m3(g · max|W_group| / 6), and the code the e2m1 value nearest W ÷ (scale / g), all checked here from the
    definition; transformers (compressed-tensors, which decompresses NVFP4 to bfloat16) reads the same weights."""
    from quantize.methods.configs import Fp4Method

    folder = tmp_path / "fp4"
    folder.mkdir()
    info = METHODS["fp4"].build(Fp4Method(name="fp4"), resolve_model(str(outlier_model)), folder)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "nvfp4-pack-quantized" and group["weights"]["group_size"] == 16
    assert group["weights"]["strategy"] == "tensor_group" and group["input_activations"] is None
    assert info["quantized_linears"] == 14
    stored, base, e2m1, ours = written_fp4(folder, outlier_model)
    for stack in (["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"], ["down_proj"]):
        names = [f"model.layers.1.{'self_attn' if n[0] in 'qkv' else 'mlp'}.{n}" for n in stack]
        W = torch.cat([base.get_submodule(n).weight.data for n in names])
        g = 448 * 6 / W.abs().max()
        assert all(torch.allclose(stored(n + ".weight_global_scale"), g.reshape(1)) for n in names)
        for n in names:
            Wn = base.get_submodule(n).weight.data.reshape(-1, 16)
            scale = stored(n + ".weight_scale").float().reshape(-1, 1)
            assert torch.equal(scale, (g * Wn.abs().amax(1, keepdim=True) / 6).to(torch.float8_e4m3fn).float())
            x = Wn / (scale / g)
            nearest = e2m1[(x[..., None] - e2m1).abs().argmin(-1)]
            expected = (nearest * scale / g).reshape(base.get_submodule(n).weight.shape)
            got = ours.get(n + ".weight")
            assert (got - expected).abs().max() <= 1e-6 * expected.abs().max(), n  # ties aside (none here)
    reloaded = load_model(folder, "bfloat16")
    with torch.no_grad():
        reloaded(torch.zeros(1, 1, dtype=torch.long))
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(reloaded.get_submodule(name).weight.data, ours.get(name + ".weight").bfloat16())


def test_mxfp4_artefact_follows_the_definition_and_compressed_tensors_reads_it(outlier_model, tmp_path):
    """mxfp4-pack-quantized as compressed-tensors' MXFP4A16 preset writes it: per group of 32 inputs the scale is a
    power of two, 2^(floor(log2(max|W|)) − 2) with the max first rounded up to the next power of two when its
    mantissa is ≥ 1.75, stored as its E8M0 exponent; each code the e2m1 value nearest W ÷ scale, clamped at ±6.
    Checked from that definition, written here by hand; compressed-tensors' own MXFP4 decompression of the stored
    tensors gives the same weights; plan's size is the folder's."""
    import math

    from quantize.fit.footprint import fp4_bytes
    from quantize.formats.tensors import weight_bytes
    from quantize.methods.configs import Fp4Method
    from quantize.sources.models import meta_model

    folder = tmp_path / "mx"
    folder.mkdir()
    method = Fp4Method(name="fp4", scheme="mxfp4a16")
    assert method.default_variant() == "fp4-mxfp4a16"
    info = METHODS["fp4"].build(method, resolve_model(str(outlier_model)), folder)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert qc["format"] == "mxfp4-pack-quantized" and w["group_size"] == 32 and w["strategy"] == "group"
    assert w["type"] == "float" and w["num_bits"] == 4 and "uint8" in str(w["scale_dtype"])
    assert info["quantized_linears"] == 14
    stored, base, e2m1, ours = written_fp4(folder, outlier_model)
    saturated = 0
    for n in ["model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]:
        W = base.get_submodule(n).weight.data
        groups = W.reshape(-1, 32)
        exps = []
        for amax in groups.abs().amax(1).tolist():
            e = math.floor(math.log2(amax))
            e += amax / 2.0**e >= 1.75  # rounded up to the next power of two
            exps.append(e - 2)
        scale = torch.tensor([2.0**e for e in exps]).reshape(-1, 1)
        assert torch.equal(stored(n + ".weight_scale").reshape(-1).long(), torch.tensor(exps) + 127)
        x = (groups / scale).clamp(-6, 6)
        saturated += int(((groups / scale).abs() > 6).sum())
        expected = (e2m1[(x[..., None] - e2m1).abs().argmin(-1)] * scale).reshape(W.shape)
        got = ours.get(n + ".weight")
        assert (got - expected).abs().max() <= 1e-6 * expected.abs().max(), n  # ties aside (none here)
    print(f"MXFP4: {saturated} weights above 6 · scale saturated to ±6 (the format's own clipping)")
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=w)
    for n in ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj"]:
        dense = MXFP4PackedCompressor.decompress(
            {"weight_packed": stored(n + ".weight_packed"), "weight_scale": stored(n + ".weight_scale")}, scheme)
        ref = ours.get(n + ".weight")
        assert dense["weight"].shape == ref.shape
        assert torch.equal(dense["weight"].float(), ref.to(dense["weight"].dtype).float()), n  # its dtype: bf16
    assert abs(sum(weight_bytes(folder).values()) - fp4_bytes(method, meta_model(outlier_model))) <= 4096



# ---- GPTQ onto the e2m1 grids (fp4 `weights: gptq`) ------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["nvfp4a16", "mxfp4a16"])
def test_gptq_onto_e2m1_is_rtn_without_correlation_and_lowers_the_output_error_with_it(scheme):
    """GPTQ's column loop with NVFP4's / MXFP4's grid: with uncorrelated inputs (a diagonal Hessian) no error is fed
    forward, so every code and scale equals round-to-nearest's; with correlated inputs the layer's output error
    ‖X·(Ŵ − W)ᵀ‖² is below round-to-nearest's."""
    from quantize.methods import fp4
    from quantize.methods.configs import Fp4Method
    from quantize.methods.statistics import Hessian, accumulate_hessian

    torch.manual_seed(0)
    W = torch.randn(48, 128) * 0.05
    rtn = (fp4.solve_mx if scheme == "mxfp4a16" else fp4.solve)(W, None, 0, 4)
    gptq = fp4.gptq_solver(Fp4Method(name="fp4", scheme=scheme, weights="gptq"))
    diagonal = Hessian.zeros(128)
    accumulate_hessian(diagonal, torch.diag(torch.rand(128) + 0.5))  # orthogonal inputs: XᵀX diagonal
    alone = gptq(W, diagonal, 0, 4)
    assert torch.equal(alone.q, rtn.q) and torch.equal(alone.scale, rtn.scale) and alone.extra == rtn.extra

    X = torch.randn(4096, 16) @ torch.randn(16, 128) + 0.3 * torch.randn(4096, 128)  # correlated inputs
    correlated = Hessian.zeros(128)
    accumulate_hessian(correlated, X)
    fed = gptq(W, correlated, 0, 4)
    group = fp4.group_of(scheme)
    error = lambda r: (X @ (fp4.grids.dequantize(r.q, r.scale, r.zero, group) - W).T).pow(2).sum()  # noqa: E731
    assert error(fed) < 0.8 * error(rtn), (float(error(fed)), float(error(rtn)))
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert torch.isin(fed.q.abs(), e2m1).all()  # still e2m1 values


def test_nvfp4_gptq_artefact_is_nvfp4_pack_quantized_and_transformers_reloads_it(outlier_model, tmp_path):
    """`weights: gptq` writes the same format as round-to-nearest (the variant's own name), from the calibration."""
    from quantize.methods.configs import Fp4Method

    method = Fp4Method(name="fp4", weights="gptq", forward_dtype="float32")
    assert method.default_variant() == "fp4-nvfp4a16-gptq" and method.needs_calibration
    with pytest.raises(ValueError, match="settings of `weights: gptq`"):
        Fp4Method(name="fp4", damp=0.05)
    folder = tmp_path / "fp4-gptq"
    folder.mkdir()
    info = METHODS["fp4"].build(method, resolve_model(str(outlier_model)), folder, calibration())
    assert info["weights"] == "gptq" and info["quantized_linears"] == 14
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized" and qc["config_groups"]["group_0"]["weights"]["group_size"] == 16
    stored, base, e2m1, ours = written_fp4(folder, outlier_model)
    name = "model.layers.0.mlp.down_proj"
    W = ours.get(name + ".weight").reshape(-1, 16)
    scale = stored(name + ".weight_scale").float().reshape(-1, 1) / stored(name + ".weight_global_scale")
    x = W / scale
    nearest = e2m1[(x[..., None] - e2m1).abs().argmin(-1)]
    assert (x - nearest).abs().max() < 1e-5  # each weight an e2m1 value × its group's stored scale ÷ g
    assert not torch.equal(ours.get(name + ".weight"), base.get_submodule(name).weight.data)
    reloaded = load_model(folder, "bfloat16")  # compressed-tensors decompresses NVFP4 to bfloat16
    with torch.no_grad():
        reloaded(torch.zeros(1, 1, dtype=torch.long))
    assert torch.equal(reloaded.get_submodule(name).weight.data, ours.get(name + ".weight").bfloat16())


def test_e2m1_rounds_as_compressed_tensors_cast_to_fp4():
    """Our e2m1 rounding (round half to even at the grid's step) against compressed-tensors' own, on a dense sweep,
    every midpoint and both float neighbours of each value, signs and zeros included."""
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    from quantize.methods.fp4 import e2m1

    x = torch.cat([torch.linspace(-7, 7, 20001),
                   torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 100.0, 0.0, -0.0, 1e-30, 1e-45])])
    x = torch.cat([x, -x, torch.nextafter(x, torch.full_like(x, 10)), torch.nextafter(x, torch.full_like(x, -10))])
    theirs, ours = cast_to_fp4(x.clone()), e2m1(x)
    assert torch.equal(ours, theirs) and torch.equal(torch.signbit(ours), torch.signbit(theirs))


@pytest.mark.parametrize("scheme", ["dynamic", "block"])
def test_gptq_onto_e4m3_is_rtn_without_correlation_and_lowers_the_output_error_with_it(scheme):
    """fp8 `weights: gptq`: with a diagonal Hessian every code and scale equals round-to-nearest's (per channel
    and per 128 × 128 block); with correlated inputs the layer's output error is below round-to-nearest's."""
    from quantize.methods import fp8
    from quantize.methods.configs import Fp8Method
    from quantize.methods.statistics import Hessian, accumulate_hessian

    torch.manual_seed(0)
    W = torch.randn(256, 256) * 0.05
    group = 128 if scheme == "block" else -1
    rtn = fp8.solver(scheme, torch.float32)(W, None, group, 8)
    gptq = fp8.gptq_solver(Fp8Method(name="fp8", scheme=scheme, weights="gptq"), torch.float32)
    diagonal = Hessian.zeros(256)
    accumulate_hessian(diagonal, torch.diag(torch.rand(256) + 0.5))
    alone = gptq(W, diagonal, group, 8)
    assert torch.equal(alone.q, rtn.q) and torch.equal(alone.scale, rtn.scale)
    X = torch.randn(4096, 16) @ torch.randn(16, 256) + 0.3 * torch.randn(4096, 256)
    correlated = Hessian.zeros(256)
    accumulate_hessian(correlated, X)
    fed = gptq(W, correlated, group, 8)
    error = lambda r: (X @ (fp8.grids.dequantize(r.q, r.scale, r.zero, group) - W).T).pow(2).sum()  # noqa: E731
    assert error(fed) < 0.8 * error(rtn), (float(error(fed)), float(error(rtn)))
    assert torch.equal(fed.q, fed.q.to(torch.float8_e4m3fn).float())  # e4m3 values
    method = Fp8Method(name="fp8", scheme=scheme, weights="gptq")
    assert method.default_variant() == f"fp8-{scheme}-gptq" and method.needs_calibration
    with pytest.raises(ValueError, match="settings of `weights: gptq`"):
        Fp8Method(name="fp8", damp=0.05)


def test_fp8_block_gptq_artefact_is_float_quantized_and_transformers_reloads_it(outlier_model, tmp_path):
    """`weights: gptq` writes the block scheme's layout (e4m3 codes, a scale per 128 × 128 block) from the
    calibration, and compressed-tensors decompresses it to the weights our evaluation dequantizes."""
    from safetensors import safe_open

    from quantize.formats.compressed_tensors import DequantizedShards
    from quantize.methods.configs import Fp8Method

    folder = tmp_path / "fp8-gptq"
    folder.mkdir()
    method = Fp8Method(name="fp8", scheme="block", weights="gptq", forward_dtype="float32")
    info = METHODS["fp8"].build(method, resolve_model(str(outlier_model)), folder, calibration())
    assert info["weights"] == "gptq" and info["quantized_linears"] == 14
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized" and qc["config_groups"]["group_0"]["weights"]["strategy"] == "block"
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj"
    with safe_open(folder / index[name + ".weight"], "pt") as f:
        assert f.get_tensor(name + ".weight").dtype == torch.float8_e4m3fn
        assert tuple(f.get_tensor(name + ".weight_scale").shape) == (2, 4)
    ours = DequantizedShards(folder).get(name + ".weight")
    assert not torch.equal(ours, load_model(outlier_model, "float32").get_submodule(name).weight.data)
    assert torch.equal(transformers_reload(folder).get_submodule(name).weight.data, ours)
