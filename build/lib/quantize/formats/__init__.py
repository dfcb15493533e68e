"""What comes out, on disk: compressed-tensors (vLLM, SGLang, transformers), the classic GPTQ/AWQ int32 layouts,
GGUF (llama.cpp), and reading any of them back: their tensor bytes, their GGUF types."""

# bit widths each classic layout packs into whole int32 words (classic.py)
CLASSIC_BITS = {"gptq": (2, 4, 8), "awq": (4,)}
