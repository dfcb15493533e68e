"""Every mix llama.cpp's quantiser makes (k-quants, i-quants, legacy, Q1_0, MXFP4_MOE): our type table
(formats/gguf_types.py, llama-quant.cpp's rules) predicts, from the config alone, the GGML type of every tensor,
the file's bytes and which mixes llama.cpp refuses without an importance matrix, checked against the files
llama.cpp itself writes; the artefacts load and score on llama.cpp; the KV cache's cost is measured."""

import json

import gguf
import numpy as np
import pytest

from conftest import build_tiny_llama, write_recipe
from quantize import pipeline
from quantize.common.errors import QuantizeError
from quantize.fit.footprint import mix_bytes, mix_tensors
from quantize.fit.shape import param_counts
from quantize.formats import gguf_convert
from quantize.formats.gguf_types import MIXES, UNQUANTIZED, ftype, requires_imatrix
from quantize.recipe import load_recipe
from quantize.runtimes import llamacpp

QUANTIZED_MIXES = [m for m in MIXES if m not in UNQUANTIZED and m != "MXFP4_MOE"]
# the mixes whose rules read whether an importance matrix is given (IQ3_XXS, IQ4_NL/IQ4_XS, Q4_0/Q5_0's
# ffn_down), and the ones llama.cpp refuses without one
IMATRIX_DEPENDENT = ["IQ3_XXS", "IQ4_NL", "IQ4_XS", "Q4_0", "Q5_0", "IQ2_XS", "IQ1_S", "Q2_K_S", "IQ2_M"]


@pytest.fixture(scope="module", params=["gqa4-untied", "gqa2-tied"])
def f16_source(request, tmp_path_factory):
    """A 16-layer tiny Llama (16 layers so that llama.cpp's first/last-eighth rules pick layers) as an F16 GGUF,
    with a made-up importance matrix for every tensor (llama.cpp's rules only ask whether one is given)."""
    shape = ({"num_attention_heads": 8, "num_key_value_heads": 2} if request.param == "gqa4-untied"
             else {"tie_word_embeddings": True})
    folder = build_tiny_llama(tmp_path_factory.mktemp(request.param) / "m", num_hidden_layers=16, **shape)
    source = gguf_convert.convert(folder, folder.parent / "f16.gguf", "F16", name=request.param)
    rng = np.random.default_rng(0)
    imatrix = {t.name: rng.uniform(0.5, 2, int(t.shape[0])).astype(np.float32)
               for t in gguf.GGUFReader(source).tensors if len(t.shape) >= 2}
    return param_counts(json.loads((folder / "config.json").read_text())), source, imatrix


def test_type_table_is_llama_cpps(f16_source, tmp_path):
    """Tensor by tensor, every mix with an importance matrix and the imatrix-dependent ones without: the types
    llama.cpp writes are the types we predict at plan time, and so are the file's bytes; where we predict that
    llama.cpp refuses (a tensor needing an importance matrix), it refuses."""
    counts, source, imatrix = f16_source
    cases = [(m, True) for m in QUANTIZED_MIXES] + [(m, False) for m in IMATRIX_DEPENDENT]
    refused = []
    ids = list(np.random.default_rng(1).integers(3, 512, 64))  # the tiny model's vocabulary
    reference = score_on_llama_cpp(source, ids)
    kld = {}
    for mix, has_imatrix in cases:
        predicted = {name: kind for name, _, kind in mix_tensors(counts, mix, has_imatrix)}
        needs = any(requires_imatrix(name, kind, mix) for name, kind in predicted.items())
        target = tmp_path / f"{mix}.gguf"
        if needs and not has_imatrix:
            with pytest.raises(QuantizeError, match="could not quantize"):
                llamacpp.quantize(source, target, mix)
            refused.append(mix)
            continue
        llamacpp.quantize(source, target, mix, imatrix if has_imatrix else None)
        reader = gguf.GGUFReader(target)
        written = {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2}
        assert written == predicted, (mix, has_imatrix, {n: (predicted.get(n), written.get(n)) for n in written
                                                         if predicted.get(n) != written.get(n)})
        assert sum(int(t.n_bytes) for t in reader.tensors) == mix_bytes(counts, mix, has_imatrix), mix
        assert reader.fields["general.file_type"].contents() == ftype(mix)
        # loaded and scored on llama.cpp: next-token distributions against the F16 file's on the same tokens
        logp = score_on_llama_cpp(target, ids)
        kld[mix, has_imatrix] = float((reference.exp() * (reference - logp)).sum(-1).mean())
        assert np.isfinite(kld[mix, has_imatrix]) and kld[mix, has_imatrix] >= -1e-6, (mix, kld[mix, has_imatrix])
        target.unlink()
    assert refused == ["IQ3_XXS", "IQ2_XS", "IQ1_S", "Q2_K_S", "IQ2_M"]
    assert kld["Q8_0", True] < kld["Q4_K_M", True] < kld["IQ1_S", True], kld


def score_on_llama_cpp(path, ids):
    """Log-probabilities [len(ids), vocab] of a GGUF on llama.cpp (F32 cache, flash attention off), in float64."""
    import torch

    model = llamacpp.LlamaCppModel(path, n_ctx=len(ids), kv_type="F32")
    try:
        return torch.log_softmax(model.logits(ids).double(), -1)
    finally:
        model.close()


def test_new_mixes_built_scored_and_kv_cache_measured(tiny_model, tmp_path):
    """The gguf method with i-quants and a legacy mix (the importance matrix from the calibration data) through the
    pipeline: llama.cpp's file type in the header, scored on llama.cpp; eval.kv_cache scores each GGUF with
    each KV cache type and the report shows them."""
    methods = [{"name": "gguf", "type": "IQ4_XS"}, {"name": "gguf", "type": "IQ2_M"}, {"name": "gguf", "type": "Q4_0"}]
    out = tmp_path / "g"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", str(tiny_model), methods, out,
                                      calibration={"samples": 8, "seq_len": 128},
                                      eval={"perplexity": {"source": "bundled:wiki", "n_ctx": 128, "max_chunks": 4},
                                            "speed": {"enabled": False}, "kv_cache": ["f16", "q8_0", "q4_0"]}))
    pipeline.run(recipe)
    results = json.loads((out / "results.json").read_text())["variants"]
    assert set(results) == {"gguf-iq4_xs-imat", "gguf-iq2_m-imat", "gguf-q4_0"}
    for name, v in results.items():
        reader = gguf.GGUFReader(out / name / "model.gguf")
        assert reader.fields["general.file_type"].contents() == ftype(v["method"]["type"])
        assert set(v["kv_cache"]) == {"f16", "q8_0", "q4_0"}
        assert all("flash attention on" in e["loader"] for e in v["kv_cache"].values())
        memory = [v["kv_cache"][kv]["memory_bytes"]["4096"] for kv in ("f16", "q8_0", "q4_0")]
        assert memory[0] > memory[1] > memory[2]  # the fit's arithmetic per cache type
    kld = {n: v["perplexity"]["kld"]["mean"] for n, v in results.items()}
    assert kld["gguf-iq4_xs-imat"] < kld["gguf-iq2_m-imat"]
    types = {t.tensor_type.name for t in gguf.GGUFReader(out / "gguf-iq2_m-imat" / "model.gguf").tensors}
    assert "IQ2_S" in types  # IQ2_M's main type
    report = (out / "report.md").read_text()
    assert "## KV cache types (llama.cpp, flash attention on for every row)" in report
    assert "| gguf-iq2_m-imat | q4_0 |" in report


def test_kv_cache_cost_rises_with_its_compression(tmp_path):
    """On the bundled SmolLM2 (a real model: a random one's attention is too flat to feel its cache), its Q8_0
    GGUF scored with an f16, q8_0 and q4_0 KV cache against the same base: KLD f16 < q8_0 < q4_0."""
    from quantize.measure import scorecard
    from quantize.recipe import Eval
    from quantize.sources.models import resolve_model

    base = resolve_model("bundled:smollm2-135m")
    target = gguf_convert.convert(base.path, tmp_path / "q8_0.gguf", "Q8_0", name="smollm2")
    ev = Eval.model_validate({"perplexity": {"source": "bundled:wiki", "n_ctx": 512, "max_chunks": 4},
                              "speed": {"enabled": False}, "kv_cache": ["f16", "q8_0", "q4_0"]})
    result = scorecard.evaluate_artefact(target, "bundled:smollm2-135m", ev)
    kld = {kv: e["perplexity"]["kld"]["mean"] for kv, e in result["kv_cache"].items()}
    print("SmolLM2 Q8_0, KLD by KV cache type:", kld)
    assert kld["f16"] < kld["q8_0"] < kld["q4_0"]
