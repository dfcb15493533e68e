"""GPTQ: the math on a Linear(8, 6), the streamed artefact on the tiny Llama."""

import json

import pytest
import torch

from conftest import write_recipe
from quantize import pipeline
from quantize.formats import compressed_tensors
from quantize.methods import grids
from quantize.common.errors import QuantizeError
from quantize.methods.gptq import gptq_quantize
from quantize.methods.statistics import Hessian, accumulate_hessian, gram
from quantize.methods.weight_only import group_size_for
from quantize.sources.models import load_model, load_tokenizer
from quantize.recipe import load_recipe


def correlated_inputs(n=512, cols=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g)
    return torch.randn(n, cols, generator=g) @ mix  # strongly correlated columns, as real activations are


def hessian_of(X):
    hess = Hessian.zeros(X.shape[1])
    for part in X.split(100):  # accumulating in batches equals one big batch
        accumulate_hessian(hess, part)
    return hess


def test_hessian_is_running_mean_of_2xtx():
    X = correlated_inputs()
    assert torch.allclose(hessian_of(X).H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-4)


def test_hessian_converted_by_blocks_of_rows_equals_the_whole_product(monkeypatch):
    hess = hessian_of(correlated_inputs(n=400, cols=48))
    whole = (hess.xtx * (2 / hess.n)).float()
    monkeypatch.setattr(Hessian, "BLOCK_ELEMENTS", 48 * 5)  # 5 rows per block: 10 blocks, the last one partial
    assert torch.equal(hess.H, whole)


@pytest.mark.parametrize("cols", [200, 600])  # one block; three blocks, the last one partial
def test_blocked_gram_is_the_full_symmetric_product(cols):
    X = correlated_inputs(n=300, cols=cols)
    G = gram(X, 0.5)
    exact = 0.5 * X.double().T @ X.double()
    assert G.dtype == torch.float32 and torch.equal(G, G.T)
    assert ((G.double() - exact).abs().max() / exact.abs().max()).item() < 1e-6


@pytest.mark.parametrize("symmetric,group_size,act_order", [(True, -1, False), (False, 4, False), (True, 4, True)])
def test_gptq_output_error_below_rtn(symmetric, group_size, act_order):
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6, bias=False)
    X = correlated_inputs()
    W = layer.weight.data
    r = gptq_quantize(W, hessian_of(X), 3, symmetric, group_size, act_order, damp=0.01, block_size=4,
                      scale_dtype=torch.float32)
    gptq_W = grids.dequantize(r.q, r.scale, r.zero, group_size)
    rtn_W = grids.fake_quantize(W, 3, symmetric, group_size)
    qmin, qmax = grids.grid(3, symmetric)
    assert r.q.min() >= qmin and r.q.max() <= qmax
    err = lambda Wq: ((Wq - W) @ X.T).pow(2).sum().item()  # noqa: E731  ‖(W − Ŵ)Xᵀ‖²
    assert err(gptq_W) < 0.9 * err(rtn_W)


def test_identity_hessian_per_channel_is_rtn():
    """With uncorrelated unit inputs there is nothing to feed the error back into: GPTQ = RTN."""
    W = torch.randn(6, 8)
    r = gptq_quantize(W, Hessian(torch.eye(8, dtype=torch.float64), n=1), 4, True, -1, damp=1e-9, scale_dtype=torch.float32)
    scale, zero = grids.scale_zero(W, 4, True)
    assert torch.equal(r.q, grids.quantize(W, scale, zero, 4, True))


def test_act_order_keeps_static_groups_and_dead_columns():
    X = correlated_inputs()
    X[:, 3] = 0  # a dead input
    W = torch.randn(6, 8)
    r = gptq_quantize(W, hessian_of(X), 4, True, 4, act_order=True, scale_dtype=torch.float32)
    W_live = W.clone()
    W_live[:, 3] = 0  # as in the reference, a dead input's weights are zeroed before the grids are set
    scale, _ = grids.scale_zero(W_live, 4, True, 4)
    assert torch.allclose(r.scale, scale)  # groups' grids fixed from the original weights, natural order
    assert torch.isfinite(torch.tensor(r.loss)) and r.q[:, 3].abs().sum() == 0  # dead column quantized to 0


@pytest.mark.parametrize("act_order", [False, True])
def test_linears_sharing_a_hessian_solve_as_one_matrix(act_order):
    """GPTQ treats output rows independently: q/k/v (or gate/up) stacked into one matrix get what each gets alone."""
    X = correlated_inputs()
    hess = hessian_of(X)
    W1, W2 = torch.randn(6, 8), torch.randn(4, 8)
    args = dict(bits=4, symmetric=False, group_size=4, act_order=act_order, block_size=4, scale_dtype=torch.float32)
    both = gptq_quantize(torch.cat([W1, W2]), hess, **args)
    for W, rows in ((W1, slice(0, 6)), (W2, slice(6, 10))):
        alone = gptq_quantize(W, hess, **args)
        assert torch.equal(both.q[rows], alone.q)
        assert torch.allclose(both.scale[rows], alone.scale) and torch.equal(both.zero[rows], alone.zero)
        assert torch.allclose(both.row_loss[rows], alone.row_loss, rtol=1e-5)


def test_indivisible_group_names_layer_and_sizes():
    """The sizes suggested are ones the recipe schema accepts (review §2: it suggested 96 and 192, which it refuses)."""
    from quantize.methods.configs import GptqMethod

    with pytest.raises(QuantizeError, match=r"model.layers.0.self_attn.q_proj: input size 576 .*: 32, 64 or -1") as e:
        group_size_for("model.layers.0.self_attn.q_proj", 576, 128, "fail")
    for size in (32, 64):
        assert f"{size}" in str(e.value) and GptqMethod(name="gptq", group_size=size).group_size == size
    assert group_size_for("x", 576, 128, "channel") == -1
    assert group_size_for("x", 1536, 128, "fail") == 128


def test_streamed_gptq_beats_rtn_and_reloads(tiny_model, tmp_path):
    methods = [{"name": "rtn", "bits": 4, "group_size": 64}, {"name": "gptq", "bits": 4, "group_size": 64},
               {"name": "gptq", "bits": 4, "group_size": 64, "sym": False, "act_order": True}]
    out = tmp_path / "g"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), methods, out,
                                      calibration={"samples": 16, "seq_len": 128}))
    pipeline.run(recipe)
    results = json.loads((out / "results.json").read_text())["variants"]
    kld = {n: v["perplexity"]["kld"]["mean"] for n, v in results.items()}
    assert kld["gptq-w4-sym-g64"] < kld["rtn-w4-sym-g64"]
    assert results["gptq-w4-sym-g64"]["loader"] == "transformers.from_pretrained"
    folder = out / "gptq-w4-sym-g64"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert qc["format"] == "pack-quantized" and weights["num_bits"] == 4 and weights["group_size"] == 64
    log = [json.loads(line) for line in (folder / "quantize-log.jsonl").read_text().splitlines()]
    assert len(log) == 2 * 7 and all(r["samples"] == 16 and r["damp"] > 0 for r in log)
    # transformers' decompression and compressed-tensors' unpacking read the same weights
    ids = load_tokenizer(folder)("The history of the city", return_tensors="pt").input_ids
    with torch.no_grad():
        a = load_model(folder, "float32")(ids).logits
        b = compressed_tensors.load_dense(folder)(ids).logits
    assert (a - b).abs().max().item() < 1e-4
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["calibration"]["samples"] == 16 and len(manifest["calibration"]["sha256"]) == 64


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v with biases
def test_staged_layer_equals_the_decoder_layer(family):
    """The staged run (one pass that hands each true-sequential group its inputs) computes what the decoder layer
    computes: each stage sees the inputs the layer's own linears see, and when the stages change the weights (as
    quantizing does), the output is the changed layer's output."""
    import transformers

    from quantize.methods.activations import Activations
    from quantize.methods.engine import staged_layer
    from quantize.sources.architectures import ARCHITECTURES

    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    config = config_class(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = model_class(config).eval()
    layer, groups = model.model.layers[0], ARCHITECTURES[family].layer.groups
    with torch.inference_mode():
        x = torch.randn(5, 16, 64)
        acts = Activations(x, model.model.rotary_emb(x[:1], torch.arange(16)[None]), batch=2)
        expected, _, _ = acts.capture(layer, [g[0] for g in groups])
        stages = {}
        out = staged_layer(layer, acts, lambda group, X: stages.setdefault(group, X))
        assert torch.allclose(out, acts.run(layer), atol=1e-5)
        for group, names in enumerate(groups):
            assert torch.allclose(stages[group], expected[names[0]], atol=1e-5), names

        def coarsen(group, X):  # a stand-in for quantizing the group: round its weights onto a coarse grid
            for name in groups[group]:
                linear = layer.get_submodule(name)
                linear.weight.data = (linear.weight.data * 4).round() / 4

        out = staged_layer(layer, acts, coarsen)
        assert torch.allclose(out, acts.run(layer), atol=1e-5)


def test_bfloat16_forward_stays_close_and_returns_float32():
    """forward_dtype bfloat16: the linears and attention run under autocast, the activations stay float32."""
    import transformers

    from quantize.methods.activations import Activations

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.inference_mode():
        x = torch.randn(3, 16, 64)
        pos = model.model.rotary_emb(x[:1], torch.arange(16)[None])
        exact = Activations(x, pos, batch=2).run(model.model.layers[0])
        half = Activations(x, pos, batch=2, forward_dtype=torch.bfloat16).run(model.model.layers[0])
    assert half.dtype == torch.float32 and not torch.equal(half, exact)
    assert ((half - exact).norm() / exact.norm()).item() < 1e-2  # bfloat16 rounding, ~2^-8 per operation


def test_device_is_checked_at_the_edge():
    from quantize.methods.device import resolve_device

    assert resolve_device("auto", "recipe.yaml") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu", "recipe.yaml") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(QuantizeError, match=r"recipe.yaml: device 'cuda'.*sees no CUDA device"):
            resolve_device("cuda", "recipe.yaml")


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_streamed_methods_on_each_device(method, tiny_model, tmp_path):
    """RTN, GPTQ and AWQ take `device` and record it; where a GPU is visible the same build runs on it too (float32
    forwards) with the same layout, the codes differing only where float rounding tips a value."""
    from safetensors.torch import load_file

    from quantize.methods.configs import CONFIGS
    from quantize.methods.registry import METHODS
    from quantize.sources.models import resolve_model

    base = resolve_model(str(tiny_model))
    calib = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    packed = {}
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        out = tmp_path / device
        out.mkdir()
        config = CONFIGS[method](name=method, group_size=64, device=device, forward_dtype="float32")
        info = METHODS[method].build(config, base, out, calib)
        assert info["device"] == device and info["forward_dtype"] == "float32"
        packed[device] = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    if "cuda" not in packed:
        return
    assert packed["cpu"].keys() == packed["cuda"].keys()
    for name, tensor in packed["cpu"].items():
        if name.endswith("weight_scale"):
            close = torch.isclose(tensor.float(), packed["cuda"][name].float(), rtol=1e-2)
            assert close.float().mean() > 0.9, name


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_size_does_not_change_the_result(symmetric):
    """The lazy block updates are exact: with blocks of 3 columns, groups of 4 start mid-block and run past it, and
    their grids must come from the same error-updated weights as with one block for all columns."""
    X = correlated_inputs()
    W = torch.randn(6, 8)
    args = dict(bits=3, symmetric=symmetric, group_size=4, scale_dtype=torch.float32)
    one = gptq_quantize(W, hessian_of(X), block_size=8, **args)
    lazy = gptq_quantize(W, hessian_of(X), block_size=3, **args)
    assert torch.allclose(one.scale, lazy.scale, rtol=1e-5) and torch.equal(one.q, lazy.q)


def test_all_zero_group_keeps_finite_codes():
    """A group of zeros gets a scale fp16 can store (not 0), so its codes are exact and the row stays finite."""
    X = correlated_inputs()
    W = torch.randn(6, 8)
    W[2, :4] = 0
    r = gptq_quantize(W, hessian_of(X), 4, False, 4)  # fp16 scales, as the artefact stores them
    assert (r.scale > 0).all() and torch.isfinite(r.row_loss).all()
    deq = grids.dequantize(r.q, r.scale, r.zero, 4)
    assert torch.equal(deq[2, :4], torch.zeros(4)) and torch.isfinite(deq).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_missing_cuda_device_fails_before_any_work(tiny_model, tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model),
                                      [{"name": "rtn"}, {"name": "gptq", "group_size": 64, "device": "cuda"}], out))
    with pytest.raises(QuantizeError, match=r"recipe run: key `methods\[1\].device`: device 'cuda'.*no CUDA"):
        pipeline.run(recipe)
    assert not out.exists()


def test_recipe_device_is_every_layer_wise_method_default(tiny_model, tmp_path):
    """One recipe key: `device` is where evaluation runs and the device of rtn/gptq/awq that name none."""
    methods = [{"name": "gptq", "group_size": 64}, {"name": "awq", "group_size": 64, "device": "auto"},
               {"name": "int8"}, {"name": "int8", "scheme": "w8a8"}, {"name": "gguf", "type": "Q8_0"}]
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), methods, tmp_path / "out",
                                      device="cpu"))
    assert recipe.device == "cpu"
    # int8 w8a16 has a device key that only scheme w8a8 uses (left at its default); gguf's goes to its nested AWQ
    assert [getattr(m, "device", None) for m in recipe.methods] == ["cpu", "auto", "auto", "cpu", "cpu"]
    if not torch.cuda.is_available():
        recipe = load_recipe(write_recipe(tmp_path / "c.yaml", str(tiny_model), [{"name": "rtn"}],
                                          tmp_path / "cuda-out", device="cuda"))
        with pytest.raises(QuantizeError, match=r"key `methods\[0\].device`: device 'cuda'.*no CUDA"):
            pipeline.run(recipe)
        assert not (tmp_path / "cuda-out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluation_on_cuda_matches_cpu(tiny_model, tmp_path):
    """The same recipe evaluated on the GPU: the protocol and the loader say so; perplexity and KLD agree with the
    CPU run to float32 accuracy (the artefacts are built on the CPU in both)."""
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        methods = [{"name": "rtn", "group_size": 64, "device": "cpu"}]
        pipeline.run(load_recipe(write_recipe(tmp_path / f"{device}.yaml", str(tiny_model), methods, out,
                                              device=device)))
        results[device] = json.loads((out / "results.json").read_text())
    assert results["cuda"]["protocol"]["device"] == "cuda"
    v = {d: results[d]["variants"]["rtn-w4-sym-g64"] for d in results}
    assert v["cuda"]["loader"].endswith("on cuda")
    assert abs(v["cuda"]["perplexity"]["ppl"] / v["cpu"]["perplexity"]["ppl"] - 1) < 1e-3
    assert abs(v["cuda"]["perplexity"]["kld"]["mean"] - v["cpu"]["perplexity"]["kld"]["mean"]) < 1e-4


def fasterquant_reference(W, H, bits, group_size, block_size=128, damp=0.01):
    """IST-DASLab gptq.py fasterquant, the path without act_order and static groups, written out: a group's grid
    is set from W[:, i1 + i : i1 + i + groupsize] (min/max, symmetric) when the loop reaches its first column."""
    W, H = W.clone().float(), H.clone()
    cols = W.shape[1]
    qmax = 2 ** (bits - 1) - 1
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, Q1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), torch.zeros(W.shape[0], i2 - i1), \
            Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if (i1 + i) % group_size == 0:
                group = W[:, i1 + i : i1 + i + group_size]
                scale = (group.abs().amax(dim=1) / ((2 * qmax + 1) / 2)).half().float()
            q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax)
            Q1[:, i] = q
            err = (w - q * scale) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q.to(torch.int32)


def test_reference_group_grid_is_fasterquant():
    """group_grid "reference" gives the reference loop's codes; "updated" (ours) differs once a group starts
    inside a block after columns whose feedback it sees."""
    X = correlated_inputs(n=2048, cols=256)
    hess = hessian_of(X)
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(3))
    ref = fasterquant_reference(W, hess.H, bits=4, group_size=32)
    ours = gptq_quantize(W, hess, bits=4, symmetric=True, group_size=32, group_grid="reference")
    assert torch.equal(ours.q, ref)
    updated = gptq_quantize(W, hess, bits=4, symmetric=True, group_size=32)
    assert not torch.equal(updated.q, ref)
    # with group_size = block_size every group starts a block, where W and the block's copy agree: the same codes
    same = [gptq_quantize(W, hess, 4, True, 128, block_size=128, group_grid=g).q for g in ("updated", "reference")]
    assert torch.equal(*same)


def test_forward_dtype_auto_is_bf16_only_where_native():
    """forward_dtype auto: bfloat16 on a CPU whose flags include avx512_bf16 or amx_bf16, float32 on any other
    (bf16 is emulated there and slower); a value set in the recipe is taken as it is. The reason goes to the
    manifest."""
    from quantize.methods.device import resolve_forward_dtype

    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    dtype, why = resolve_forward_dtype("auto", "cpu")
    print(f"this CPU: forward_dtype auto → {dtype} ({why})")
    assert dtype == (torch.bfloat16 if native else torch.float32) and why.startswith("auto:")
    assert resolve_forward_dtype("bfloat16", "cpu") == (torch.bfloat16, "set in the recipe")
    assert resolve_forward_dtype("float32", "cpu")[0] == torch.float32
