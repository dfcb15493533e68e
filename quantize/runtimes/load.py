"""Any artefact, loaded the way its ecosystem runs it: a GGUF file on llama.cpp; an MLX folder on mlx-lm; a LiteRT
folder (model.tflite) on LiteRT's interpreter in its managed environment; an HF
directory through
transformers with the package its `quantization_config` names (compressed-tensors, bitsandbytes, GPTQModel for
the classic gptq/awq layouts), or, where that loader is missing or broken, our own unpacking, named as such.

    detect(path) -> format name          load(path, dtype, n_ctx) -> (model, loader description, dtype)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from quantize.common.errors import QuantizeError
from quantize.common.files import check_checkpoint, check_gguf
from quantize.common.heap import release_free_heap
from quantize.formats import classic, compressed_tensors, litert as litert_format, mlx as mlx_format
from quantize.runtimes import kernels, litert, llamacpp, mlx, vllm
from quantize.sources.models import load_model


def gguf_file(path: Path) -> Path | None:
    if path.suffix == ".gguf" and path.is_file():
        return path
    if path.is_dir() and (path / "model.gguf").is_file():
        return path / "model.gguf"
    return None


def detect(path: Path) -> str:
    """'gguf', 'litert', 'mlx', 'compressed-tensors', 'gptq', 'awq', 'bitsandbytes' or 'dense'."""
    if gguf_file(path) is not None:
        return "gguf"
    if litert_format.is_litert(path):
        return "litert"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise QuantizeError(f"{path}: not a .gguf file nor a folder with config.json or model.gguf")
    config = json.loads(config_file.read_text())
    if mlx_format.is_mlx(config):
        return "mlx"
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method is None:
        return "dense"
    if method in ("compressed-tensors", "gptq", "awq", "bitsandbytes"):
        return method
    raise QuantizeError(f"{config_file}: quantization_config.quant_method {method!r} is not supported for evaluation; "
                        "accepted: compressed-tensors, gptq, awq, bitsandbytes, or none")


def check_files(path: Path) -> None:
    """The artefact's files, checked before it is loaded: a GGUF gguf-py reads whole, safetensors not truncated."""
    gguf = gguf_file(path)
    if gguf is not None:
        check_gguf(gguf)
    elif path.is_dir():
        check_checkpoint(path)


def load(path: Path, dtype: str = "float32", n_ctx: int = 512, device: str = "cpu", engine: str | None = None):
    """(model, loader description, eval dtype). A torch model goes to `device` (a CUDA one: every format but
    bitsandbytes' LLM.int8, which is loaded on the CPU here); llama.cpp and mlx-lm keep their own placement.
    `engine="vllm"`: the artefact scored on vLLM itself (runtimes/vllm.py), in `dtype` (vLLM's CPU build runs
    bfloat16; float32 is refused by its quantized kernels)."""
    check_files(path)
    if engine == "vllm":
        fmt = detect(path)
        if fmt in ("gguf", "mlx", "litert"):
            raise QuantizeError(f"{path}: vLLM scores HF folders (compressed-tensors, dense); this is {fmt}")
        model = vllm.VllmModel(path, dtype, n_ctx)
        return model, f"vLLM {model.version} (managed environment), {model.settings}", dtype
    if engine not in (None, "default"):
        raise QuantizeError(f"--engine {engine!r} for evaluation; accepted: vllm, or none (the format's own loader)")
    model, loader, eval_dtype = _load(path, dtype, n_ctx)
    if device != "cpu" and isinstance(model, torch.nn.Module) and detect(path) != "bitsandbytes":
        model.to(device)
        loader += f", on {device}"
    return model, loader, eval_dtype


def _load(path: Path, dtype: str, n_ctx: int):
    fmt = detect(path)
    if fmt == "gguf":  # llama.cpp's own kernels; its default F16 KV cache, as users run it
        model = llamacpp.LlamaCppModel(gguf_file(path), n_ctx=n_ctx)
        return model, f"llama.cpp (llama-cpp-python {llamacpp.binding().__version__}), {model.settings}", "gguf"
    if fmt == "litert":  # LiteRT's interpreter: float32 activations quantized to int8 per row by its kernels
        model = litert.LiteRTModel(path)
        return model, f"LiteRT ({model.version}, managed environment), {model.settings}", "litert"
    if fmt == "mlx":  # mlx-lm's model code and MLX's quantized matmul, in the dtype the folder stores
        model = mlx.MlxModel(path)
        return model, f"mlx-lm {model.version} ({model.settings})", f"mlx-{model.dtype}"
    if fmt == "bitsandbytes":  # LLM.int8 computes in fp16
        return load_model(path, "float16", device_map="cpu"), "transformers + bitsandbytes", "float16"
    if fmt in ("gptq", "awq"):
        if importlib.util.find_spec("gptqmodel") is not None:  # transformers loads gptq/awq through GPTQModel
            return load_model(path, dtype), "transformers.from_pretrained + GPTQModel", dtype
        return (classic.load_dense(path, getattr(torch, dtype)),
                f"quantize's {fmt} unpacking (GPTQModel, which transformers needs for {fmt}, is not installed)", dtype)
    if fmt == "compressed-tensors" and kernels.input_activations(path):  # W8A8: the engine quantizes the inputs
        model = compressed_tensors.load_dense(path, getattr(torch, dtype))
        n = kernels.quantize_inputs(model, path)
        return (model, f"quantize's W8A8 kernel reference (runtimes/kernels.py): stored weights × scales, the "
                       f"inputs of {n} linears quantized as vLLM's kernels do", dtype)
    if fmt == "compressed-tensors" and compressed_tensors.is_fp4(path) and dtype != "bfloat16":
        return (compressed_tensors.load_dense(path, getattr(torch, dtype)),
                "compressed-tensors FP4 unpack, exact in float32 (transformers decompresses FP4 to bfloat16 "
                "only: the same weights rounded to bfloat16)", dtype)
    if fmt == "compressed-tensors" and compressed_tensors.is_asymmetric(path):
        return (compressed_tensors.load_dense(path, getattr(torch, dtype)),
                "compressed-tensors unpack (transformers cannot reload asymmetric pack-quantized, llm-compressor#1618)",
                dtype)
    model = load_model(path, dtype)
    if fmt == "compressed-tensors":
        _decompress_now(model)
        # transformers 5.23 dequantizes a sparse MoE model's compressed experts into the checkpoint's dtype (fp16)
        # whatever dtype it was asked for, and its expert kernels then compute in fp16: evaluate in `dtype`
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != getattr(torch, dtype):
                p.data = p.data.to(getattr(torch, dtype))
    return model, "transformers.from_pretrained", dtype


def _decompress_now(model) -> None:
    """transformers decompresses compressed-tensors weights to dense on the first forward on CPU; do it here, then
    hand the freed packed copies and decompression buffers back to the OS (glibc keeps ~200 MiB of them for
    SmolLM2-135M otherwise, bench/results/memory_check.md), so the process holds what the model needs."""
    with torch.inference_mode():
        model(torch.zeros(1, 1, dtype=torch.long), use_cache=False)
    release_free_heap()


def free(model) -> None:
    if isinstance(model, (llamacpp.LlamaCppModel, mlx.MlxModel)):
        model.close()


def vocab_size(model) -> int:
    return model.config.vocab_size if isinstance(model, torch.nn.Module) else model.vocab_size
