"""What comes out, on disk: compressed-tensors (vLLM, SGLang, transformers), the classic GPTQ/AWQ int32 layouts,
GGUF (llama.cpp), MLX (mlx-lm), LiteRT (.tflite), and reading any of them back: their tensor bytes, their GGUF types."""

# bit widths each classic layout packs into whole int32 words (classic.py)
CLASSIC_BITS = {"gptq": (2, 4, 8), "awq": (4,)}
MLX_GROUP_SIZES = (32, 64, 128)  # the group sizes MLX's affine quantized matmul takes (mlx.py)
# ai-edge-quantizer's blockwise INT4 granularities (BLOCKWISE_32 … 256); 8-bit weights are channelwise (litert.py)
LITERT_GROUP_SIZES = (32, 64, 128, 256)
