"""GGUF type knowledge in one place, named and sized as upstream names and sizes them: the llama_ftype of each mix
(gguf-py's `LlamaFileType`, = llama.h's LLAMA_FTYPE_*), the bits per weight of each GGML block type (gguf-py's
`GGML_QUANT_SIZES`), and the few rules of llama.cpp's quantiser (src/llama-quant.cpp) that we need before a file
exists: which type a mix gives its main tensors, and the fallback for rows that are not whole k-quant blocks.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

# The mixes a recipe may ask for (llama-quantize's names), each with the GGML type of its main tensors.
MIXES: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K",
    "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "Q2_K": "Q2_K",
}
UNQUANTIZED = ("F32", "F16", "BF16")  # written by the converter itself; every other mix goes through llama.cpp
K_QUANT_BLOCK = 256  # weights per k-quant super-block: a row must be a multiple of it
# llama.cpp's type for a tensor whose rows are not a multiple of K_QUANT_BLOCK (llama-quant.cpp, the fallback
# switch for Q4_K/Q5_K/Q6_K)
K_QUANT_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def ftype(mix: str) -> int:
    """llama_ftype of a mix, as llama_model_quantize and general.file_type take it."""
    return int(LlamaFileType.ALL_F32 if mix == "F32" else LlamaFileType[f"MOSTLY_{mix}"])


def bits_per_weight(ggml_type: str) -> float:
    """Bits per weight of a GGML block type: bytes per block × 8 / weights per block."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    return size * 8 / block


def nominal_bits_per_weight(mix: str) -> float:
    """The bits per weight of a mix's main tensors (its other tensors and the 1-D ones differ)."""
    return bits_per_weight(MIXES[mix])


def block_size(ggml_type: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]][0]
