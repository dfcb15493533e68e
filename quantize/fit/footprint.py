"""How many bytes a model's weights take in a given format, from its shape alone (no weights read), and the
shape of a model from wherever it is described: a config.json (local, or a hub id's when online) or a GGUF
header. `quantize fit` uses this for models the user has not downloaded or built yet.

Parameter counts come from shape.py; weight bytes per format follow the format's block layout:

    fp16 / bf16   2 bytes per parameter
    int8          W8A16 per channel: 1 byte per linear weight + an fp16 scale per output row; rest fp16
    int4          W4A16 group 128 symmetric (compressed-tensors, GPTQ/AWQ sym): 4 + 16/128 bits per linear
                  weight; embeddings and lm_head fp16
    w4g32 … w8ch  the recipe's scheme names (budget.scheme): W{4,8}A16 symmetric, groups of 32/64/128 (an fp16
                  scale per group) or per channel (ch: an fp16 scale per output row); int4 = w4g128, int8 = w8ch
    q4_k_m, …     every llama.cpp mix (llama-quantize's names in lower case: q8_0, q4_k_m, iq4_xs, iq2_m, …): each
                  tensor at the GGML type llama.cpp's quantiser gives it (gguf_types.tensor_types, llama-quant.cpp's
                  rules and fallbacks; with an importance matrix where the gguf method makes one by default), over
                  the tensors the converter writes (gguf_tensors); norms and MoE routers F32
"""

from __future__ import annotations

from types import SimpleNamespace

from pathlib import Path

import torch

from quantize.common.errors import QuantizeError
from quantize.common.files import check_checkpoint, check_gguf, read_json
from quantize.fit.shape import ParamCounts, param_counts, shape_and_counts, shape_config_from_gguf
from quantize.formats.compressed_tensors import STORAGE_DTYPE
from quantize.formats.gguf_types import (IMATRIX_BY_DEFAULT, MIXES, MOE_ONLY, UNQUANTIZED, bits_per_weight,
                                        requires_imatrix, tensor_types)
from quantize.formats.mlx import is_mlx
from quantize.formats.tensors import weight_bytes_gguf, weight_bytes_safetensors
from quantize.sources.models import gguf_source, hub_config_and_bytes, ignored, is_hub_id, unique_parameters

# the GGUF mixes by llama-quantize's names in lower case; a mix's types follow llama.cpp with an importance matrix
# where the gguf method makes one by default
SCHEMES = tuple(f"w{b}{g}" for b in (4, 8) for g in ("g32", "g64", "g128", "ch"))
WEIGHT_FORMATS = (("fp16", "bf16", "int8", "int4") + SCHEMES
                  + tuple(m.lower() for m in MIXES if m not in UNQUANTIZED))


def weight_bytes(counts: ParamCounts, fmt: str) -> int:
    """Bytes of all weights in `fmt` (see the module docstring for each format's layout; any case)."""
    fmt = {"int4": "w4g128", "int8": "w8ch"}.get(fmt.lower(), fmt.lower())
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
    if fmt in SCHEMES:
        bits, group = int(fmt[1]), fmt[2:]
        if group == "ch":  # + an fp16 scale per output row of every linear
            return linears * bits // 8 + 2 * c.linear_rows + 2 * (edges + small)
        return int(linears * (bits + 16 / int(group[1:])) / 8) + 2 * (edges + small)
    return mix_bytes(c, fmt.upper(), has_imatrix=fmt.upper() in IMATRIX_BY_DEFAULT)


ATTENTION_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "q_a": "attn_q_a",
                   "q_b": "attn_q_b", "kv_a": "attn_kv_a_mqa", "kv_b": "attn_kv_b"}
LINEAR_ATTENTION_NAMES = {"in_qkv": "attn_qkv", "in_z": "attn_gate", "in_b": "ssm_beta", "in_a": "ssm_alpha",
                          "out": "ssm_out"}


def gguf_tensors(c: ParamCounts):
    """(GGUF name, parameters, columns, matrices) of every tensor llama.cpp's quantiser would quantize, in the
    order the converters write them: the embedding, each layer's attention and MLP (merged expert tensors hold
    `matrices` experts, shared experts `_shexp`), then an untied output. A hybrid model's linear-attention layers
    are placed as Qwen3.5 places them (every `n_layers / full layers`-th layer is full attention). MLA's kv_b is
    split per head into k_b and v_b, as llama.cpp's converter writes it."""
    hidden = c.embedding // c.vocab
    yield "token_embd.weight", c.embedding, hidden, 1
    n_full = c.n_layers - c.n_linear_layers
    every = c.n_layers // n_full if n_full else 0
    for i in range(c.n_layers):
        if c.n_linear_layers and (not every or (i + 1) % every):
            parts, names, columns = c.linear_attn, LINEAR_ATTENTION_NAMES, c.linear_attn_columns
        else:
            parts, names, columns = c.attn, ATTENTION_NAMES, c.attn_columns
        for part, n in parts.items():
            if part == "kv_b" and c.mla_heads:  # llama.cpp's converter: k_b [heads, kv_rank, nope], v_b [heads, v, kv_rank]
                heads, nope, v_dim = c.mla_heads
                yield f"blk.{i}.attn_k_b.weight", heads * nope * columns[part], nope, heads
                yield f"blk.{i}.attn_v_b.weight", heads * v_dim * columns[part], columns[part], heads
                continue
            yield f"blk.{i}.{names[part]}.weight", n, columns[part], 1
        if c.dense_layer(i) or c.n_experts == 1:
            mlps = [("", c.dense_mlp or c.mlp_per_expert, 1)]
        else:
            mlps = [("_exps", c.mlp_per_expert, c.n_experts)] + ([("_shexp", c.shared_mlp, 1)] if c.shared_mlp else [])
        for suffix, mlp, count in mlps:
            width = mlp["gate"] // hidden
            yield f"blk.{i}.ffn_gate{suffix}.weight", count * mlp["gate"], hidden, count
            yield f"blk.{i}.ffn_up{suffix}.weight", count * mlp["up"], hidden, count
            yield f"blk.{i}.ffn_down{suffix}.weight", count * mlp["down"], width, count
    if c.lm_head:
        yield "output.weight", c.lm_head, hidden, 1


def mix_tensors(c: ParamCounts, mix: str, has_imatrix: bool) -> list[tuple[str, int, str]]:
    """(GGUF name, parameters, GGML type) of every quantized tensor under llama.cpp's `mix`
    (gguf_types.tensor_types: llama-quant.cpp's rules and fallbacks)."""
    tensors = list(gguf_tensors(c))
    types = tensor_types(mix, [(name, cols, count) for name, _, cols, count in tensors], n_layer=c.n_layers,
                         n_gqa=c.n_gqa, n_expert=c.n_experts, has_imatrix=has_imatrix)
    return [(name, n, types[name]) for name, n, _, _ in tensors]


def check_mix(config: dict, mix: str, has_imatrix: bool) -> None:
    """Fail as llama.cpp's quantiser would, before any work: a mix that needs an importance matrix for some
    tensor (IQ1/IQ2, IQ3_XXS, Q2_K_S) without one, MXFP4_MOE on a dense model, rows no type can hold."""
    c = param_counts(config)
    if mix in MOE_ONLY and c.n_experts == 1:
        raise QuantizeError(f"type {mix} gives MoE expert tensors MXFP4 and every other tensor Q8_0; this "
                            f"{config.get('model_type')} model has no experts, so it would be Q8_0: use type Q8_0")
    try:
        tensors = mix_tensors(c, mix, has_imatrix)
    except ValueError as exc:
        raise QuantizeError(f"type {mix}: {exc}") from None
    if not has_imatrix:
        needs = [(name, kind) for name, _, kind in tensors if requires_imatrix(name, kind, mix)]
        if needs:
            raise QuantizeError(f"type {mix}: llama.cpp refuses to quantize {len(needs)} tensors of this model "
                                f"without an importance matrix (e.g. {needs[0][0]} at {needs[0][1]}); remove "
                                "`imatrix: false` (the importance matrix comes from the calibration data)")


def mix_bytes(c: ParamCounts, mix: str, has_imatrix: bool) -> int:
    """Bytes of a GGUF in llama.cpp's `mix`: the quantized tensors at their types, norms and MoE routers F32."""
    quantized = sum(n * bits_per_weight(kind) / 8 for _, n, kind in mix_tensors(c, mix, has_imatrix))
    return int(quantized) + 4 * (c.norms + c.n_moe_layers * c.router)


def describe_model(spec: str, fmt: str | None) -> dict:
    """Shape, parameter counts and weight bytes of MODEL for `quantize fit`, without loading weights:
    a GGUF (header: measured tensor bytes), a local HF directory or config.json (measured safetensors bytes if
    present and no format asked), or a hub id (config.json only, needs a network)."""
    import json

    path = Path(spec).expanduser()
    if spec.startswith("bundled:"):  # the bundled model is its GGUF file (the run's base is its dequantised form)
        path = gguf_source(spec)[0]
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
        raise QuantizeError(f"model {spec}: not a .gguf file, a config.json, an HF directory, bundled:NAME or a hub "
                            "id")
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
    # whose cache: llama.cpp runs GGUF weights (and its per-family window rule stands in for mlx-lm's); vLLM the rest
    gguf_weights = path.suffix == ".gguf" or (fmt is not None and fmt.upper() in MIXES)
    engine = "llama.cpp" if gguf_weights or is_mlx(cfg) else "vllm"
    return {"shape": shape, "counts": counts, "weights_bytes": weights, "weights_how": how, "source": source,
            "active_weight_bytes": int(weights * active_fraction), "engine": engine}


# ---- the expected artefact size of a recipe's method, for `quantize plan` (no weights read) ----------------------
def weight_only_bytes(method, meta_model: torch.nn.Module) -> int:
    """W{b}A16 (RTN, GPTQ, AWQ): bits/8 per quantized weight + an fp16 scale (and packed zero) per group, MLX an
    fp16 scale and bias per group; everything else fp16 (LiteRT: float32, and a float32 scale per 8-bit channel)."""
    total = 0
    litert = method.format == "litert"  # LiteRT keeps the rest in float32, int4 block scales in float16
    for name, module, pname, p in unique_parameters(meta_model):
        quantized = (isinstance(module, torch.nn.Linear) and pname == "weight" and ".layers." in name
                     and not ignored(name, method.ignore))
        if not quantized:
            total += p.numel() * (4 if litert else STORAGE_DTYPE.itemsize)
            continue
        rows, cols = p.shape
        bits, gs = method.scheme_for(name)
        gs = gs if gs != -1 and cols % gs == 0 else cols
        groups = rows * (cols // gs)
        zeros = groups * STORAGE_DTYPE.itemsize if method.format == "mlx" else 0 if method.sym else groups * bits // 8
        total += rows * cols * bits // 8 + groups * (4 if litert and bits == 8 else STORAGE_DTYPE.itemsize) + zeros
    return total


def litert_bytes(method, meta_model: torch.nn.Module) -> int:
    """ai-edge-quantizer's recipes: every FULLY_CONNECTED weight (the lm_head too) and, for the `*` recipes, the
    embedding table at 4 or 8 bits with an fp16 scale per block (float32 per channel); the rest float32. A tied
    lm_head shares the embedding's table."""
    bits = 8 if "wi8" in method.recipe else 4
    block = 64 if "b64" in method.recipe else 32 if "b32" in method.recipe else None
    total = 0
    for name, module, pname, p in unique_parameters(meta_model):
        kinds = (torch.nn.Linear,) if method.linears_only else (torch.nn.Linear, torch.nn.Embedding)
        if pname == "weight" and isinstance(module, kinds) and p.dim() == 2 and not (
                method.linears_only and "lm_head" in name):
            rows, cols = p.shape
            total += rows * cols * bits // 8 + (rows * cols // block * 2 if block else rows * 4)
        else:
            total += p.numel() * 4
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
    """llama.cpp's own mix (mix_bytes, the same arithmetic as `quantize fit`), with the method's importance
    matrix setting; F32 / F16 / BF16: 1-D tensors F32, the rest at the type's width."""
    counts = param_counts(meta_model.config.to_dict())
    if method.type in UNQUANTIZED:  # the converter keeps norms and MoE routers F32
        small = counts.norms + counts.n_moe_layers * counts.router
        return (4 if method.type == "F32" else 2) * (counts.total - small) + 4 * small
    return mix_bytes(counts, method.type, has_imatrix=getattr(method, "use_imatrix", method.type in IMATRIX_BY_DEFAULT))


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
    """NVFP4: half a byte per quantized weight, an e4m3 scale per 16 and a float32 global scale per linear; MXFP4:
    half a byte per weight and a one-byte exponent per 32; everything else 16-bit."""
    total = 0
    mx = method.scheme == "mxfp4a16"
    for name, module, pname, p in unique_parameters(meta_model):
        if isinstance(module, torch.nn.Linear) and pname == "weight" and not ignored(name, method.ignore):
            total += p.numel() // 2 + (p.numel() // 32 if mx else p.numel() // 16 + 4)
        else:
            total += p.numel() * 2
    return total


EXPECTED_BYTES = {"litert": litert_bytes, "int8": int8_bytes, "fp8": fp8_bytes, "fp4": fp4_bytes, "rtn": weight_only_bytes, "gptq": weight_only_bytes, "awq": awq_bytes,
                  "gguf": gguf_bytes, "auto": auto_bytes}


def expected_bytes(method, meta_model: torch.nn.Module) -> int:
    """The artefact's tensor bytes that `method` (a recipe's method config) will write, from the architecture."""
    return EXPECTED_BYTES[method.name](method, meta_model)
