"""AWQ: the search and the folding on small tensors, the exact fold and the streamed artefact on the tiny Llama."""

import copy
import json

import torch

from conftest import write_recipe
from quantize import pipeline
from quantize.formats import compressed_tensors
from quantize.methods import grids
from quantize.methods.engine import stream_layers
from quantize.sources.architectures import LLAMA
from quantize.methods.awq import alpha_steps, awq_layer, block_loss_fn, fold_scale, search_clip, search_scale
from quantize.sources.models import load_model, load_tokenizer, resolve_model
from quantize.methods.configs import AwqMethod
from quantize.methods.registry import METHODS
from quantize.recipe import load_recipe


def outlier_inputs(n=2048, cols=64, seed=0):
    """Activations with a few large channels, as LLM activations have (the case AWQ is built for)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g)
    x[:, :3] *= 30
    return x


def test_scale_search_beats_rtn_on_outlier_channels():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    x = outlier_inputs()[None]  # [1 sample, tokens, cols]
    W = lin.weight.data.clone()
    Q = lambda w: grids.fake_quantize(w, 3, False, 16)  # noqa: E731
    x_mean = x.abs().mean((0, 1))
    s, alpha, losses = search_scale([lin], [True], x_mean, block_loss_fn(None, lin, x), Q, 16, 20, True)
    assert torch.equal(lin.weight.data, W)  # the search leaves the weights as they came
    err = lambda Wq: (x @ (Wq - W).T).pow(2).mean().item()  # noqa: E731
    awq_err = err(Q(W * s) / s)
    assert awq_err == min(losses) or abs(awq_err - min(losses)) < 1e-6 * awq_err
    assert awq_err < 0.7 * err(Q(W))  # the salient channels keep their precision
    assert s[:3].min() > s[3:].max()  # the outlier channels got the largest scales


def test_coarse_to_fine_scale_search_finds_the_grid_minimum_of_a_unimodal_loss():
    """coarse_grid 4 on a 20-point grid judges s = 1, every 4th α, then the best's neighbours at 2 and 1: ten
    points instead of 21, and on a loss that is unimodal in α (this one; checked) the same α as the whole grid."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 32, bias=False)
    x = outlier_inputs(seed=1)[None]
    Q = lambda w: grids.fake_quantize(w, 4, False, 16)  # noqa: E731
    x_mean = x.abs().mean((0, 1))
    loss = block_loss_fn(None, lin, x)
    s, alpha, losses = search_scale([lin], [True], x_mean, loss, Q, 16, 20, True)
    curve = losses[1:]  # α = 0, 1/20, …: the whole grid judged in order
    k = curve.index(min(curve))
    assert len(curve) == 20 and 0 < k < 19
    assert all(a > b for a, b in zip(curve[:k], curve[1 : k + 1]))
    assert all(a < b for a, b in zip(curve[k:], curve[k + 1 :]))
    s4, alpha4, losses4 = search_scale([lin], [True], x_mean, loss, Q, 16, 20, True, coarse=4)
    assert alpha4 == alpha and torch.equal(s4, s) and min(losses4) == min(losses)
    assert len(losses4) <= 10
    assert alpha_steps(20, 4) == [4, 2, 1] and alpha_steps(20, 6) == [6, 3, 2, 1] and alpha_steps(20, 1) == [1]
    assert alpha_steps(4, 4) == [1]


def test_gram_loss_equals_the_output_error():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    x = outlier_inputs()[None]
    W = lin.weight.data.clone()
    loss = block_loss_fn(None, lin, x)
    lin.weight.data = grids.fake_quantize(W, 3, False, 16)
    direct = (x @ (lin.weight.data - W).T).pow(2).mean()
    assert torch.allclose(loss(), direct, rtol=1e-3)


def test_fold_into_norm_and_linear_is_exact():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    norm.weight.data.uniform_(0.5, 2)
    up, down = torch.nn.Linear(16, 24), torch.nn.Linear(24, 8)
    x = torch.randn(10, 16)
    before = down(up(norm(x)))
    fold_scale(norm, [up], torch.rand(16) + 0.5)
    fold_scale(up, [down], torch.rand(24) + 0.5)
    assert (down(up(norm(x))) - before).abs().max().item() < 1e-5


def test_gemma_norm_fold_holds_in_bfloat16():
    """A norm computing x̂·(1 + w) with a dead channel (1 + w = 0, as in most of Gemma-3-270m's pre-MLP norms):
    the scales stay centred on 1 and the folded norm and linear, run in bfloat16 as vLLM runs Gemma, compute what
    the unfolded ones compute in bfloat16. Before, sqrt(max·min) put every scale near 100 and 1 + w' near 0.01,
    where bfloat16 keeps no digit of it: AWQ's Gemma lost 13-17 % of perplexity on vLLM."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from quantize.methods.awq import candidate_scales, weight_mean

    g = torch.Generator().manual_seed(0)
    norm, lin = Gemma3RMSNorm(64), torch.nn.Linear(64, 32, bias=False)
    norm.weight.data = torch.rand(64, generator=g) * 4 - 0.5  # 1 + w in [0.5, 4.5]
    norm.weight.data[5] = -1.0  # a dead channel
    x = torch.randn(256, 64, generator=g) * 3
    x_mean = norm(x).abs().mean(0)
    assert x_mean[5] == 0
    s = candidate_scales(x_mean, weight_mean([lin.weight.data], 64), 0.5, True)
    live = torch.arange(64) != 5
    assert 0.5 < s[live].log().mean().exp() < 2  # centred on 1 over the live channels

    def run(dtype):  # on copies: the modules stay float32
        return copy.deepcopy(lin).to(dtype)(copy.deepcopy(norm).to(dtype)(x.to(dtype))).float()

    full, bf16 = run(torch.float32), run(torch.bfloat16)
    fold_scale(norm, [lin], s, norm_offset=1.0)
    assert (run(torch.float32) - full).abs().max() < 1e-4 * full.abs().max()  # exact in full precision
    assert torch.equal(norm.weight.data.bfloat16().float(), norm.weight.data)  # on bfloat16's grid
    folded_bf16 = run(torch.bfloat16)
    err = lambda y: ((y - full).norm() / full.norm()).item()  # noqa: E731
    print(f"bf16 relative error: unfolded {err(bf16):.3g}, folded {err(folded_bf16):.3g}")
    assert err(folded_bf16) < 2 * err(bf16)


def test_fold_onto_a_collapsing_gemma_norm_stays_exact():
    """A scale so large that 1 + w' would round to 0 in bfloat16: w' takes the next bfloat16 value instead and s
    is adjusted to it, so the fold is still exact (the returned s is what the linears took)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm, lin = Gemma3RMSNorm(4), torch.nn.Linear(4, 3, bias=False)
    norm.weight.data = torch.tensor([0.0, 1.0, -1.0, 2.0])
    x = torch.randn(8, 4)
    before = lin(norm(x))
    s = fold_scale(norm, [lin], torch.tensor([1e4, 1.0, 3.0, 0.5]), norm_offset=1.0)
    assert (1 + norm.weight.data[0]) > 0 and s[0] < 1e4
    assert norm.weight.data[2] == -1.0  # dead stays dead
    assert (lin(norm(x)) - before).abs().max() < 1e-4


def test_clip_search_never_worse_than_no_clip():
    torch.manual_seed(0)
    W = torch.randn(64, 64)
    W[:, 5] *= 8  # a few large weights: clipping them helps the other weights of their group
    x = torch.randn(256, 64)
    Q = lambda w: grids.fake_quantize(w, 3, False, 32)  # noqa: E731
    m = search_clip(W, x, Q, 32)
    assert m.shape == (64, 2)
    clipped = torch.clamp(W.reshape(64, 2, 32), -m[..., None], m[..., None]).reshape(64, 64)
    err = lambda Wq: (x @ (Wq - W).T).pow(2).mean().item()  # noqa: E731
    assert err(Q(clipped)) < err(Q(W))
    assert (m <= W.abs().reshape(64, 2, 32).amax(-1) + 1e-6).all()


def test_clip_search_picks_each_groups_best_clip_by_its_output_error():
    """The Gram-matrix form of the clip loss chooses, per (row, group), the shrink whose quantized group gives the
    smallest output error over the tokens, computed here directly as ‖Xg·(Q(clamp(Wg)) − Wg)ᵀ‖² in float64."""
    torch.manual_seed(1)
    W, x = torch.randn(48, 96), outlier_inputs(300, 96)
    W[:, 7] *= 6
    Q = lambda w: grids.fake_quantize(w, 4, False, 32)  # noqa: E731
    m = search_clip(W, x, Q, 32, n_grid=20, row_batch=16)
    Wg, Xg = W.reshape(48, 3, 32), x.double().reshape(300, 3, 32)
    org = Wg.abs().amax(-1)
    errors = []
    for i in range(10):
        c = org * (1 - i / 20)
        Wq = Q(torch.clamp(Wg, -c[..., None], c[..., None]).reshape(48, 96)).reshape(48, 3, 32)
        errors.append(torch.einsum("tgc,rgc->rgt", Xg, (Wq - Wg).double()).pow(2).sum(-1))  # [rows, groups]
    best = torch.stack(errors).argmin(0)
    shrunk = torch.stack([org * (1 - i / 20) for i in range(10)])
    assert torch.equal(m, shrunk.gather(0, best[None])[0])
    assert (best > 0).any()  # some groups clip


def test_scaled_model_is_the_same_function(tiny_model):
    """Scales folded, nothing quantized or clipped: the fp32 model gives the original logits."""
    method = AwqMethod(name="awq", bits=4, group_size=64, clip=False, export="scaled-fp16")
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(3, 512, (4, 64), generator=g)
    rows = LLAMA.awq
    scaled = {}

    def process(i, layer, acts):
        awq_layer(i, layer, acts, rows, method, lambda name, cols: 64, lambda name: False, {}, [], quantize=False)

    for i, layer in stream_layers(tiny_model, calib, process):
        scaled.update({f"model.layers.{i}.{k}": v.clone() for k, v in layer.state_dict().items()})
    model = load_model(tiny_model, "float32")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    norm = "model.layers.0.input_layernorm.weight"
    assert (scaled[norm] - original[norm]).abs().max() > 1e-3  # the scales really moved
    ids = torch.randint(3, 512, (2, 96), generator=g)
    with torch.no_grad():
        before = model(ids).logits
        model.load_state_dict(scaled, strict=False)
        after = model(ids).logits
    diff = (after - before).abs().max().item()
    print(f"max |Δlogit| after folding: {diff:.3g}")
    assert diff < 1e-4


def test_streamed_awq_beats_rtn_and_reloads(tiny_model, tmp_path):
    methods = [{"name": "rtn", "bits": 4, "group_size": 64, "sym": False},
               {"name": "awq", "bits": 4, "group_size": 64},
               {"name": "awq", "bits": 4, "group_size": 64, "sym": True}]
    out = tmp_path / "a"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), methods, out,
                                      calibration={"samples": 16, "seq_len": 128}))
    pipeline.run(recipe)
    results = json.loads((out / "results.json").read_text())["variants"]
    kld = {n: v["perplexity"]["kld"]["mean"] for n, v in results.items()}
    assert kld["awq-w4-asym-g64"] < kld["rtn-w4-asym-g64"]
    folder = out / "awq-w4-sym-g64"
    assert results["awq-w4-sym-g64"]["loader"] == "transformers.from_pretrained"
    log = [json.loads(line) for line in (folder / "quantize-log.jsonl").read_text().splitlines()]
    assert len(log) == 2 * 7 and all(r["samples"] == 16 for r in log)
    # every linear got a searched scale but o_proj: v → o is skipped, GQA makes v narrower than o's input
    assert {r["module"] for r in log if r["alpha"] is None} == {"self_attn.o_proj"}
    ids = load_tokenizer(folder)("The history of the city", return_tensors="pt").input_ids
    with torch.no_grad():
        a = load_model(folder, "float32")(ids).logits
        b = compressed_tensors.load_dense(folder)(ids).logits
    assert (a - b).abs().max().item() < 1e-4


def test_pack_roundtrip_and_awq_order():
    from quantize.formats.classic import AWQ_ORDER, pack, unpack

    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (6, 16), generator=g, dtype=torch.int32)
    for dim, order in [(0, None), (1, None), (1, AWQ_ORDER)]:
        assert torch.equal(unpack(pack(q.T if dim == 0 else q, 4, dim, order), 4, dim, order), q.T if dim == 0 else q)
    word = pack(torch.arange(8, dtype=torch.int32)[None], 4, 1, AWQ_ORDER)  # AutoAWQ: nibble j ← column ORDER[j]
    assert int(word) & 0xFFFFFFFF == 0x75316420  # columns 0..7 → nibbles 0,2,4,6,1,3,5,7 (AutoAWQ's order_map)


def test_classic_layouts_hold_the_same_weights(tiny_model, tmp_path):
    """The same AWQ / GPTQ result written as compressed-tensors and as the classic `awq` / `gptq` layouts
    dequantizes to the same weights; the configs say what GPTQModel and transformers read."""
    from quantize.formats import classic

    methods = [{"name": "awq", "bits": 4, "group_size": 64, "variant": "ct"},
               {"name": "awq", "bits": 4, "group_size": 64, "format": "awq"},
               {"name": "gptq", "bits": 4, "group_size": 64, "format": "gptq"},
               {"name": "gptq", "bits": 4, "group_size": 64, "variant": "gptq-ct"},
               {"name": "rtn", "bits": 4, "group_size": 64, "sym": False, "format": "gptq"},
               {"name": "rtn", "bits": 4, "group_size": 64, "sym": False, "variant": "rtn-ct"}]
    out = tmp_path / "c"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), methods, out,
                                      calibration={"samples": 8, "seq_len": 64}, eval={"kld": False,
                                      "perplexity": {"n_ctx": 64, "max_chunks": 1}, "speed": {"enabled": False}}))
    pipeline.run(recipe)
    ids = load_tokenizer(out / "ct")("The history of the city", return_tensors="pt").input_ids
    with torch.no_grad():
        for ct, layout in [("ct", "awq-w4-asym-g64-awq"), ("gptq-ct", "gptq-w4-sym-g64-gptq"),
                            ("rtn-ct", "rtn-w4-asym-g64-gptq")]:
            a = load_model(out / ct, "float32") if ct == "gptq-ct" else compressed_tensors.load_dense(out / ct)
            b = classic.load_dense(out / layout)
            assert (a(ids).logits - b(ids).logits).abs().max().item() < 1e-4
    qc = json.loads((out / "awq-w4-asym-g64-awq" / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["lm_head"]}
    qc = json.loads((out / "gptq-w4-sym-g64-gptq" / "quantize_config.json").read_text())
    assert (qc["quant_method"], qc["checkpoint_format"], qc["sym"], qc["desc_act"]) == ("gptq", "gptq", True, False)
    qc = json.loads((out / "rtn-w4-asym-g64-gptq" / "quantize_config.json").read_text())
    assert (qc["checkpoint_format"], qc["sym"]) == ("gptq_v2", False)


def test_awq_layer_returns_the_layers_full_precision_output(tiny_model):
    """awq_layer quantizes the layer and, asked to, returns its output before any change (the pass that captured its
    inputs): the next layer's inputs under `propagate: full-precision`."""
    calib = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(2))
    method = AwqMethod(name="awq", bits=4, group_size=64, n_grid=4)
    seen = {}

    def process(i, layer, acts):
        seen["expected"] = acts.run(copy.deepcopy(layer))
        seen["out"] = awq_layer(i, layer, acts, LLAMA.awq, method, lambda name, cols: 64, lambda name: False, {}, [],
                                keep_output=True)
        seen["after"] = acts.run(layer)

    for _ in stream_layers(tiny_model, calib, process):
        break
    assert torch.equal(seen["out"], seen["expected"])
    assert not torch.allclose(seen["after"], seen["expected"], atol=1e-4)  # the layer was quantized


def test_propagate_full_precision_feeds_each_layer_the_full_precision_outputs(tiny_model, tmp_path):
    """The build's log: layer 0 decides the same either way; from layer 1 on, `propagate: full-precision` judges on
    the full-precision model's activations (the same as when layer 0 is left unquantized), `quantized` on
    activations that went through the quantized layer 0."""
    calib = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(3))
    base = resolve_model(str(tiny_model))

    def log(tag, **options):
        out = tmp_path / tag
        out.mkdir()
        METHODS["awq"].build(AwqMethod(name="awq", bits=4, group_size=64, n_grid=4, **options), base, out, calib)
        rows = [json.loads(line) for line in (out / "quantize-log.jsonl").read_text().splitlines()]
        return {(r["layer"], r["module"]): (r["alpha"], r["scale_loss_rtn"]) for r in rows if r["alpha"] is not None}

    quantized = log("q")
    full = log("fp", propagate="full-precision")
    skip0 = log("skip0", propagate="full-precision", ignore=["lm_head", r"model\.layers\.0\."])
    assert {k: v for k, v in quantized.items() if k[0] == 0} == {k: v for k, v in full.items() if k[0] == 0}
    later = [k for k in full if k[0] > 0]
    assert later and all(full[k] == skip0[k] for k in later)
    assert any(full[k][1] != quantized[k][1] for k in later)


def first_layer_log(model, calib, method, before=None) -> dict:
    """awq_layer's log of the first decoder layer (group size 64, nothing ignored), by module; `before(layer,
    acts)` runs on the layer as it comes, before AWQ."""
    log = []

    def process(i, layer, acts):
        if before is not None:
            before(layer, acts)
        awq_layer(i, layer, acts, LLAMA.awq, method, lambda name, cols: 64, lambda name: False, {}, log)

    for i, _ in stream_layers(model, calib, process):
        break
    return {r["module"]: r for r in log}


def rtn_error(acts, block, linears, x) -> float:
    """Mean squared error of block(x) with `linears` rounded to nearest (4-bit asym g64, s = 1) against full
    precision; the linears are left as they came."""
    fp = acts.forward(block, x)
    originals = [lin.weight.data.clone() for lin in linears]
    for lin, W in zip(linears, originals):
        lin.weight.data = grids.fake_quantize(W, 4, False, 64)
    error = float((acts.forward(block, x) - fp).pow(2).mean())
    for lin, W in zip(linears, originals):
        lin.weight.data = W
    return error


def test_search_samples_judges_alpha_on_evenly_spaced_sequences(tiny_model):
    """With search_samples: k, the scale search's loss for a block with attention is the block's output error on k
    evenly spaced calibration sequences (here 0, 4, 7 of 8), not on all of them; k ≥ samples is the full search."""
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(3, 512, (8, 64), generator=g)
    calib[[0, 4, 7]] = torch.randint(3, 12, (3, 64), generator=g)  # the judged sequences: other statistics
    expected = {}

    def rtn_errors(layer, acts):  # the RTN (s = 1) error of q/k/v, on the subset and on every sequence
        x = acts.capture(layer, ["self_attn.q_proj"])[0]["self_attn.q_proj"]
        linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
        for part, xs in (("subset", x[[0, 4, 7]]), ("all", x)):
            expected[part] = rtn_error(acts, layer.self_attn, linears, xs)

    method = lambda **kw: AwqMethod(name="awq", bits=4, group_size=64, n_grid=4, **kw)  # noqa: E731
    subset = first_layer_log(tiny_model, calib, method(search_samples=3), rtn_errors)
    q = subset["self_attn.q_proj"]
    assert q["search_samples"] == 3 and q["samples"] == 8
    assert abs(expected["subset"] - expected["all"]) > 0.05 * expected["all"]  # the subset is really another loss
    assert abs(q["scale_loss_rtn"] - expected["subset"]) < 1e-5 * expected["subset"]
    full = first_layer_log(tiny_model, calib, method(search_samples=None))
    assert abs(full["self_attn.q_proj"]["scale_loss_rtn"] - expected["all"]) < 1e-5 * expected["all"]
    every = first_layer_log(tiny_model, calib, method(search_samples=8))
    drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "search_samples")}  # noqa: E731
    assert all(drop(every[n]) == drop(full[n]) for n in full)


def test_search_tokens_judges_per_token_blocks_on_tokens_spread_over_every_sequence(tiny_model):
    """A block that treats each token alone (the MLP; down, one linear) is judged on `search_tokens` tokens evenly
    spaced over all calibration sequences (here every 5th of 8 × 64), against its full-precision output from the
    layer's capture pass; null judges it on every token."""
    g = torch.Generator().manual_seed(2)
    calib = torch.randint(3, 512, (8, 64), generator=g)
    calib.view(-1)[::5] = torch.randint(3, 12, (103,), generator=g)  # the judged tokens: other statistics
    expected = {}

    def rtn_errors(layer, acts):  # the RTN (s = 1) errors of gate/up (through the MLP) and of down
        seen, _, _ = acts.capture(layer, ["mlp.gate_proj", "mlp.down_proj"])
        mlp = layer.mlp
        for part, pick in (("spread", lambda t: t.reshape(-1, t.shape[-1])[::5][None]), ("all", lambda t: t)):
            expected["mlp", part] = rtn_error(acts, mlp, [mlp.gate_proj, mlp.up_proj], pick(seen["mlp.gate_proj"]))
            expected["down", part] = rtn_error(acts, mlp.down_proj, [mlp.down_proj], pick(seen["mlp.down_proj"]))

    method = lambda **kw: AwqMethod(name="awq", bits=4, group_size=64, n_grid=4, **kw)  # noqa: E731
    spread = first_layer_log(tiny_model, calib, method(search_tokens=100), rtn_errors)
    every = first_layer_log(tiny_model, calib, method(search_tokens=None))
    for block, module in (("mlp", "mlp.gate_proj"), ("down", "mlp.down_proj")):
        assert abs(expected[block, "spread"] - expected[block, "all"]) > 1e-3 * expected[block, "all"]  # another loss
        for part, log in (("spread", spread), ("all", every)):
            assert abs(log[module]["scale_loss_rtn"] - expected[block, part]) < 1e-5 * expected[block, part]
    assert spread["mlp.gate_proj"]["search_tokens"] == 100 and every["mlp.gate_proj"]["search_tokens"] is None


def test_blocked_causal_attention_is_sdpa_attention():
    """AWQ's forwards attend block by block of queries (activations.causal_blocks): on a 200-token causal pass with
    grouped-query heads the attention's output is sdpa's to float rounding; a masked pass goes to sdpa itself; the
    config's implementation is restored after."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from quantize.methods.activations import BLOCKED, causal_blocks, causal_attention_mask

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                         num_hidden_layers=1, attn_implementation="sdpa")
    torch.manual_seed(0)
    layer = torch.nn.ModuleDict({"self_attn": LlamaAttention(config, 0)})
    x = torch.randn(2, 200, 64)
    positions = LlamaRotaryEmbedding(config)(x, torch.arange(200)[None])
    attend = lambda mask=None: layer["self_attn"](x, attention_mask=mask, position_embeddings=positions)[0]  # noqa: E731
    mask = causal_attention_mask(200, 50, "cpu")
    with torch.no_grad():
        expected, expected_masked = attend(), attend(mask)
        with causal_blocks(layer):
            assert config._attn_implementation == BLOCKED
            blocked, masked = attend(), attend(mask)
    assert config._attn_implementation == "sdpa"
    assert torch.allclose(blocked, expected, rtol=1e-5, atol=1e-6) and not torch.equal(blocked, expected)
    assert torch.equal(masked, expected_masked)
