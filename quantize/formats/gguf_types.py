"""GGUF type knowledge in one place, named and sized as upstream names and sizes them: the llama_ftype of each mix
(gguf-py's `LlamaFileType`, = llama.h's LLAMA_FTYPE_*), the bits per weight of each GGML block type (gguf-py's
`GGML_QUANT_SIZES`), and the rules of llama.cpp's quantiser (src/llama-quant.cpp of llama-cpp-python 0.3.36) that
decide, before a file exists, which GGML type every tensor of a mix gets (`tensor_types`: its
llama_tensor_get_type, fallbacks included) and which tensors it refuses to quantize without an importance matrix
(`requires_imatrix`). tests/test_gguf_mixes.py checks the rules tensor by tensor against files llama.cpp wrote.
"""

from __future__ import annotations

import re

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

# Every mix a recipe may ask for (llama-quantize's names), each with the GGML type of its main tensors
# (llama_ftype_get_default_type).
MIXES: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q5_1": "Q5_1", "Q5_0": "Q5_0",
    "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q4_1": "Q4_1", "Q4_0": "Q4_0", "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL",
    "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "IQ3_M": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_XS": "IQ3_S",
    "IQ3_XXS": "IQ3_XXS", "Q2_K": "Q2_K", "Q2_K_S": "Q2_K",
    "IQ2_M": "IQ2_S", "IQ2_S": "IQ2_XS", "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS", "IQ1_M": "IQ1_M", "IQ1_S": "IQ1_S",
    "MXFP4_MOE": "MXFP4",
}
# the mixes the gguf method gives an importance matrix unless `imatrix: false`: the k-quants at 4 bits and below
# and every i-quant (for some of which llama.cpp requires one)
IMATRIX_BY_DEFAULT = ("Q4_K_M", "Q4_K_S", "IQ4_XS", "IQ4_NL", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S",
                      "IQ3_XS", "IQ3_XXS", "Q2_K", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")
UNQUANTIZED = ("F32", "F16", "BF16")  # written by the converter itself; every other mix goes through llama.cpp
MOE_ONLY = ("MXFP4_MOE",)  # MXFP4 for merged expert tensors, Q8_0 for the rest: a dense model's would be all Q8_0
# The file types llama.cpp 0.3.36 knows that a recipe cannot ask for, and why.
REFUSED: dict[str, str] = {
    "TQ1_0": "ternary (1.69 bits: weights in {-1, 0, 1} × one scale per 256): only for models trained ternary "
             "(BitNet b1.58, TriLM); any other model's weights rounded to three levels lose what they knew",
    "TQ2_0": "ternary (2.06 bits: weights in {-1, 0, 1} × one scale per 256): only for models trained ternary "
             "(BitNet b1.58, TriLM); any other model's weights rounded to three levels lose what they knew",
    "NVFP4": "llama.cpp 0.3.36's quantiser has no NVFP4 file type (llama_model_quantize: invalid output file type "
             "39); its NVFP4 GGUFs are converted from NVFP4 checkpoints. For NVFP4 weights served by vLLM: method "
             "fp4, scheme nvfp4a16",
    "Q1_0": "1.125 bits per weight (a sign per weight and one scale per 128): only for models trained with 1-bit "
            "weights; made from Gemma-3-270m it scored KLD 16.2 nats and PPL 1.6e8 (bench/results/gguf_mixes.md)",
    "Q2_0": "gguf 0.19.0 (the gguf-py this project pins, which reads every GGUF we report on) does not know GGML "
            "type Q2_0",
}
# llama.cpp's type for a tensor whose rows are not a multiple of the type's block (llama-quant.cpp's
# tensor_type_fallback); a fallback that still does not divide the row gives F16
FALLBACK = {"IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
            "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0",
            "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# GGML types llama.cpp refuses to write without an importance matrix (tensor_requires_imatrix; also Q2_K in a
# Q2_K_S file). Not ggml's own list (ggml_quantize_requires_imatrix), which lets IQ1_M, IQ2_S and IQ3_XXS through.
NEEDS_IMATRIX = ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S")


def ftype(mix: str) -> int:
    """llama_ftype of a mix, as llama_model_quantize and general.file_type take it."""
    return int(LlamaFileType.ALL_F32 if mix == "F32" else LlamaFileType[f"MOSTLY_{mix}"])


def bits_per_weight(ggml_type: str) -> float:
    """Bits per weight of a GGML block type: bytes per block × 8 / weights per block."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    return size * 8 / block


def block_size(ggml_type: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]][0]


def is_quantized(ggml_type: str) -> bool:
    return ggml_type not in ("F32", "F16", "BF16")


def allows_quantization(name: str, n_dims: int) -> bool:
    """llama.cpp's tensor_allows_quantization for the tensors our families have: 2-D and 3-D weights but the
    norms, the MoE router (ffn_gate_inp), convolution kernels and small positional tables."""
    return (n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and not any(part in name for part in ("ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                                                  "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight",
                                                  "attn_rel_b.weight", "position_embd")))


def _category(name: str) -> str:
    """llama-quant.cpp's tensor_get_category: broad roles by name."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's pick of layers for more bits: the first and last eighth and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


IQ2_FAMILY = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")


def tensor_types(mix: str, tensors: list[tuple[str, int, int]], *, n_layer: int, n_gqa: int, n_expert: int,
                 has_imatrix: bool, llama_70b: bool = False) -> dict[str, str]:
    """GGML type of every quantizable tensor under llama.cpp's `mix`, as llama_model_quantize assigns it
    (llama_tensor_get_type and its fallback), in the order the file lists them. `tensors`: (GGUF name, columns
    = ne[0], matrices = ne[2] (experts of a merged expert tensor, else 1)) of each tensor llama.cpp would quantize
    (allows_quantization). `n_gqa`: attention heads per KV head; `llama_70b`: the llama arch with 80 layers and
    GQA, which llama.cpp types as 70B. Raises ValueError for a row no type and no fallback can hold."""
    default = MIXES[mix]
    if not is_quantized(default):
        return {name: default for name, _, _ in tensors}
    cats = [_category(name) for name, _, _ in tensors]
    tied = "output" not in cats
    n_attn_v = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats)
    count = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}
    experts = max(1, n_expert)

    def layer(counter: str, name: str) -> int:  # with experts, llama.cpp reads the layer from the name
        if experts > 1:
            return int(re.match(r"blk\.(\d+)\.", name)[1])
        return count[counter]

    out = {}
    for (name, cols, n_mat), cat in zip(tensors, cats):
        t = default
        if cat == "output" or (tied and cat == "token_embd"):
            if mix == "MXFP4_MOE" or cols % block_size(t):
                t = "Q8_0"
            elif mix in IQ2_FAMILY + ("IQ3_XXS",):
                t = "Q5_K"
            elif t != "Q8_0":
                t = "Q6_K"
        elif mix == "MXFP4_MOE":
            t = "MXFP4" if n_mat > 1 else "Q8_0"
        elif cat == "token_embd":
            if mix in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
                t = "Q2_K"
            elif mix in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
                t = "IQ3_S"
            elif mix in ("TQ1_0", "TQ2_0", "Q2_0"):
                t = "Q4_K"
        elif mix in IQ2_FAMILY:
            iq3 = mix in ("IQ2_S", "IQ2_M")
            if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
                t = "Q4_K" if n_gqa >= 4 or n_expert >= 4 else "IQ3_S" if iq3 else "Q2_K"
                count["attn_v"] += 1
            elif n_expert == 8 and cat == "attn_k":
                t = "Q4_K"
            elif cat == "ffn_down":
                if count["ffn_down"] < n_layer // 8:
                    t = "IQ3_S" if iq3 else "Q2_K"
                count["ffn_down"] += 1
            elif cat == "attn_output":
                if n_expert == 8:
                    t = "Q5_K"
                elif mix in ("IQ1_S", "IQ1_M"):
                    t = "IQ2_XXS"
                elif iq3:
                    t = "IQ3_S"
        elif cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            i = count["attn_v"]
            if mix == "Q2_K":
                t = "Q4_K" if n_gqa >= 4 else "Q3_K"
            elif mix == "Q2_K_S" and n_gqa >= 4:
                t = "Q4_K"
            elif mix == "IQ3_XXS":
                t = "Q4_K" if n_gqa >= 4 else "IQ3_S" if not has_imatrix else "IQ3_XXS"
            elif mix in ("IQ3_XS", "IQ3_S") and n_gqa >= 4:
                t = "Q4_K"
            elif mix == "IQ3_M":
                t = "Q4_K"
            elif mix == "Q3_K_M":
                t = "Q5_K" if i < 2 else "Q4_K"
            elif mix == "Q3_K_L":
                t = "Q5_K"
            elif mix in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
                t = "Q5_K"
            elif mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_attn_v):
                t = "Q6_K"
            elif mix == "Q4_K_S" and i < 4:
                t = "Q5_K"
            if llama_70b and t in ("Q3_K", "Q4_K"):
                t = "Q5_K"
            if n_expert == 8:
                t = "Q8_0"
            count["attn_v"] += 1
        elif cat == "attn_k":
            if n_expert == 8:
                t = "Q8_0"
            elif mix == "IQ3_XS":
                t = "IQ3_XXS"
            elif mix == "IQ3_XXS":
                t = "IQ2_S"
        elif cat == "attn_q":
            if mix == "IQ3_XS":
                t = "IQ3_XXS"
            elif mix == "IQ3_XXS":
                t = "IQ2_S"
        elif cat == "ffn_down":
            i, n = layer("ffn_down", name), n_layer
            if mix == "Q2_K":
                t = "Q3_K"
            elif mix == "Q2_K_S":
                if i < n // 8:
                    t = "Q4_K"
            elif mix == "IQ3_XXS" and not has_imatrix:
                t = "Q4_K" if i < n // 8 else "Q3_K"
            elif mix == "Q3_K_M":
                t = "Q5_K" if i < n // 16 else "Q4_K"  # (Q3_K only for Falcon, which we do not convert)
            elif mix == "IQ3_M" and (i < n // 8 or (n_expert == 8 and use_more_bits(i, n))):
                t = "Q4_K"
            elif mix == "Q3_K_L":
                t = "Q5_K"
            elif mix == "Q4_K_M":
                if use_more_bits(i, n):
                    t = "Q6_K"
            elif i < n // 8 and mix in ("IQ4_NL", "IQ4_XS") and not has_imatrix:
                t = "Q5_K"
            elif mix == "Q5_K_M" and use_more_bits(i, n):
                t = "Q6_K"
            elif mix == "Q4_K_S" and i < n // 8:
                t = "Q5_K"
            elif mix in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
                t = "Q4_1" if mix == "Q4_0" else "Q5_1"
            count["ffn_down"] += 1
        elif cat == "attn_output":
            if n_expert == 8:
                if mix in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                           "IQ3_M", "IQ4_XS"):
                    t = "Q5_K"
            else:
                t = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(mix, t)
        elif cat in ("ffn_gate", "ffn_up"):
            i, n = layer(cat, name), n_layer
            if mix == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
                t = "IQ3_XXS"
            count[cat] += 1
        out[name] = _fallback(name, cols, t)
    return out


def _fallback(name: str, cols: int, t: str) -> str:
    """llama.cpp's tensor_type_fallback: a type whose block does not divide the row takes its fallback, and F16
    when that does not divide it either."""
    if cols % block_size(t) == 0:
        return t
    if t in FALLBACK:
        t = FALLBACK[t]
    elif block_size(t) > 32:
        raise ValueError(f"{name}: rows of {cols} weights are not whole {t} blocks ({block_size(t)}), and llama.cpp "
                         f"defines no fallback for {t}")
    return t if cols % block_size(t) == 0 else "F16"


def requires_imatrix(name: str, ggml_type: str, mix: str) -> bool:
    """llama.cpp's tensor_requires_imatrix: it refuses to write this tensor in this type without an importance
    matrix (the embedding and the output never need one)."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return ggml_type in NEEDS_IMATRIX or (ggml_type == "Q2_K" and mix == "Q2_K_S")
