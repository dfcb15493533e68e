"""Each method's settings, as the recipe's `method:` entries give them: pydantic models validated once at the
edge (unknown keys rejected, every value checked), discriminated on `name`. No torch here: a recipe is checked
in a fraction of a second, before any work.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quantize.formats import CLASSIC_BITS, LITERT_GROUP_SIZES, MLX_GROUP_SIZES
from quantize.formats.gguf_types import IMATRIX_BY_DEFAULT, MIXES, REFUSED, UNQUANTIZED


def known_device(value: str) -> str:
    """A recipe's `device` (the recipe's own and each layer-wise method's)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError(f"unknown device {value!r}; accepted: auto, cpu, cuda, cuda:N")
    return value


GroupSize = Literal[-1, 32, 64, 128, 256]  # -1: per output channel
GROUP_SIZES = tuple(g for g in get_args(GroupSize) if g > 0)  # what a recipe may ask, and an error may suggest


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    layer_wise: ClassVar[bool] = False  # streamed through methods/engine.py, one decoder layer at a time


# ---- methods -------------------------------------------------------------------------------------------
W8A8_ONLY = ("smoothing_strength", "weights", "damp", "device", "forward_dtype")
SMOOTHING_STRENGTH = 0.8  # llm-compressor's SmoothQuantModifier default (its W8A8 examples)


class Int8Method(Strict):
    """INT8. `w8a16`: symmetric per-output-channel round-to-nearest weights, written as compressed-tensors.
    `w8a8`: int8 weights and int8 activations, as vLLM serves "INT8": SmoothQuant (`smoothing_strength`), then GPTQ
    (or RTN) symmetric per-channel int8 weights, the inputs quantized per token at run time by the engine;
    compressed-tensors `int-quantized` as llm-compressor writes it. `llm.int8`: bitsandbytes LLM.int8 (int8
    weights, fp16 outlier columns above `threshold`)."""

    name: Literal["int8"]
    scheme: Literal["w8a16", "w8a8", "llm.int8"] = "w8a16"
    threshold: float = Field(6.0, gt=0, description="LLM.int8 outlier threshold (llm.int8 only)")
    smoothing_strength: float | None = Field(
        SMOOTHING_STRENGTH, ge=0, le=1, description="w8a8: SmoothQuant's α (s = max|X|^α / max|W|^(1−α), folded "
        "into the norm before each set of linears); null: no smoothing")
    weights: Literal["gptq", "rtn"] = Field("gptq", description="w8a8: how the int8 weights are rounded")
    damp: float = Field(0.01, gt=0, lt=1, description="w8a8 with GPTQ weights: fraction of mean(diag H) added")
    device: str = Field("auto", description="w8a8: where the layers and statistics live (as gptq's `device`)")
    forward_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="w8a8: dtype of the calibration forward passes (as gptq's `forward_dtype`)")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="regexes of linears left alone")
    variant: str | None = Field(None, description="name of this variant's folder; default: method-scheme")

    _known_device = field_validator("device")(lambda cls, value: known_device(value))

    @model_validator(mode="after")
    def _w8a8_settings(self):
        stray = [k for k in W8A8_ONLY if k in self.model_fields_set]
        if self.scheme != "w8a8" and stray:
            raise ValueError(f"{', '.join(stray)}: settings of scheme w8a8, not {self.scheme}")
        return self

    @property
    def layer_wise(self) -> bool:  # w8a8 streams through methods/engine.py like GPTQ
        return self.scheme == "w8a8"

    def default_variant(self) -> str:
        if self.variant or self.scheme != "w8a8":
            return self.variant or f"int8-{self.scheme}"
        smoothing = ("-nosmooth" if self.smoothing_strength is None else
                     "" if self.smoothing_strength == SMOOTHING_STRENGTH else f"-sq{self.smoothing_strength:g}")
        return f"int8-w8a8{'' if self.weights == 'gptq' else '-rtn'}{smoothing}"

    @property
    def needs_calibration(self) -> bool:
        return self.scheme == "w8a8" and (self.weights == "gptq" or self.smoothing_strength is not None)


class FloatWeights(Strict):
    """fp8 and fp4: the format's float grid reached by round-to-nearest (`rtn`, no calibration) or by GPTQ's
    column loop (`gptq`, calibrated), whose settings are refused beside rtn."""

    weights: Literal["rtn", "gptq"] = Field("rtn", description="how the weights are rounded onto the format's grid: "
                                                              "to nearest, or by GPTQ on the calibration's Hessians")
    damp: float = Field(0.01, gt=0, lt=1, description="gptq weights: fraction of mean(diag H) added")
    device: str = Field("auto", description="gptq weights: where the layers and statistics live (as gptq's)")
    forward_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="gptq weights: dtype of the calibration forward passes (as gptq's `forward_dtype`)")

    _known_device = field_validator("device")(lambda cls, value: known_device(value))

    @model_validator(mode="after")
    def _gptq_settings(self):
        stray = [k for k in ("damp", "device", "forward_dtype") if k in self.model_fields_set]
        if self.weights == "rtn" and stray:
            raise ValueError(f"{', '.join(stray)}: settings of `weights: gptq`, not round-to-nearest")
        return self

    @property
    def needs_calibration(self) -> bool:
        return self.weights == "gptq"


class Fp8Method(FloatWeights):
    """FP8 e4m3 weights (compressed-tensors float-quantized). `dynamic`: per-channel weights, per-token dynamic fp8
    inputs (llm-compressor's FP8_DYNAMIC); `block`: 128 × 128 weight blocks, dynamic fp8 inputs per 1 × 128 group
    (FP8_BLOCK, DeepSeek-V3's); `w8a16`: per-channel fp8 weights, 16-bit inputs. `weights`: round-to-nearest
    (`rtn`, no calibration, as llm-compressor's FP8 presets) or GPTQ's error feedback onto the same e4m3 grid."""

    layer_wise: ClassVar[bool] = True

    name: Literal["fp8"]
    scheme: Literal["dynamic", "block", "w8a16"] = "dynamic"
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="regexes of linears left alone")
    variant: str | None = Field(None, description="name of this variant's folder; default: fp8-scheme[-gptq]")

    def default_variant(self) -> str:
        return self.variant or f"fp8-{self.scheme}{'-gptq' if self.weights == 'gptq' else ''}"


class Fp4Method(FloatWeights):
    """FP4 weights, 16-bit activations: NVFP4 (e2m1 in groups of 16, e4m3 group scales, a float32 global scale per
    tensor; compressed-tensors nvfp4-pack-quantized, llm-compressor's NVFP4A16) or MXFP4 (e2m1 in groups of 32,
    power-of-two E8M0 scales; mxfp4-pack-quantized, compressed-tensors' MXFP4A16). `weights`: round-to-nearest
    (`rtn`, no calibration) or GPTQ's error feedback onto the same e2m1 grid (`gptq`, as llm-compressor's
    GPTQModifier with an NVFP4A16 scheme)."""

    layer_wise: ClassVar[bool] = True

    name: Literal["fp4"]
    scheme: Literal["nvfp4a16", "mxfp4a16"] = "nvfp4a16"
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="regexes of linears left alone")
    variant: str | None = Field(None, description="name of this variant's folder; default: fp4-scheme[-gptq]")

    def default_variant(self) -> str:
        return self.variant or f"fp4-{self.scheme}{'-gptq' if self.weights == 'gptq' else ''}"


class LitertMethod(Strict):
    """LiteRT's own quantizer (ai-edge-quantizer) on the float export, one of its named recipes: the baseline a
    LiteRT user gets without quantize (round-to-nearest on its own grid; `dynamic_wi4b32_afp32` and the other `*`
    recipes quantize the embedding table too). Our GPTQ / AWQ / RTN codes go to LiteRT with `format: litert`."""

    layer_wise: ClassVar[bool] = False
    format: ClassVar[str] = "litert"

    name: Literal["litert"]
    recipe: Literal["dynamic_wi4b32_afp32", "dynamic_wi4b64_afp32", "dynamic_wi4c_afp32", "dynamic_wi8_afp32",
                    "weight_only_wi8_afp32"] = Field(
        "dynamic_wi4b32_afp32", description="ai-edge-quantizer's recipe (its recipe.py): dynamic_wi4b32_afp32 (int4 "
        "blocks of 32, int8 dynamic activations), dynamic_wi4b64_afp32, dynamic_wi4c_afp32 (int4 per channel), "
        "dynamic_wi8_afp32 (int8 per channel), weight_only_wi8_afp32")
    linears_only: bool = Field(False, description="apply the recipe to the decoder's linears only, as our methods "
                                                  "quantize (the embedding table and the logits head stay float32)")
    variant: str | None = Field(None, description="name of this variant's folder; default: litert-recipe")

    def default_variant(self) -> str:
        return self.variant or f"litert-{self.recipe}" + ("-linears" if self.linears_only else "")

    @property
    def needs_calibration(self) -> bool:
        return False


class ModuleScheme(Strict):
    """Another grid for the linears whose full name `match` (a regex, searched) finds: a per-layer mix."""

    match: str
    bits: Literal[2, 3, 4, 8]
    group_size: GroupSize

    @field_validator("match")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {value!r} ({exc})") from None
        return value


class WeightOnly(Strict):
    """Integer weights on b-bit grids per group of `group_size` input columns (-1: per output channel)."""

    layer_wise: ClassVar[bool] = True

    bits: Literal[2, 3, 4, 8] = 4
    group_size: GroupSize = 128
    sym: bool = True
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="regexes of linears left alone")
    on_indivisible: Literal["fail", "channel"] = Field(
        "fail", description="a linear whose input size is not a multiple of group_size: fail, or go per channel")
    format: Literal["compressed-tensors", "gptq", "awq", "mlx", "litert"] = Field(
        "compressed-tensors", description="on-disk layout: compressed-tensors pack-quantized (vLLM, SGLang, "
        "transformers), the classic `gptq` (v1) / `awq` (GEMM) int32 layouts for older stacks, `mlx` (mlx-lm's "
        "affine layout, Apple Silicon), or `litert` (a TensorFlow Lite model.tflite for LiteRT on phones and edge "
        "devices, built in the managed litert engine environment)")
    litert_compute: Literal["integer", "float"] = Field(
        "integer", description="format litert: how LiteRT computes with the weights: integer (its dynamic-range "
        "kernels quantize each input row to int8 at run time; the fast path, every scheme) or float (the weights "
        "dequantized in the graph and a float32 matmul; 8-bit per-channel weights only, ai-edge-quantizer has no "
        "blockwise int4 float mode)")
    per_module: list[ModuleScheme] = Field(
        default_factory=list, description="other bits / group sizes for some linears (first match wins; the rest "
        "take bits and group_size): written as one compressed-tensors config group per scheme")
    variant: str | None = None
    device: str = Field("auto", description="where the layers, activations, statistics and searches live: auto "
                                            "(cuda when visible), cpu, cuda or cuda:N")
    forward_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of the calibration forward passes (linears and attention under autocast); auto: "
                            "bfloat16 where the device computes it natively (a CUDA GPU with bf16, a CPU with "
                            "AVX512-BF16 or AMX), else float32; Hessians, solves and AWQ's losses are float32 either "
                            "way")

    _known_device = field_validator("device")(lambda cls, value: known_device(value))

    def scheme_for(self, name: str) -> tuple[int, int]:
        """(bits, group_size) the linear `name` (its full module name) is asked for."""
        for m in self.per_module:
            if re.search(m.match, name):
                return m.bits, m.group_size
        return self.bits, self.group_size

    @model_validator(mode="after")
    def _format_packs_bits(self):
        if self.per_module and self.format != "compressed-tensors":
            raise ValueError(f"per_module schemes are written as compressed-tensors config groups; format "
                             f"{self.format!r} holds one scheme")
        if self.format in CLASSIC_BITS and self.bits not in CLASSIC_BITS[self.format]:
            raise ValueError(f"format {self.format!r} packs bits {list(CLASSIC_BITS[self.format])}, got bits {self.bits}")
        if self.format == "litert":
            if not self.sym:
                raise ValueError("format 'litert' holds symmetric grids only (ai-edge-quantizer writes no zero "
                                 "points); set sym: true")
            if self.bits == 4 and self.group_size not in LITERT_GROUP_SIZES:
                raise ValueError(f"format 'litert' takes 4-bit weights in blocks of {', '.join(map(str, LITERT_GROUP_SIZES))} "
                                 f"input columns, got group_size {self.group_size}")
            if self.bits == 8 and self.group_size != -1:
                raise ValueError(f"format 'litert' takes 8-bit weights per output channel (group_size: -1), got "
                                 f"group_size {self.group_size}")
            if self.bits not in (4, 8):
                raise ValueError(f"format 'litert' takes bits 4 (blockwise) or 8 (per channel), got bits {self.bits}")
            if self.on_indivisible == "channel":
                raise ValueError("format 'litert' holds one block size per file; set on_indivisible: fail")
            if self.litert_compute == "float" and self.bits != 8:
                raise ValueError("litert_compute: float takes 8-bit per-channel weights (ai-edge-quantizer has no "
                                 "float mode for blockwise int4); set bits: 8, group_size: -1, or litert_compute: "
                                 "integer")
        elif self.litert_compute != "integer":
            raise ValueError(f"litert_compute is a setting of format 'litert'; this method writes {self.format}")
        if self.format == "mlx":
            if self.group_size not in MLX_GROUP_SIZES:
                raise ValueError(f"format 'mlx' takes group_size {', '.join(map(str, MLX_GROUP_SIZES))} (MLX's affine "
                                 f"kernels have no per-channel or wider grid), got {self.group_size}")
            if self.on_indivisible == "channel":
                raise ValueError("format 'mlx' cannot hold a per-channel fallback (on_indivisible: channel); set "
                                 "on_indivisible: fail, or a group_size that divides every linear's input size")
        return self

    def default_variant(self) -> str:
        grid = "sym" if self.sym else "asym"
        group = "ch" if self.group_size == -1 else f"g{self.group_size}"
        layout = "" if self.format == "compressed-tensors" else f"-{self.format}"
        layout += "-float" if self.litert_compute == "float" else ""
        options = "-mse" if getattr(self, "observer", "minmax") == "mse" else ""
        options += "-refgrid" if getattr(self, "group_grid", "updated") == "reference" else ""
        return self.variant or f"{self.name}-w{self.bits}-{grid}-{group}{options}{layout}"


OBSERVER = Field("minmax", description="how each group's grid is chosen: minmax (its min/max), or mse (the range "
                                       "shrunk to minimise Σ|Q(w) − w|^2.4, the GPTQ reference's `mse` option)")


class RtnMethod(WeightOnly):
    """Round-to-nearest on each group's grid: the calibration-free baseline."""

    name: Literal["rtn"]
    observer: Literal["minmax", "mse"] = OBSERVER

    @property
    def needs_calibration(self) -> bool:
        return False


EXPERT_CALIBRATION = Field(
    "routed", description="sparse MoE models (Mixtral, Qwen3-MoE): routed (each expert's statistics from the tokens "
    "routed to it; an expert routed fewer than expert_min_tokens is calibrated on every token entering its block) or "
    "all (every expert on every token)")
EXPERT_MIN_TOKENS = Field(None, ge=1, description="routed calibration: the fewest routed tokens an expert is calibrated "
                                                  "on before it falls back to every token; default the hidden size")


class GptqMethod(WeightOnly):
    """GPTQ (Frantar et al., 2022): Hessian-aware rounding with error feedback, layer by layer."""

    name: Literal["gptq"]
    observer: Literal["minmax", "mse"] = OBSERVER
    act_order: bool = False
    group_grid: Literal["updated", "reference"] = Field(
        "updated", description="without act_order, where a group's grid comes from: the weights with all error "
        "feedback so far (updated), or W as IST-DASLab's reference and llm-compressor read it (reference)")
    damp: float = Field(0.01, gt=0, lt=1, description="fraction of mean(diag H) added to the diagonal")
    block_size: int = Field(128, ge=1)
    true_sequential: bool = True
    expert_calibration: Literal["routed", "all"] = EXPERT_CALIBRATION
    expert_min_tokens: int | None = EXPERT_MIN_TOKENS

    @property
    def needs_calibration(self) -> bool:
        return True


SEARCH_SAMPLES = 8  # AWQ's default search_samples (see its description)
COARSE_GRID = 4  # AWQ's default coarse_grid (see its description)
SEARCH_TOKENS = 2048  # AWQ's default search_tokens (see its description)


class AwqMethod(WeightOnly):
    """AWQ (Lin et al., 2023): per-channel scales searched on calibration activations and folded into the
    previous op, a clipping search, then round-to-nearest with a zero point, layer by layer."""

    name: Literal["awq"]
    sym: bool = False
    n_grid: int = Field(20, ge=1, description="points of the scale exponent grid α ∈ [0, 1)")
    duo_scaling: bool = Field(True, description="s = x̄^α / w̄^(1-α) as AutoAWQ and llm-compressor; false: x̄^α")
    coarse_grid: int = Field(
        COARSE_GRID, ge=1, description="1: judge every α of the grid (AutoAWQ, llm-compressor); c: every c-th α, then "
        "the best's neighbours at c/2, c/4 … 1. Default 4: 10 of the 21 points at n_grid 20; on SmolLM2-135M W4 g64 "
        "(32 × 512 calibration) the same KLD as the whole grid, 1.47× faster (bench/results/awq_speed.md)")
    propagate: Literal["quantized", "full-precision"] = Field(
        "quantized", description="the next layer's calibration inputs: this layer's outputs with its weights "
        "quantized (as GPTQ here), or in full precision from the pass that captured its inputs (AutoAWQ's: one pass "
        "per layer instead of two)")
    clip: bool = Field(True, description="search a clipping range per group (not for q/k)")
    clip_tokens: int = Field(512, ge=1, description="calibration tokens (evenly spaced) used by the clip search")
    search_samples: int | None = Field(
        SEARCH_SAMPLES, ge=1, description="calibration sequences (evenly spaced) on which the scale search judges "
        "each α for a block with attention (x̄ still comes from every token); null: all of them, as AutoAWQ and "
        "llm-compressor. Default 8: "
        "on SmolLM2-135M W4 g64 (32 × 512 calibration) its KLD was no worse than the full search's, 5× faster "
        "(bench/results/awq_speed.md)")
    search_tokens: int | None = Field(
        SEARCH_TOKENS, ge=1, description="calibration tokens (evenly spaced over every sequence) on which the scale "
        "search judges each α for a block that treats each token alone (an MLP, a sparse MoE block, o and down); "
        "null: every token. Default 2048: on SmolLM2-135M W4 asym g64 (32 × 512 calibration) the KLD of every "
        "token's within its paired error, the build 1.76× faster (bench/results/awq_speed.md)")
    export: Literal["quantized", "scaled-fp16"] = Field(
        "quantized", description="scaled-fp16: the AWQ-scaled and clipped model, unquantised (e.g. to feed GGUF)")
    expert_calibration: Literal["routed", "all"] = EXPERT_CALIBRATION
    expert_min_tokens: int | None = EXPERT_MIN_TOKENS

    @property
    def needs_calibration(self) -> bool:
        return True

    @model_validator(mode="after")
    def _one_scheme(self):
        if self.per_module:
            raise ValueError("per_module schemes: rtn and gptq (AWQ's scale search is made for one grid)")
        return self

    def default_variant(self) -> str:
        name = super().default_variant()
        if self.variant is None and self.search_samples != SEARCH_SAMPLES:
            name += f"-search{self.search_samples or 'all'}"
        if self.variant is None and self.search_tokens != SEARCH_TOKENS:
            name += f"-tokens{self.search_tokens or 'all'}"
        if self.variant is None and self.coarse_grid != COARSE_GRID:
            name += f"-coarse{self.coarse_grid}"
        if self.variant is None and self.propagate == "full-precision":
            name += "-fp-propagate"
        if self.variant is None and self.export == "scaled-fp16":
            name += "-scaled-fp16"
        return name



class GgufMethod(Strict):
    """GGUF for llama.cpp / Ollama / LM Studio: converted from the HF checkpoint, then every mix llama.cpp's own
    quantiser makes (k-quants Q2_K … Q6_K, i-quants IQ1_S … IQ4_XS, the legacy Q4_0 … Q5_1, MXFP4_MOE for MoE
    models), with an importance matrix from the calibration data."""

    name: Literal["gguf"]
    type: Literal[tuple(MIXES) + tuple(REFUSED)] = "Q4_K_M"
    imatrix: bool | None = Field(None, description="use an importance matrix; default: on for 4-bit types and below")
    pure: bool = Field(False, description="every quantized tensor gets `type` (no llama.cpp mix)")
    awq_scales: bool = Field(False, description="fold AWQ scales (4-bit asym g32 search, clipping) into the model "
                                                "before conversion, as AutoAWQ's export for llama.cpp does")
    num_ctx: int = Field(4096, ge=64, description="the Modelfile's PARAMETER num_ctx (Ollama's context), capped "
                                                  "at the model's trained context")
    device: str = Field("auto", description="where the AWQ scale search of `awq_scales` runs (as awq's `device`; "
                                            "default: the recipe's `device`)")
    variant: str | None = None

    _known_device = field_validator("device")(lambda cls, value: known_device(value))

    @model_validator(mode="after")
    def _options_that_apply(self):
        if self.type in REFUSED:
            raise ValueError(f"type {self.type}: {REFUSED[self.type]}")
        if self.type in UNQUANTIZED and (self.imatrix or self.awq_scales or self.pure):
            raise ValueError(f"type {self.type} is not quantized: imatrix, awq_scales and pure apply to Q8_0 … Q2_K")
        return self

    @property
    def use_imatrix(self) -> bool:
        if self.type in UNQUANTIZED:
            return False
        return self.type in IMATRIX_BY_DEFAULT if self.imatrix is None else self.imatrix

    @property
    def needs_calibration(self) -> bool:
        return self.use_imatrix or self.awq_scales

    def default_variant(self) -> str:
        tags = ("-awq" if self.awq_scales else "") + ("-imat" if self.use_imatrix else "") + ("-pure" if self.pure else "")
        return self.variant or f"gguf-{self.type.lower()}{tags}"


SCHEME_CANDIDATES = ["w4g32", "w4g64", "w4g128", "w4ch", "w8g128", "w8ch", "fp16"]
MIX_CANDIDATES = ["Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "IQ4_NL", "Q5_0", "Q5_1", "F16"]
KV_CHOICES = ("f16", "q8_0", "q4_0")  # budget.kv_dtype auto: llama.cpp's K/V cache types the mix chooses among


class Budget(Strict):
    """What the budgeted mix may weigh: exactly one of `bytes` (all the GGUF's tensors), `bpw` (bits per weight over
    all tensors), `mix` (what llama.cpp's standard mix of that name weighs for this model, with the same importance
    matrix), or `gpu` (+ `context`, `batch`, `kv_dtype`: the bytes left for weights on that GPU once the KV cache
    and the runtime overhead at that context are counted, quantize.fit's arithmetic). `kv_dtype: auto` (gpu only):
    the mix chooses llama.cpp's KV cache type too, among f16, q8_0 and q4_0, by the least predicted KLD of weights
    and cache together (the cache's own KLD measured on the same calibration tokens)."""

    bytes: int | None = Field(None, ge=1)
    mix: Literal[tuple(m for m in MIXES if m not in UNQUANTIZED)] | None = None
    scheme: str | None = Field(None, pattern=r"^w(4|8)(g(32|64|128)|ch)$",
                               description="compressed-tensors: what this uniform scheme weighs (w4g128, w8ch, …)")
    bpw: float | None = Field(None, gt=0, le=32)
    gpu: str | None = None
    context: int | None = Field(None, ge=1)
    batch: int = Field(1, ge=1)
    kv_dtype: Literal["f16", "bf16", "q8_0", "q4_0", "f32", "auto"] = "f16"
    weight_bytes: int | None = Field(None, description="set by the run from gpu/context; not a recipe key")
    weight_bytes_by_kv: dict[str, int] | None = Field(None, description="set by the run for kv_dtype auto: the "
                                                      "bytes left for weights with each KV cache type; not a recipe key")

    @model_validator(mode="after")
    def _one_budget(self):
        given = [k for k in ("bytes", "bpw", "mix", "scheme", "gpu") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of bytes, bpw, mix, scheme or gpu (+ context); got {given or 'none'}")
        if (self.gpu is None) != (self.context is None):
            raise ValueError("gpu and context go together: the weights' share depends on the context's KV cache")
        if self.weight_bytes is not None or self.weight_bytes_by_kv is not None:
            raise ValueError("weight_bytes is computed from gpu and context; give bytes for a fixed budget")
        if self.kv_dtype == "auto" and self.gpu is None:
            raise ValueError("kv_dtype auto chooses the KV cache type with the weights for a gpu budget (+ context); "
                             "a bytes, bpw or mix budget does not depend on the cache")
        return self


class AutoMethod(Strict):
    """The budgeted mix: each tensor gets the GGML type that minimises the predicted KLD of the whole model
    subject to the byte budget, from a measured sensitivity table (methods/sensitivity.py), solved exactly
    (methods/auto.py) and built by llama.cpp's own quantiser with per-tensor types."""

    name: Literal["auto"]
    target: Literal["gguf", "compressed-tensors"] = Field(
        "gguf", description="gguf (llama.cpp's types per tensor) or compressed-tensors (vLLM's W4/W8 schemes per "
                            "fused linear group, built by `quantizer`)")
    device: str = Field("auto", description="where compressed-tensors' GPTQ quantizer runs (as gptq's `device`; "
                                            "default: the recipe's `device`)")
    _known_device = field_validator("device")(lambda cls, value: known_device(value))
    budget: Budget
    candidates: list[str] | None = Field(
        None, description="gguf: GGML types a tensor may take (each where its blocks fit the rows), default "
        f"{', '.join(MIX_CANDIDATES)}; compressed-tensors: schemes, default {', '.join(SCHEME_CANDIDATES)}")
    quantizer: Literal["gptq", "rtn"] = Field("gptq", description="compressed-tensors: the method that builds the mix")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="compressed-tensors: linears left "
                                                                                "alone (regexes)")
    probe_bpw: float = Field(4.5, gt=1, le=16, description="each tensor's KLD is measured at the candidate nearest "
                                                           "this many bits per weight")
    sensitivity_samples: int = Field(2, ge=1, description="calibration windows the KLDs are measured on (the first "
                                                               "ones of the calibration batches)")
    num_ctx: int = Field(4096, ge=64, description="the Modelfile's PARAMETER num_ctx, as for gguf")
    variant: str | None = None

    @model_validator(mode="after")
    def _target_keys(self):
        from gguf import GGMLQuantizationType

        if self.target == "gguf":
            unknown = [k for k in self.candidate_types if k not in GGMLQuantizationType.__members__]
            if unknown or not self.candidate_types:
                raise ValueError(f"unknown GGML types {unknown}; accepted: {', '.join(MIX_CANDIDATES)} (and "
                                 "llama.cpp's other types)")
            if self.budget.scheme:
                raise ValueError("budget.scheme is for target compressed-tensors; a GGUF mix takes budget.mix")
        else:
            unknown = [k for k in self.candidate_types if not re.fullmatch(r"w(4|8)(g(32|64|128)|ch)|fp16", k)]
            if unknown or not self.candidate_types:
                raise ValueError(f"unknown schemes {unknown}; accepted: w4/w8 with g32, g64, g128 or ch (the ones "
                                 "vLLM's WNA16 kernels load), fp16")
            if self.budget.mix:
                raise ValueError("budget.mix is llama.cpp's; for compressed-tensors give budget.scheme (e.g. w4g128)")
            if self.budget.kv_dtype == "auto":
                raise ValueError("budget.kv_dtype auto chooses among llama.cpp's KV cache types (f16, q8_0, q4_0): "
                                 "target gguf only; for compressed-tensors name the cache type the fit assumes")
        return self

    @property
    def candidate_types(self) -> list[str]:
        if self.candidates is not None:
            return self.candidates
        return list(MIX_CANDIDATES if self.target == "gguf" else SCHEME_CANDIDATES)

    @property
    def needs_calibration(self) -> bool:
        return True

    def default_variant(self) -> str:
        b = self.budget
        size = (f"{b.bytes}B" if b.bytes else f"{b.bpw:g}bpw" if b.bpw else f"as-{b.mix.lower()}" if b.mix else
                f"as-{b.scheme}" if b.scheme else f"{b.gpu.lower().replace(' ', '-')}-{b.context}"
                + (f"-b{b.batch}" if b.batch > 1 else "") + (f"-kv-{b.kv_dtype}" if b.kv_dtype != "f16" else ""))
        target = "gguf" if self.target == "gguf" else f"ct-{self.quantizer}"
        return self.variant or f"auto-{target}-{size}"


def artefact_format(method) -> str:
    """The format a method writes, as runtimes.load.detect names it (the fit's engine follows it)."""
    if method.name == "gguf" or (method.name == "auto" and method.target == "gguf"):
        return "gguf"
    return getattr(method, "format", "compressed-tensors")


# The method names, once: each config's `name` literal. The recipe's `method` is a union discriminated on it and the
# registry (registry.py) maps the same names to the modules that build them.
CONFIGS: dict[str, type[Strict]] = {
    get_args(c.model_fields["name"].annotation)[0]: c for c in (Int8Method, Fp8Method, Fp4Method, RtnMethod, GptqMethod, AwqMethod,
                                                           GgufMethod, AutoMethod, LitertMethod)
}
METHOD_NAMES = tuple(CONFIGS)
Method = Annotated[Union[tuple(CONFIGS.values())], Field(discriminator="name")]
