"""INT8 weights, two ways.

`w8a16`: every linear's weight row W[o, :] gets one symmetric scale, scale[o] = max|W[o, :]| / 127.5, and
q = clamp(round(W / scale), -128, 127); activations stay 16-bit. Written as a compressed-tensors checkpoint
(`pack-quantized`, the format vLLM/SGLang load and transformers reloads with the compressed-tensors package).
The packing and the config are done by the compressed-tensors library itself; we only choose the scales.

`llm.int8`: bitsandbytes' LLM.int8 (Dettmers et al., 2022): vector-wise int8 weights, with input columns whose
activations exceed `threshold` computed in fp16. Saved with transformers' bitsandbytes serialisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantize.formats.compressed_tensors import STORAGE_DTYPE, Stored, storage_dtype, weight_args
from quantize.methods import grids
from quantize.methods.configs import Int8Method
from quantize.methods.experts import has_experts
from quantize.sources.models import BaseModel, ignored, load_model, load_tokenizer, meta_model

Config = Int8Method


def linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def build(method: Int8Method, base: BaseModel, out_dir: Path, calib=None, calib_info=None) -> dict:
    if method.scheme == "w8a16":
        return build_w8a16(method, base, out_dir)
    if method.scheme == "w8a8":
        return build_w8a8(method, base, out_dir, calib)
    return build_llm_int8(method, base, out_dir)


def token_int8_args():
    """The inputs as vLLM's W8A8 kernels quantize them: int8, symmetric, dynamic, one scale per token
    (compressed-tensors' W8A8 preset)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)


def build_w8a8(method: Int8Method, base: BaseModel, out_dir: Path, calib) -> dict:
    """SmoothQuant, then per-channel symmetric int8 weights by GPTQ (or RTN), streamed layer by layer: each layer
    is smoothed on the activations entering it (the previous layers already quantized), then its groups are
    calibrated on the smoothed inputs, so GPTQ's Hessians are those of the inputs the int8 weights will see."""
    from quantize.methods import gptq, rtn
    from quantize.methods.configs import GptqMethod, RtnMethod
    from quantize.methods.engine import awq_rows
    from quantize.methods.smoothquant import smooth_layer
    from quantize.methods.weight_only import build_streamed, scale_dtype
    from quantize.sources.architectures import ARCHITECTURES

    shared = dict(bits=8, group_size=-1, sym=True, ignore=method.ignore, device=method.device,
                  forward_dtype=method.forward_dtype, variant=method.default_variant())
    if method.weights == "gptq":
        weights = GptqMethod(name="gptq", damp=method.damp, **shared)
        solve = gptq.solver(weights, scale_dtype(weights, base))
    else:
        weights = RtnMethod(name="rtn", **shared)
        solve = rtn.solver(weights, scale_dtype(weights, base))
    arch = ARCHITECTURES[base.config["model_type"]]
    log_file = out_dir / "smoothquant-log.jsonl"  # appended per layer, so a resumed build keeps earlier layers'

    def smooth(i, layer, acts) -> None:
        rows = smooth_layer(layer, acts, awq_rows(arch, layer), method.smoothing_strength, arch.layer.norm_offset)
        with open(log_file, "a") as fh:
            fh.writelines(json.dumps({"layer": i, **row}) + "\n" for row in rows)

    info = build_streamed(weights, base, out_dir, calib if method.needs_calibration else None, solve,
                          prepare=None if method.smoothing_strength is None else smooth,
                          stored=Stored(weight_args(8, True, -1), token_int8_args()))
    smoothed = {}
    if log_file.is_file():  # a layer redone after an interruption is booked once, as last smoothed
        for line in log_file.read_text().splitlines():
            row = json.loads(line)
            smoothed[(row["layer"], row["norm"])] = row
        log_file.write_text("".join(json.dumps(r) + "\n" for _, r in sorted(smoothed.items())))
    return {"scheme": "w8a8", "weights": method.weights, "smoothing_strength": method.smoothing_strength,
            "activations": "int8 per token, dynamic, symmetric (quantized by the engine at run time)",
            "smoothed_norms": len(smoothed), **info}


def quantize_w8a16_(model: torch.nn.Module, ignore: list[str], dtype: torch.dtype = STORAGE_DTYPE
                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Round every non-ignored linear's weight onto its per-channel int8 grid, in place; return the scales.
    Scales are first rounded to the storage dtype so the artefact reproduces these weights exactly."""
    scales, skipped = {}, []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if ignored(name, ignore):
            skipped.append(name)
            continue
        W = module.weight.data.float()
        scale, zero = grids.scale_zero(W, bits=8, symmetric=True)  # [out, 1]
        scale = scale.to(dtype).float()
        q = grids.quantize(W, scale, zero, bits=8, symmetric=True)
        module.weight.data = grids.dequantize(q, scale, zero).to(module.weight.dtype)
        scales[name] = scale
    return scales, skipped


def write_compressed_tensors(
    model: torch.nn.Module, scales: dict[str, torch.Tensor], skipped: list[str], out_dir: Path, bits: int = 8,
    dtype: torch.dtype = STORAGE_DTYPE) -> None:
    """Save a model whose linears already lie on the symmetric per-channel grids given by `scales`
    ([out, 1] each) as compressed-tensors; the library re-derives q = round(W / scale) and packs it."""
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel")
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=skipped,
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, config, show_progress=False)
    for name, module in model.named_modules():
        if hasattr(module, "weight_scale"):
            module.weight_scale.data = scales[name].to(module.weight_scale.dtype)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.to(dtype)  # scales, norms and embeddings; the packed int32 weights keep their dtype
    model.config.dtype = dtype
    model.save_pretrained(out_dir)
    compressor.update_config(out_dir)


def build_w8a16(method: Int8Method, base: BaseModel, out_dir: Path) -> dict:
    if has_experts(base.config):
        # transformers holds a sparse MoE model's experts as 3-D tensors, which no nn.Linear pass reaches: the
        # same per-channel int8 grid through the streamed engine, whose experts are linears (engine.ExpertList)
        from quantize.methods import rtn
        from quantize.methods.configs import RtnMethod

        rtn_method = RtnMethod(name="rtn", bits=8, group_size=-1, sym=True, ignore=method.ignore,
                               variant=method.default_variant())
        return {"scheme": "w8a16", **rtn.build(rtn_method, base, out_dir)}
    model = load_model(base.path, "float32")
    dtype = storage_dtype(base.config)  # a bf16 base stays bf16
    scales, skipped = quantize_w8a16_(model, method.ignore, dtype)
    write_compressed_tensors(model, scales, skipped, out_dir, dtype=dtype)
    load_tokenizer(base.path).save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    return {
        "scheme": "w8a16",
        "format": "compressed-tensors",
        "quantization_config": config["quantization_config"],
        "quantized_linears": len(scales),
        "ignored_linears": skipped,
    }


def build_llm_int8(method: Int8Method, base: BaseModel, out_dir: Path) -> dict:
    from transformers import BitsAndBytesConfig

    skipped = [n for n in linear_names(meta_model(base.path)) if ignored(n, method.ignore)]
    bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=method.threshold, llm_int8_skip_modules=skipped)
    model = load_model(base.path, "float16", quantization_config=bnb, device_map="cpu")
    model.save_pretrained(out_dir)
    load_tokenizer(base.path).save_pretrained(out_dir)
    return {
        "scheme": "llm.int8",
        "format": "bitsandbytes",
        "threshold": method.threshold,
        "quantized_linears": sum(type(m).__name__ == "Linear8bitLt" for m in model.modules()),
        "ignored_linears": skipped,
    }
