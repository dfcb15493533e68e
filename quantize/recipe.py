"""The recipe: one YAML file that says which model, which method(s), which data and which measurements.

Validated once, here, with pydantic: unknown keys are rejected, the method is a union discriminated on its
`name`, and every error names the file, the key path and what would be accepted.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantize import fit
from quantize.errors import QuantizeError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- methods -------------------------------------------------------------------------------------------
class Int8Method(Strict):
    """INT8 weights. `w8a16`: symmetric per-output-channel round-to-nearest, written as compressed-tensors.
    `llm.int8`: bitsandbytes LLM.int8 (int8 weights, fp16 outlier columns above `threshold`)."""

    name: Literal["int8"]
    scheme: Literal["w8a16", "llm.int8"] = "w8a16"
    threshold: float = Field(6.0, gt=0, description="LLM.int8 outlier threshold (llm.int8 only)")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="regexes of linears left alone")
    variant: str | None = Field(None, description="name of this variant's folder; default: method-scheme")

    def default_variant(self) -> str:
        return self.variant or f"int8-{self.scheme}"

    @property
    def needs_calibration(self) -> bool:
        return False


class WeightOnly(Strict):
    """Integer weights on b-bit grids per group of `group_size` input columns (-1: per output channel)."""

    bits: Literal[2, 3, 4, 8] = 4
    group_size: Literal[-1, 32, 64, 128, 256] = 128
    sym: bool = True
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="regexes of linears left alone")
    on_indivisible: Literal["fail", "channel"] = Field(
        "fail", description="a linear whose input size is not a multiple of group_size: fail, or go per channel")
    format: Literal["compressed-tensors", "gptq", "awq"] = Field(
        "compressed-tensors", description="on-disk layout: compressed-tensors pack-quantized (vLLM, SGLang, "
        "transformers), or the classic `gptq` (v1) / `awq` (GEMM) int32 layouts for older stacks")
    variant: str | None = None

    @model_validator(mode="after")
    def _format_packs_bits(self):
        from quantize.classic_format import FORMATS

        if self.format in FORMATS and self.bits not in FORMATS[self.format]:
            raise ValueError(f"format {self.format!r} packs bits {list(FORMATS[self.format])}, got bits {self.bits}")
        return self

    def default_variant(self) -> str:
        grid = "sym" if self.sym else "asym"
        group = "ch" if self.group_size == -1 else f"g{self.group_size}"
        layout = "" if self.format == "compressed-tensors" else f"-{self.format}"
        observer = "-mse" if getattr(self, "observer", "minmax") == "mse" else ""
        return self.variant or f"{self.name}-w{self.bits}-{grid}-{group}{observer}{layout}"


OBSERVER = Field("minmax", description="how each group's grid is chosen: minmax (its min/max), or mse (the range "
                                       "shrunk to minimise Σ|Q(w) − w|^2.4, the GPTQ reference's `mse` option)")


class RtnMethod(WeightOnly):
    """Round-to-nearest on each group's grid: the calibration-free baseline."""

    name: Literal["rtn"]
    observer: Literal["minmax", "mse"] = OBSERVER

    @property
    def needs_calibration(self) -> bool:
        return False


class GptqMethod(WeightOnly):
    """GPTQ (Frantar et al., 2022): Hessian-aware rounding with error feedback, layer by layer."""

    name: Literal["gptq"]
    observer: Literal["minmax", "mse"] = OBSERVER
    act_order: bool = False
    damp: float = Field(0.01, gt=0, lt=1, description="fraction of mean(diag H) added to the diagonal")
    block_size: int = Field(128, ge=1)
    true_sequential: bool = True
    device: str = Field("auto", description="where the layers, activations and Hessians live: auto (cuda when visible), "
                                    "cpu, cuda or cuda:N")
    forward_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the calibration forward passes (linears and attention under autocast); "
                               "the Hessians and the GPTQ solve are float32 either way")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"unknown device {value!r}; accepted: auto, cpu, cuda, cuda:N")
        return value

    @property
    def needs_calibration(self) -> bool:
        return True


class AwqMethod(WeightOnly):
    """AWQ (Lin et al., 2023): per-channel scales searched on calibration activations and folded into the
    previous op, a clipping search, then round-to-nearest with a zero point, layer by layer."""

    name: Literal["awq"]
    sym: bool = False
    n_grid: int = Field(20, ge=1, description="points of the scale exponent grid α ∈ [0, 1)")
    duo_scaling: bool = Field(True, description="s = x̄^α / w̄^(1-α) as AutoAWQ and llm-compressor; false: x̄^α")
    clip: bool = Field(True, description="search a clipping range per group (not for q/k)")
    clip_tokens: int = Field(512, ge=1, description="calibration tokens (evenly spaced) used by the clip search")
    export: Literal["quantized", "scaled-fp16"] = Field(
        "quantized", description="scaled-fp16: the AWQ-scaled and clipped model, unquantised (e.g. to feed GGUF)")

    @property
    def needs_calibration(self) -> bool:
        return True

    def default_variant(self) -> str:
        if self.variant is None and self.export == "scaled-fp16":
            return super().default_variant() + "-scaled-fp16"
        return super().default_variant()


GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M",
              "Q3_K_S", "Q2_K")
IMATRIX_BY_DEFAULT = ("Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")  # 4 bits and below


class GgufMethod(Strict):
    """GGUF for llama.cpp / Ollama / LM Studio: converted from the HF checkpoint, k-quants by llama.cpp's own
    quantiser (its Q4_K_M etc. mixes), with an importance matrix from the calibration data."""

    name: Literal["gguf"]
    type: Literal[GGUF_TYPES] = "Q4_K_M"
    imatrix: bool | None = Field(None, description="use an importance matrix; default: on for 4-bit types and below")
    pure: bool = Field(False, description="every quantized tensor gets `type` (no llama.cpp mix)")
    awq_scales: bool = Field(False, description="fold AWQ scales (4-bit asym g32 search, clipping) into the model "
                                                "before conversion, as AutoAWQ's export for llama.cpp does")
    variant: str | None = None

    @model_validator(mode="after")
    def _options_that_apply(self):
        if self.type in ("F32", "F16", "BF16") and (self.imatrix or self.awq_scales or self.pure):
            raise ValueError(f"type {self.type} is not quantized: imatrix, awq_scales and pure apply to Q8_0 … Q2_K")
        return self

    @property
    def use_imatrix(self) -> bool:
        if self.type in ("F32", "F16", "BF16"):
            return False
        return self.type in IMATRIX_BY_DEFAULT if self.imatrix is None else self.imatrix

    @property
    def needs_calibration(self) -> bool:
        return self.use_imatrix or self.awq_scales

    def default_variant(self) -> str:
        tags = ("-awq" if self.awq_scales else "") + ("-imat" if self.use_imatrix else "") + ("-pure" if self.pure else "")
        return self.variant or f"gguf-{self.type.lower()}{tags}"


Method = Annotated[Union[Int8Method, RtnMethod, GptqMethod, AwqMethod, GgufMethod], Field(discriminator="name")]
METHOD_NAMES = ("int8", "rtn", "gptq", "awq", "gguf")


# ---- data, evaluation, fit -----------------------------------------------------------------------------
class TextSource(Strict):
    """Where text comes from: `bundled:wiki` (the offline Wikipedia articles), a local .txt/.jsonl/.parquet
    file, or a hub dataset id (`hf:<id>[:config]`) for users with a network."""

    source: str = "bundled:wiki"
    field: str = Field("text", description="column holding the text in .jsonl/.parquet/hub datasets")


class Calibration(TextSource):
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=16)
    seed: int = 0


class Perplexity(TextSource):
    n_ctx: int = Field(512, ge=16)
    max_chunks: int | None = Field(32, ge=1, description="None: every chunk of the text")


class Speed(Strict):
    enabled: bool = True
    prompt_tokens: int = Field(128, ge=1, description="pp: prompt tokens processed in one batch")
    gen_tokens: int = Field(32, ge=1, description="tg: tokens generated one by one from an empty cache")
    repetitions: int = Field(5, ge=1)
    threads: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)


class Eval(Strict):
    perplexity: Perplexity = Perplexity()
    kld: bool = True
    speed: Speed = Speed()
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="compute dtype for torch evaluation (fp32 is the fast one on CPU)"
    )
    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks: wiki_rolling, wiki_cloze (local, "
                             "offline) or any lm-eval registry task (needs the hub)")
    task_limit: int | None = Field(None, ge=1, description="documents per lm-eval task (None: all)")


class Fit(Strict):
    gpus: list[str] = Field(
        default_factory=lambda: ["RTX 3060", "RTX 4090", "A100 80GB", "H100 SXM", "M-series 16 GB"]
    )
    contexts: list[int] = Field(default_factory=lambda: [4096, 8192, 32768], min_length=1)
    batch: int = Field(1, ge=1)
    kv_dtype: str = "f16"
    flash_attn: bool = True  # llama.cpp's default on GPUs; False adds each layer's attention scores

    @field_validator("gpus")
    @classmethod
    def _known_gpus(cls, names: list[str]) -> list[str]:
        try:
            return [fit.gpu_by_name(n).name for n in names]
        except QuantizeError as exc:  # pydantic reports ValueError with the key path
            raise ValueError(str(exc)) from None

    @field_validator("kv_dtype")
    @classmethod
    def _known_kv_dtype(cls, name: str) -> str:
        try:
            fit.kv_bytes_per_element(name)
        except QuantizeError as exc:
            raise ValueError(str(exc)) from None
        return name


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str = Field(description="bundled:smollm2-135m, a local HF directory, a .gguf file, or a hub id")
    methods: list[Method] = Field(min_length=1)
    calibration: Calibration = Calibration()
    eval: Eval = Eval()
    fit: Fit = Fit()
    output: str | None = None
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _one_method_is_a_list_of_one(cls, data):
        # `method: {...}` is the common case; `methods: [...]` builds several variants on one base evaluation.
        if isinstance(data, dict) and "method" in data:
            if "methods" in data:
                raise ValueError("give either `method` or `methods`, not both")
            data = dict(data)
            data["methods"] = [data.pop("method")]
        return data

    @model_validator(mode="after")
    def _variants_unique(self):
        names = [m.default_variant() for m in self.methods]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique, repeated: {dupes}; set `variant:` on each method")
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("outputs") / self.name

    def resolved(self) -> dict:
        """The recipe with every default filled in, as recorded in the manifest."""
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        return hashlib.sha256(yaml.safe_dump(self.resolved(), sort_keys=True).encode()).hexdigest()


# ---- loading with errors a person can act on -------------------------------------------------------------
def _key_path(loc: tuple) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in METHOD_NAMES or str(item).startswith("function-"):
            continue  # pydantic's union tag in the location, not a key the user wrote
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts).replace("methods[0]", "method") or "(top level)"


def _describe(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "union_tag_invalid":
        return f"unknown method {err['input'].get('name')!r}; accepted: {', '.join(METHOD_NAMES)}"
    if kind == "union_tag_not_found":
        return f"missing `name`; accepted method names: {', '.join(METHOD_NAMES)}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "literal_error":
        return f"got {err['input']!r}; {msg[0].lower() + msg[1:]}"
    return f"{msg} (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else msg


def parse_recipe(data: object, source: str) -> Recipe:
    if not isinstance(data, dict):
        raise QuantizeError(f"{source}: a recipe is a YAML mapping of keys, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid recipe"]
        for err in exc.errors():
            lines.append(f"  {_key_path(err['loc'])}: {_describe(err)}")
        raise QuantizeError("\n".join(lines)) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        bundled = sorted(p.stem for p in bundled_recipes())
        raise QuantizeError(f"{path}: no such recipe file; bundled recipes: {', '.join(bundled) or 'none'}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise QuantizeError(f"{path}: not valid YAML: {exc}") from None
    return parse_recipe(data, str(path))


def bundled_recipes() -> list[Path]:
    here = Path(__file__).resolve().parent.parent / "recipes"
    return sorted(here.glob("*.yaml"))


def ignored(module_name: str, patterns: list[str]) -> bool:
    """True when a linear's name matches one of the recipe's `ignore` regexes (searched, not anchored)."""
    return any(re.search(p, module_name) for p in patterns)
