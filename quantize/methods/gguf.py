"""GGUF: the llama.cpp / Ollama / LM Studio artefact.

    HF checkpoint ──gguf_convert──▶ F16 GGUF ──llama.cpp llama_model_quantize(type, imatrix)──▶ model.gguf

The k-quant mixes (which tensors get Q6_K in a Q4_K_M, …) are llama.cpp's own. The importance matrix is the
mean of x² per input column of every decoder linear over the recipe's calibration tokens, gathered with
forward hooks while the calibration activations stream through the base model layer by layer (one pass per
layer). It is written beside the model in llama.cpp's GGUF imatrix format (imatrix.gguf: `<tensor>.in_sum2`,
`<tensor>.counts`), so `llama-quantize --imatrix imatrix.gguf` reproduces the artefact. The GGUF carries the chat template and the
`general.*` metadata LM Studio shows (gguf_metadata); beside it go an Ollama Modelfile (formats/ollama.py) and a
model card.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from quantize.formats import gguf_convert, ollama
from quantize.formats.gguf_types import UNQUANTIZED
from quantize.formats.tensors import gguf_stats
from quantize.methods import awq
from quantize.methods.configs import AwqMethod, GgufMethod
from quantize.methods.statistics import importance_matrix
from quantize.runtimes import llamacpp
from quantize.sources.models import load_tokenizer
from quantize.sources.shards import Shards

Config = GgufMethod

def imatrix_entries(sums: dict[str, torch.Tensor], counts: dict[str, int], names) -> dict[str, tuple]:
    """GGUF tensor name → (Σx² [n_mat, n_cols], tokens [n_mat, 1]) from the HF names' sums. n_mat is 1, or for a
    sparse MoE block's merged expert tensor (llama.cpp's ffn_{gate,up,down}_exps) the number of experts, each row
    from that expert's routed tokens (a row with no tokens: count 0, which llama.cpp reads as no data)."""
    merged: dict[str, dict[int, str]] = {}
    entries = {}
    for k in sums:
        m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(.*)", k)
        if m:
            merged.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = k
        else:
            entries[names.get_name(k, try_suffixes=(".weight",))] = (sums[k].numpy()[None], np.array([[counts[k]]]))
    for k, experts in merged.items():
        cols = sums[next(iter(experts.values()))].numel()
        n = max(experts) + 1
        in_sum2, tokens = np.zeros((n, cols)), np.zeros((n, 1))
        for e, name in experts.items():
            in_sum2[e], tokens[e] = sums[name].numpy(), counts[name]
        entries[names.get_name(k, try_suffixes=(".weight",))] = (in_sum2, tokens)
    return entries


def write_imatrix(path: Path, entries: dict[str, tuple], dataset: str, chunks: int, chunk_size: int) -> None:
    """llama.cpp's GGUF imatrix file (tools/imatrix): per tensor `.in_sum2` [n_mat, n_cols] and `.counts`
    [n_mat, 1] (n_mat: 1, or the experts of a merged expert tensor)."""
    import gguf

    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [dataset])
    writer.add_uint32("imatrix.chunk_count", chunks)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name, (in_sum2, tokens) in sorted(entries.items()):
        writer.add_tensor(f"{name}.in_sum2", np.asarray(in_sum2, dtype=np.float32))
        writer.add_tensor(f"{name}.counts", np.asarray(tokens, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_metadata(base) -> dict[str, str | int]:
    """The `general.*` keys LM Studio and llama.cpp's tools show: name, size label, licence, who quantized it, and
    the base model (with its hub address for hub models). The file type is written by the quantiser."""
    import gguf

    config = base.config
    shards = Shards(base.path)
    meta: dict[str, str | int] = {"general.type": "model", "general.quantized_by": "quantize",
                                  "general.base_model.count": 1, "general.base_model.0.name": base.name}
    if not any(config.get(k) for k in ("num_local_experts", "num_experts")):  # llama.cpp labels MoE models itself
        meta["general.size_label"] = gguf.size_label(sum(math.prod(shards.shape(n)) for n in shards.names()), 0, 0, 0)
    if base.license:
        meta["general.license"] = base.license
    if base.origin == "hub":
        meta["general.base_model.0.repo_url"] = f"https://huggingface.co/{base.spec}"
    return meta


def model_card(method, base, info: dict) -> str:
    imat = info.get("imatrix")
    imatrix_line = (f"from {imat['dataset']} ({imat['chunks']} chunks × {imat['chunk_size']} tokens), in imatrix.gguf"
                    if imat else "none")
    return "\n".join([
        f"# {base.path.name}: GGUF {method.type}", "",
        f"- base model: {base.describe()}",
        f"- type: {method.type} (llama.cpp's mix{', pure' if method.pure else ''}), quantized by llama.cpp's own "
        f"quantiser through llama-cpp-python {info['llama_cpp_python']}",
        f"- importance matrix: {imatrix_line}",
        f"- AWQ scales folded in before conversion: {'yes (4-bit asym g32 search + clipping)' if info.get('awq_scales') else 'no'}",
        f"- size: {info['bytes']} bytes of tensors, {info['bits_per_weight']:.3f} bits per weight over all tensors", "",
        "Run: `llama-cli -m model.gguf` · `ollama create NAME -f Modelfile` · LM Studio: load model.gguf.",
        "Quality and speed as measured by quantize: results.json beside this file.", ""])


def importance(model, source: Path, calib: torch.Tensor, calib_info: dict | None, out_dir: Path
               ) -> tuple[dict[str, np.ndarray], dict]:
    """The importance matrix of `model` (an HF checkpoint) over the calibration tokens, written to
    out_dir/imatrix.gguf, as llama.cpp's quantiser takes it (GGUF tensor name of `source` → mean x² per column),
    and its description (with the `quantize.imatrix.*` metadata llama-quantize writes, under "metadata")."""
    sums, counts = importance_matrix(model.path, calib)
    names = gguf_convert.tensor_names(gguf_convert.gguf_arch(source), model.config["num_hidden_layers"])
    entries = imatrix_entries(sums, counts, names)
    dataset = (calib_info or {}).get("source", "calibration")
    write_imatrix(out_dir / "imatrix.gguf", entries, dataset, int(calib.shape[0]), int(calib.shape[1]))
    # in_sum2 / counts per row, as llama-quantize reads the file (a row without tokens: ones, no weighting)
    imatrix = {k: np.where(t > 0, s / np.maximum(t, 1), 1.0).reshape(-1) for k, (s, t) in entries.items()}
    metadata = {"quantize.imatrix.file": "imatrix.gguf", "quantize.imatrix.dataset": dataset,
                "quantize.imatrix.entries_count": len(imatrix), "quantize.imatrix.chunks_count": int(calib.shape[0])}
    return imatrix, {"imatrix": {"dataset": dataset, "chunks": int(calib.shape[0]), "chunk_size": int(calib.shape[1]),
                                 "entries": len(imatrix), "tokens": int(calib.numel())}, "metadata": metadata}


def build(method: GgufMethod, base, out_dir: Path, calib: torch.Tensor | None, calib_info: dict | None = None
          ) -> dict:
    lib = llamacpp.binding()
    target = out_dir / "model.gguf"
    info: dict = {"format": "gguf", "type": method.type, "llama_cpp_python": lib.__version__}
    work = out_dir / "work"
    work.mkdir()
    source_model = base
    if method.awq_scales:  # AWQ-scaled, clipped, unquantised fp16 checkpoint; llama.cpp quantizes that
        scaled = work / "awq-scaled"
        scaled.mkdir()
        awq_method = AwqMethod(name="awq", bits=4, group_size=32, sym=False, export="scaled-fp16",
                               on_indivisible="channel", device=method.device)
        awq.build(awq_method, base, scaled, calib)
        source_model = type(base)(base.spec, scaled, base.origin)
        info["awq_scales"] = awq_method.model_dump(mode="json")
    metadata = gguf_metadata(base)  # kept by llama.cpp's quantiser, which copies every key of its source
    if method.type in UNQUANTIZED:
        gguf_convert.convert(source_model.path, target, method.type, name=base.name, metadata=metadata)
    else:
        source = gguf_convert.convert(source_model.path, work / "base-f16.gguf", "F16", name=base.name,
                                      metadata=metadata)
        imatrix, metadata = None, {}
        if method.use_imatrix:
            imatrix, imatrix_info = importance(source_model, source, calib, calib_info, out_dir)
            metadata = imatrix_info.pop("metadata")
            info.update(imatrix_info)
        llamacpp.quantize(source, target, method.type, imatrix, metadata, pure=method.pure)
    shutil.rmtree(work)
    info.update(gguf_stats(target))
    tokenizer = load_tokenizer(base.path)
    num_ctx = min(method.num_ctx, base.config.get("max_position_embeddings") or method.num_ctx)
    (out_dir / "Modelfile").write_text(ollama.modelfile(tokenizer, base.path, target.name, num_ctx))
    (out_dir / "README.md").write_text(model_card(method, base, info))
    return info
