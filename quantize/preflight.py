"""Before any work: what a run will do and what would fail later, from the recipe, the model's config and its
tensor headers alone (`quantize plan`, and the first step of `quantize run`). Every failure names the recipe key.
"""

from __future__ import annotations

import shutil

from quantize.common.errors import QuantizeError
from quantize.fit import build_memory, footprint, vram
from quantize.fit.shape import shape_from_config
from quantize.formats.gguf_convert import check_convertible
from quantize.formats.gguf_types import UNQUANTIZED
from quantize.formats.tensors import weight_bytes_gguf, weight_bytes_safetensors
from quantize.measure import memory
from quantize.measure.streamed import check_stream
from quantize.runtimes.litert import CACHE_LENGTH, device_fit
from quantize.methods import fp4, fp8
from quantize.methods.engine import check_model
from quantize.methods.configs import artefact_format
from quantize.methods.experts import has_experts, with_experts
from quantize.methods.weight_only import check_group_sizes
from quantize.recipe import Recipe
from quantize.sources.architectures import ARCHITECTURES
from quantize.sources.models import (
    gguf_source, hub_config_and_bytes, is_hub_id, meta_model, resolve_model, unique_parameters,
)


def base_model(recipe: Recipe, resolve=resolve_model):
    """The recipe's base model, resolved by `resolve`; its errors name the key."""
    try:
        return resolve(recipe.model, recipe.revision)
    except QuantizeError as exc:
        raise QuantizeError(f"key `model`: {exc}") from None


def peek_config(spec: str, revision: str | None = None):
    """(transformers config, tensor bytes by dtype, description) of a base model without loading weights:
    a GGUF that is not converted yet is read for its metadata and tensor headers only, a hub model for its
    config.json and safetensors headers only."""
    from transformers import AutoConfig

    if is_hub_id(spec):
        config, by_dtype = hub_config_and_bytes(spec, revision)
        described = {"spec": spec, "origin": "hub", "revision": revision,
                     "bytes_are": "the hub's safetensors headers (nothing downloaded)"}
        return AutoConfig.for_model(**config), by_dtype, described
    source = gguf_source(spec)
    if source is not None and not (source[1] / "config.json").is_file():
        gguf, _, origin = source
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return config, weight_bytes_gguf(gguf), {"spec": spec, "origin": origin, "source_file": str(gguf),
                                                  "bytes_are": "the GGUF source (not yet converted)"}
    base = resolve_model(spec, revision)
    return AutoConfig.from_pretrained(base.path), weight_bytes_safetensors(base.path), base.describe()


def check_recipe(recipe: Recipe, config: dict, meta) -> None:
    """What would fail later, checked now from the config and the architecture alone, naming the recipe key: the
    engine supports the model type, every linear takes the group
    size, the GGUF converter can write the model."""
    if recipe.eval.stream:
        check_stream(config, "key `eval.stream`")
    check_engines(recipe.eval.engines)
    for k, method in enumerate(recipe.methods):
        key = "method" if len(recipe.methods) == 1 else f"methods[{k}]"
        try:
            if getattr(method, "format", None) == "litert":
                check_litert(config)
            if method.layer_wise:
                check_model(config)
                if method.name in ("rtn", "gptq", "awq"):  # int8 w8a8 and fp8 have no group size
                    check_group_sizes(meta, method)
            if method.name == "fp8":
                fp8.check_blocks(meta, method)
            if method.name == "fp4":
                fp4.check_groups(meta, method)
            if (method.name in ("fp8", "fp4") or (method.name == "int8" and method.scheme == "w8a8")) \
                    and has_experts(config):
                raise QuantizeError(f"{method.default_variant()} on a sparse MoE model ({config.get('model_type')}) "
                                    "is not built yet: its evaluation quantizes each nn.Linear's input as the engine "
                                    "does, and transformers holds the experts as 3-D tensors; use int8 scheme w8a16 "
                                    "or a W4A16 method")
            if method.name == "int8" and method.scheme == "llm.int8" and has_experts(config):
                raise QuantizeError(f"scheme llm.int8 (bitsandbytes) quantizes nn.Linear modules only, and "
                                    f"transformers holds this {config.get('model_type')} model's experts as 3-D "
                                    "tensors, which it would leave unquantized; use scheme w8a16")
            if method.name == "auto":
                if has_experts(config):
                    raise QuantizeError("the budgeted mix (method auto) handles dense models; a sparse MoE model's "
                                        "merged expert tensors are not in its sensitivity table yet")
                check_convertible(config)
                check_model(config)
                if method.budget.gpu:
                    check_gpu_budget(config, method.budget, recipe.fit.flash_attn,
                                     vram.engine_for(artefact_format(method)))
            if method.name == "gguf":
                check_convertible(config)
                if method.type not in UNQUANTIZED:
                    footprint.check_mix(config, method.type, method.use_imatrix)
                if method.needs_calibration:
                    check_imatrix_model(config)
        except QuantizeError as exc:
            raise QuantizeError(f"key `{key}` ({method.default_variant()}): {exc}") from None


def check_imatrix_model(config: dict) -> None:
    """The importance matrix runs on the layer-wise engine: a family whose row has no streamed layer (gpt-oss,
    Llama 4) is refused with the key that makes its GGUF without one."""
    try:
        check_model(config)
    except QuantizeError as exc:
        arch = ARCHITECTURES.get(config.get("model_type"))
        if arch is None or arch.layer is not None:
            raise
        raise QuantizeError(f"{exc}. The importance matrix needs that engine: set `imatrix: false` on this method "
                            "to make the GGUF with llama.cpp's converter and quantizer alone") from None


def litert_on_device(weights: int, shape) -> dict:
    """A LiteRT file's expected memory on the device: its weights and the float32 KV cache tensors its decode
    signature threads (runtimes/litert.py's cache length, every layer)."""
    kv = shape.n_layers * shape.kv_elements * CACHE_LENGTH * 4
    return {"weights_bytes": weights, "kv_cache_bytes": kv, "cache_length": CACHE_LENGTH, "total_bytes": weights + kv,
            "note": "expected: weights + the decode signature's float32 KV cache at its cache length"}


def check_litert(config: dict) -> None:
    """A LiteRT file is written and scored by LiteRT's tools in their own environment: installed, and a dense
    model (litert-torch's exporter traces transformers' model; quantize's LiteRT path handles dense linears)."""
    from quantize.runtimes import engines

    if not engines.installed("litert"):
        raise QuantizeError("format litert needs LiteRT's tools: `quantize engine install litert` creates their "
                            "environment (about 2.3 GB)")
    if has_experts(config):
        raise QuantizeError(f"LiteRT files of sparse MoE models ({config.get('model_type')}) are not built yet")


def check_engines(names: list[str]) -> None:
    """Every engine `eval.engines` names is installed (its own environment), before any work."""
    from quantize.runtimes import engines

    for name in names:
        if not engines.installed(name):
            raise QuantizeError(f"key `eval.engines`: {name} is not installed here; `quantize engine install {name}` "
                                "creates its environment (or remove it from eval.engines)")


def check_gpu_budget(config: dict, budget, flash_attn: bool, engine: str) -> None:
    """A gpu budget must leave the weights some bytes with its KV cache type (kv_dtype auto: with one of them)."""
    from quantize.methods.configs import KV_CHOICES

    try:
        vram.weight_budgets(shape_from_config(config), budget.gpu, budget.context, budget.batch,
                            KV_CHOICES if budget.kv_dtype == "auto" else [budget.kv_dtype], flash_attn, engine)
    except QuantizeError as exc:
        raise QuantizeError(f"budget: {exc}") from None


def check_disk(recipe: Recipe, meta, store_bytes: int) -> None:
    """Fail before any work when the output's file system cannot hold the artefacts (footprint.expected_bytes),
    the GGUF method's F16 (and AWQ-scaled) intermediates, and the base log-probabilities kept during the run."""
    params = sum(p.numel() for *_, p in unique_parameters(meta))
    need = store_bytes
    for method in recipe.methods:
        need += footprint.expected_bytes(method, meta)
        if method.name == "auto" or (method.name == "gguf" and method.type not in UNQUANTIZED):
            need += 2 * params * (2 if getattr(method, "awq_scales", False) else 1)  # base-f16.gguf (+ the AWQ-scaled checkpoint)
    folder = recipe.output_dir.resolve()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise QuantizeError(f"output {recipe.output_dir}: the run needs about {vram.gib(need)} on disk (artefacts, "
                            f"intermediates and {vram.gib(store_bytes)} of base log-probabilities), {folder} has "
                            f"{vram.gib(free)} free. Set `output:` to a larger disk or lower `eval.perplexity.max_chunks`.")


def memory_needed(recipe: Recipe, meta, chunks: int | None = None) -> dict[str, int]:
    """Estimated peak host memory per recipe key (fit/build_memory.py), the process itself included. `chunks`:
    the evaluation's chunk count when known (a streamed evaluation holds every chunk's hidden states), else
    `eval.perplexity.max_chunks` (1 when that is every chunk of a text not yet read)."""
    shape = shape_from_config(meta.config.to_dict())
    params = sum(p.numel() for *_, p in unique_parameters(meta))
    c, ev = recipe.calibration, recipe.eval
    keys = ["method" if len(recipe.methods) == 1 else f"methods[{k}]" for k in range(len(recipe.methods))]
    need = {key: build_memory.build_bytes(m, shape, params, c.samples, c.seq_len)
            for key, m in zip(keys, recipe.methods)}
    if ev.stream:  # one layer at a time, never the whole model
        per_layer = {}
        for name, _, _, p in unique_parameters(meta):
            if name.startswith("model.layers."):
                i = name.split(".")[2]
                per_layer[i] = per_layer.get(i, 0) + p.numel()
        need["eval.stream"] = build_memory.stream_eval_bytes(shape, chunks or ev.perplexity.max_chunks or 1,
                                                             ev.perplexity.n_ctx, max(per_layer.values(), default=None))
    else:
        need["eval.dtype"] = build_memory.eval_bytes(shape, params, ev.dtype, ev.perplexity.n_ctx)
    return {key: value + build_memory.PROCESS_BYTES for key, value in need.items()}


def check_memory(recipe: Recipe, meta, chunks: int | None = None) -> None:
    """Fail before any work when a step's estimated peak exceeds what the machine can give (MemAvailable + free
    swap), naming the recipe key and what would lower it."""
    available = memory.available_bytes()
    if available is None:
        return
    for key, need in memory_needed(recipe, meta, chunks).items():
        if need > available:
            lower = {"eval.dtype": "`eval.dtype: bfloat16`, `eval.stream: true` or a smaller `eval.perplexity.n_ctx`",
                     "eval.stream": "fewer `eval.perplexity.max_chunks` or a smaller `eval.perplexity.n_ctx`"}.get(
                key, "fewer `calibration.samples` or a shorter `calibration.seq_len`")
            raise QuantizeError(f"key `{key}`: needs about {vram.gib(need)} of memory (estimate, "
                                f"fit/build_memory.py), this machine has {vram.gib(available)} available; "
                                f"use {lower}, or a machine with more memory")


def plan(recipe: Recipe) -> dict:
    """What a run will do, the expected artefact sizes and the fit, from the config alone (no weights)."""
    config, base_bytes, described = base_model(recipe, peek_config)
    meta = with_experts(meta_model(config))  # expert linears as the engine sees them (sizes, group checks)
    check_recipe(recipe, config.to_dict(), meta)
    check_memory(recipe, meta)
    shape = shape_from_config(config.to_dict())
    variants = {}
    for method in recipe.methods:
        expected = footprint.expected_bytes(method, meta)
        if artefact_format(method) == "litert":  # runs on the device: its memory there, as the run reports it
            fit = device_fit(litert_on_device(expected, shape))
        else:
            fit = vram.fit_report(expected, shape, recipe.fit.gpus, recipe.fit.contexts, recipe.fit.batch,
                                  recipe.fit.kv_dtype, recipe.fit.flash_attn, vram.engine_for(artefact_format(method)))
        variants[method.default_variant()] = {"method": method.model_dump(mode="json"), "expected_bytes": expected,
                                              "fit": fit}
    return {
        "recipe": recipe.name,
        "output": str(recipe.output_dir),
        "base": {**described, "bytes": sum(base_bytes.values()), "bytes_by_dtype": base_bytes},
        "variants": variants,
        "eval": recipe.eval.model_dump(mode="json"),
        "memory_bytes": {**memory_needed(recipe, meta), "available": memory.available_bytes(),
                         "what": "estimated peak host memory per recipe key (fit/build_memory.py)"},
    }
