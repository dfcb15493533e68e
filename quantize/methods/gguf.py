"""GGUF: the llama.cpp / Ollama / LM Studio artefact.

    HF checkpoint ──gguf_convert──▶ F16 GGUF ──llama.cpp llama_model_quantize(type, imatrix)──▶ model.gguf

The k-quant mixes (which tensors get Q6_K in a Q4_K_M, …) are llama.cpp's own. The importance matrix is the
mean of x² per input column of every decoder linear over the recipe's calibration tokens, gathered with
forward hooks while the calibration activations stream through the base model layer by layer (one pass per
layer). It is written beside the model in llama.cpp's GGUF imatrix format (imatrix.gguf: `<tensor>.in_sum2`,
`<tensor>.counts`), so `llama-quantize --imatrix imatrix.gguf` reproduces the artefact. Beside model.gguf go an
Ollama Modelfile and a model card.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from quantize import gguf_convert, llamacpp
from quantize.layerwise import SEQUENTIAL_GROUPS, stream_layers
from quantize.models import load_tokenizer, unique_parameters

# nominal bits per weight of each type's main tensors (GGML block sizes), for `plan` before anything is built
NOMINAL_BPW = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K_M": 5.5, "Q5_K_S": 5.5,
               "Q4_K_M": 4.5, "Q4_K_S": 4.5, "Q3_K_L": 3.4375, "Q3_K_M": 3.4375, "Q3_K_S": 3.4375, "Q2_K": 2.625}
DIRECT = {"F32", "F16", "BF16"}  # written by the converter itself; every other type goes through llama.cpp

# Chat templates Ollama needs in its own Go-template syntax, keyed by a marker of the Jinja template.
OLLAMA_TEMPLATES = {
    "<|im_start|>": ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                     '<|im_start|>assistant\n', ["<|im_end|>"]),
    "<|start_header_id|>": ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                            '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
                            ["<|eot_id|>"]),
}


_IMATRIX_CACHE: dict[tuple[str, int], tuple[dict[str, torch.Tensor], int]] = {}  # variants of one run share it


def importance_matrix(base_path: Path, calib: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """HF linear weight name → Σx² per input column, and the number of tokens behind each sum."""
    key = (str(base_path), hash(calib.numpy().tobytes()))
    if key not in _IMATRIX_CACHE:
        _IMATRIX_CACHE.clear()  # keep one: the sums are as large as the model's input columns
        _IMATRIX_CACHE[key] = _importance_matrix(base_path, calib)
    return _IMATRIX_CACHE[key]


def _importance_matrix(base_path: Path, calib: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def accumulate(name, module, inputs, output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        sums[name] = sums.get(name, 0) + (x * x).sum(0)

    linears = [n for group in SEQUENTIAL_GROUPS[base_config(base_path)["model_type"]] for n in group]

    def process(i, layer, acts):  # hooks see the propagation pass stream_layers makes after this
        for n in linears:
            name = f"model.layers.{i}.{n}.weight"
            hooks.append(layer.get_submodule(n).register_forward_hook(
                lambda m, inp, out, name=name: accumulate(name, m, inp, out)))

    for _ in stream_layers(base_path, calib, process):
        for h in hooks:
            h.remove()
        hooks.clear()
    return sums, int(calib.numel())


def base_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def write_imatrix(path: Path, sums: dict[str, np.ndarray], tokens: int, dataset: str, chunks: int,
                  chunk_size: int) -> None:
    """llama.cpp's GGUF imatrix file (tools/imatrix): per tensor `.in_sum2` [1, n_cols] and `.counts` [1, 1]."""
    import gguf

    writer = gguf.GGUFWriter(path, arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [dataset])
    writer.add_uint32("imatrix.chunk_count", chunks)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name, in_sum2 in sorted(sums.items()):
        writer.add_tensor(f"{name}.in_sum2", np.asarray(in_sum2, dtype=np.float32)[None])
        writer.add_tensor(f"{name}.counts", np.array([[tokens]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def modelfile(tokenizer, gguf_name: str) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    lines = [f"FROM ./{gguf_name}"]
    for marker, (go_template, stops) in OLLAMA_TEMPLATES.items():
        if marker in template:
            lines.append(f'TEMPLATE """{go_template}"""')
            lines += [f'PARAMETER stop "{s}"' for s in stops]
            break
    else:
        lines.append("# chat template: none recognised; Ollama reads tokenizer.chat_template from the GGUF")
        if tokenizer.eos_token:
            lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    return "\n".join(lines) + "\n"


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


def gguf_stats(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    return {"bytes": n_bytes, "params": n_params, "bits_per_weight": 8 * n_bytes / n_params,
            "tensor_types": dict(sorted({t.tensor_type.name: 0 for t in reader.tensors}.items()))
            | {k: sum(1 for t in reader.tensors if t.tensor_type.name == k)
               for k in {t.tensor_type.name for t in reader.tensors}}}


def build(method, base, out_dir: Path, calib: torch.Tensor | None, calib_info: dict | None = None) -> dict:
    lib = llamacpp.binding()
    target = out_dir / "model.gguf"
    info: dict = {"format": "gguf", "type": method.type, "llama_cpp_python": lib.__version__}
    work = out_dir / "work"
    work.mkdir()
    source_model = base
    if method.awq_scales:  # AWQ-scaled, clipped, unquantised fp16 checkpoint; llama.cpp quantizes that
        from quantize.methods import awq
        from quantize.recipe import AwqMethod

        scaled = work / "awq-scaled"
        scaled.mkdir()
        awq_method = AwqMethod(name="awq", bits=4, group_size=32, sym=False, export="scaled-fp16",
                               on_indivisible="channel")
        awq.build(awq_method, base, scaled, calib)
        source_model = type(base)(base.spec, scaled, base.origin)
        info["awq_scales"] = awq_method.model_dump(mode="json")
    if method.type in DIRECT:
        gguf_convert.convert(source_model.path, target, method.type, name=base.path.name)
    else:
        source = gguf_convert.convert(source_model.path, work / "base-f16.gguf", "F16", name=base.path.name)
        imatrix, metadata = None, {}
        if method.use_imatrix:
            sums, tokens = importance_matrix(source_model.path, calib)
            config = base_config(base.path)
            names = gguf_convert.tensor_names(gguf_convert.ARCHES[config["model_type"]], config["num_hidden_layers"])
            sums = {names.get_name(k, try_suffixes=(".weight",)): v.numpy() for k, v in sums.items()}
            dataset = (calib_info or {}).get("source", "calibration")
            write_imatrix(out_dir / "imatrix.gguf", sums, tokens, dataset, int(calib.shape[0]), int(calib.shape[1]))
            imatrix = {k: v / tokens for k, v in sums.items()}  # in_sum2 / counts, as llama-quantize reads it
            metadata = {"quantize.imatrix.file": "imatrix.gguf", "quantize.imatrix.dataset": dataset,
                        "quantize.imatrix.entries_count": len(imatrix),
                        "quantize.imatrix.chunks_count": int(calib.shape[0])}
            info["imatrix"] = {"dataset": dataset, "chunks": int(calib.shape[0]), "chunk_size": int(calib.shape[1]),
                               "entries": len(imatrix), "tokens": tokens}
        llamacpp.quantize(source, target, method.type, imatrix, metadata, pure=method.pure)
    shutil.rmtree(work)
    info.update(gguf_stats(target))
    tokenizer = load_tokenizer(base.path)
    (out_dir / "Modelfile").write_text(modelfile(tokenizer, target.name))
    (out_dir / "README.md").write_text(model_card(method, base, info))
    return info


def estimate_bytes(method, meta_model) -> int:
    """Plan-time estimate: llama.cpp's own mix for Q4_K_M / Q8_0 / F16 (footprint.py, the same figures as
    `quantize fit`); for the other types every 2-D weight at the type's main bits per weight, 1-D tensors F32."""
    from quantize import footprint

    if method.type.lower() in footprint.WEIGHT_FORMATS:
        return footprint.weight_bytes(footprint.param_counts(meta_model.config.to_dict()), method.type.lower())
    total = 0
    for _, _, _, p in unique_parameters(meta_model):
        total += p.numel() * (4 if p.dim() == 1 else NOMINAL_BPW[method.type] / 8)
    return int(total)
