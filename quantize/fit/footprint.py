"""How many bytes a model's weights take in a given format, from its shape alone (no weights read), and the
shape of a model from wherever it is described: a config.json (local, or a hub id's when online) or a GGUF
header. `quantize fit` uses this for models the user has not downloaded or built yet.

Parameter counts come from shape.py; weight bytes per format follow the format's block layout:

    fp16 / bf16   2 bytes per parameter
    int8          W8A16 per channel: 1 byte per linear weight + an fp16 scale per output row; rest fp16
    int4          W4A16 group 128 symmetric (compressed-tensors, GPTQ/AWQ sym): 4 + 16/128 bits per linear
                  weight; embeddings and lm_head fp16
    q8_0          llama.cpp Q8_0: 34 bytes per 32 weights for every 2-D tensor, norms F32
    q4_k_m        llama.cpp's Q4_K_M mix (llama-quant.cpp): Q4_K (4.5 bits) everywhere, Q6_K (6.5625 bits) for
                  output.weight and for attn_v / ffn_down in the layers `use_more_bits` picks, with llama.cpp's
                  fallbacks for rows not a multiple of 256 (q4_k_m_tensors); norms and MoE router F32
"""

from __future__ import annotations

from types import SimpleNamespace

from pathlib import Path

import torch

from quantize.common.errors import QuantizeError
from quantize.common.files import check_checkpoint, check_gguf, read_json
from quantize.fit.shape import ParamCounts, param_counts, shape_and_counts, shape_config_from_gguf
from quantize.formats.compressed_tensors import STORAGE_DTYPE
from quantize.formats.gguf_types import K_QUANT_BLOCK, K_QUANT_FALLBACK, bits_per_weight, nominal_bits_per_weight
from quantize.formats.tensors import weight_bytes_gguf, weight_bytes_safetensors
from quantize.sources.models import hub_config_and_bytes, ignored, is_hub_id, unique_parameters

WEIGHT_FORMATS = ("fp16", "bf16", "int8", "int4", "q8_0", "q4_k_m")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp (llama-quant.cpp): the first and last eighth of the layers and every third one between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def weight_bytes(counts: ParamCounts, fmt: str) -> int:
    """Bytes of all weights in `fmt` (see the module docstring for each format's layout)."""
    if fmt not in WEIGHT_FORMATS:
        raise QuantizeError(f"unknown weight format {fmt!r}; accepted: {', '.join(WEIGHT_FORMATS)}")
    c = counts
    moe = c.n_experts * sum(c.mlp_per_expert.values()) + sum((c.shared_mlp or {}).values())
    linears = (c.attention_total + c.n_dense_layers * sum((c.dense_mlp or {}).values())
               + c.n_moe_layers * moe)  # quantized linears in the decoder layers
    edges = c.embedding + c.lm_head
    small = c.norms + c.n_moe_layers * c.router
    if fmt in ("fp16", "bf16"):
        return 2 * c.total
    if fmt == "int8":  # + an fp16 scale per output row of every linear
        return linears + 2 * c.linear_rows + 2 * (edges + small)
    if fmt == "int4":
        return int(linears * (4 + 16 / 128) / 8) + 2 * (edges + small)
    if fmt == "q8_0":  # every 2-D tensor Q8_0 but the MoE router, which llama.cpp keeps F32
        return int((linears + edges) * bits_per_weight("Q8_0") / 8) + 4 * small
    return int(sum(n * bits_per_weight(kind) for n, kind in q4_k_m_tensors(c)) / 8) + 4 * small


def q4_k_m_tensors(c: ParamCounts):
    """(parameters, GGML type) of every quantized tensor under llama.cpp's Q4_K_M mix (llama-quant.cpp):
    Q4_K, with Q6_K for attn_v and ffn_down in the layers use_more_bits picks and for the output (a tied
    embedding takes the output's type), Q5_K attn_output with 8 experts; rows (input columns) not a multiple of
    256 take the fallback type. A hybrid model's full and linear-attention tensors are spread over all layers in
    proportion (use_more_bits sees the layer index, not the kind). With shared experts or leading dense layers (DeepSeek), every ffn_down of a
    picked layer counts as picked (llama.cpp counts the ffn_down tensors, so its pick can differ by a layer)."""
    hidden = c.embedding // c.vocab

    def typed(n, cols, kind):
        return n, (K_QUANT_FALLBACK[kind] if cols % K_QUANT_BLOCK else kind)

    for i in range(c.n_layers):
        more = use_more_bits(i, c.n_layers)
        for part, n in c.attn.items():
            kind = "Q6_K" if part == "v" and more else "Q5_K" if part == "o" and c.n_experts == 8 else "Q4_K"
            yield typed(n * (c.n_layers - c.n_linear_layers) // c.n_layers, c.attn_columns[part], kind)
        for part, n in (c.linear_attn or {}).items():  # the layer's in_proj_qkv is llama.cpp's attn_qkv: Q5_K
            kind = "Q5_K" if part == "in_qkv" else "Q4_K"
            yield typed(n * c.n_linear_layers // c.n_layers, c.linear_attn_columns[part], kind)
        down = "Q6_K" if more else "Q4_K"
        if i < c.n_dense_layers:
            mlps = [(1, c.dense_mlp)]
        else:
            mlps = [(c.n_experts, c.mlp_per_expert)] + ([(1, c.shared_mlp)] if c.shared_mlp else [])
        for count, mlp in mlps:
            yield typed(count * (mlp["gate"] + mlp["up"]), hidden, "Q4_K")
            yield typed(count * mlp["down"], mlp["down"] // hidden, down)
    if c.lm_head:
        yield typed(c.embedding, hidden, "Q4_K")
        yield typed(c.lm_head, hidden, "Q6_K")
    else:
        yield typed(c.embedding, hidden, "Q6_K")


def describe_model(spec: str, fmt: str | None) -> dict:
    """Shape, parameter counts and weight bytes of MODEL for `quantize fit`, without loading weights:
    a GGUF (header: measured tensor bytes), a local HF directory or config.json (measured safetensors bytes if
    present and no format asked), or a hub id (config.json only, needs a network)."""
    import json

    path = Path(spec).expanduser()
    measured = None
    if path.suffix == ".gguf" and path.is_file():
        check_gguf(path)
        cfg = shape_config_from_gguf(path)
        measured, source = sum(weight_bytes_gguf(path).values()), "GGUF tensor infos"
    elif path.is_file() and path.name.endswith(".json"):
        cfg, source = read_json(path, "a Hugging Face config.json"), "config.json"
    elif path.is_dir() and (path / "config.json").is_file():
        cfg, source = read_json(path / "config.json", "a Hugging Face config.json"), "config.json"
        if any(path.glob("*.safetensors")):
            check_checkpoint(path)
            measured = sum(weight_bytes_safetensors(path).values())
    elif is_hub_id(spec):
        cfg, measured = hub_config_and_bytes(spec)
        measured, source = sum(measured.values()), f"hub config.json and safetensors headers of {spec}"
    else:
        raise QuantizeError(f"model {spec}: not a .gguf file, a config.json, an HF directory or a hub id")
    try:
        shape, counts = shape_and_counts(cfg)
    except QuantizeError as exc:  # named by the file it came from
        raise QuantizeError(f"{spec}: {exc}") from None
    if fmt is not None:
        weights, how = weight_bytes(counts, fmt), f"estimated for {fmt} from the parameter counts"
    elif measured is not None:
        weights, how = measured, f"measured from {'the GGUF' if path.suffix == '.gguf' else 'safetensors headers'}"
    else:
        weights, how = weight_bytes(counts, "fp16"), "estimated for fp16 (no weights here; pass --weights)"
    active_fraction = counts.active / counts.total
    return {"shape": shape, "counts": counts, "weights_bytes": weights, "weights_how": how, "source": source,
            "active_weight_bytes": int(weights * active_fraction)}


# ---- the expected artefact size of a recipe's method, for `quantize plan` (no weights read) ----------------------
def weight_only_bytes(method, meta_model: torch.nn.Module) -> int:
    """W{b}A16 (RTN, GPTQ, AWQ): bits/8 per quantized weight + an fp16 scale (and packed zero) per group, MLX an
    fp16 scale and bias per group; everything else fp16."""
    total = 0
    for name, module, pname, p in unique_parameters(meta_model):
        quantized = (isinstance(module, torch.nn.Linear) and pname == "weight" and ".layers." in name
                     and not ignored(name, method.ignore))
        if not quantized:
            total += p.numel() * STORAGE_DTYPE.itemsize
            continue
        rows, cols = p.shape
        bits, gs = method.scheme_for(name)
        gs = gs if gs != -1 and cols % gs == 0 else cols
        groups = rows * (cols // gs)
        zeros = groups * STORAGE_DTYPE.itemsize if method.format == "mlx" else 0 if method.sym else groups * bits // 8
        total += rows * cols * bits // 8 + groups * STORAGE_DTYPE.itemsize + zeros
    return total


def int8_bytes(method, meta_model: torch.nn.Module) -> int:
    """1 byte per quantized weight plus one scale per output row (fp16 for w8a16 and w8a8, fp32 `SCB` for bitsandbytes);
    everything else fp16."""
    scale_bytes = 4 if method.scheme == "llm.int8" else 2
    total = 0
    for name, module, pname, p in unique_parameters(meta_model):
        if isinstance(module, torch.nn.Linear) and pname == "weight" and not ignored(name, method.ignore):
            total += p.numel() + p.shape[0] * scale_bytes
        else:
            total += p.numel() * STORAGE_DTYPE.itemsize
    return total


def awq_bytes(method, meta_model: torch.nn.Module) -> int:
    if method.export == "scaled-fp16":  # the scaled but unquantized model
        return sum(p.numel() * 2 for *_, p in unique_parameters(meta_model))
    return weight_only_bytes(method, meta_model)


def gguf_bytes(method, meta_model: torch.nn.Module) -> int:
    """llama.cpp's own mix for Q4_K_M / Q8_0 / F16 (weight_bytes, the same figures as `quantize fit`); for the
    other mixes every 2-D weight at the mix's main bits per weight, 1-D tensors F32."""
    if method.type.lower() in WEIGHT_FORMATS:
        return weight_bytes(param_counts(meta_model.config.to_dict()), method.type.lower())
    total = 0
    for _, _, _, p in unique_parameters(meta_model):
        total += p.numel() * (4 if p.dim() == 1 else nominal_bits_per_weight(method.type) / 8)
    return int(total)


def auto_bytes(method, meta_model: torch.nn.Module) -> int:
    """The budgeted mix weighs at most its budget; a GPU budget (known once the run resolves it): at most F16."""
    b = method.budget
    if b.mix:
        return gguf_bytes(SimpleNamespace(type=b.mix), meta_model)
    params = sum(p.numel() for *_, p in unique_parameters(meta_model))
    return b.bytes or (int(b.bpw * params / 8) if b.bpw else 2 * params)


def fp8_bytes(method, meta_model: torch.nn.Module) -> int:
    """1 byte per quantized weight (e4m3) plus a 16-bit scale per output row (dynamic, w8a16) or per 128 × 128
    block (block); everything else 16-bit."""
    total = 0
    for name, module, pname, p in unique_parameters(meta_model):
        if isinstance(module, torch.nn.Linear) and pname == "weight" and not ignored(name, method.ignore):
            rows, cols = p.shape
            scales = (-(-rows // 128)) * (-(-cols // 128)) if method.scheme == "block" else rows
            total += p.numel() + 2 * scales
        else:
            total += p.numel() * 2
    return total


def fp4_bytes(method, meta_model: torch.nn.Module) -> int:
    """NVFP4: half a byte per quantized weight, an e4m3 scale per 16 and a float32 global scale per linear;
    everything else 16-bit."""
    total = 0
    for name, module, pname, p in unique_parameters(meta_model):
        if isinstance(module, torch.nn.Linear) and pname == "weight" and not ignored(name, method.ignore):
            total += p.numel() // 2 + p.numel() // 16 + 4
        else:
            total += p.numel() * 2
    return total


EXPECTED_BYTES = {"int8": int8_bytes, "fp8": fp8_bytes, "fp4": fp4_bytes, "rtn": weight_only_bytes, "gptq": weight_only_bytes, "awq": awq_bytes,
                  "gguf": gguf_bytes, "auto": auto_bytes}


def expected_bytes(method, meta_model: torch.nn.Module) -> int:
    """The artefact's tensor bytes that `method` (a recipe's method config) will write, from the architecture."""
    return EXPECTED_BYTES[method.name](method, meta_model)
