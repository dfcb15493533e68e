"""The recipe: one YAML file that says which model, which method(s), which data and which measurements.

Validated once, here, with pydantic: unknown keys are rejected, the method is a union discriminated on its
`name`, and every error names the file, the key path and what would be accepted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from quantize.common.errors import QuantizeError
from quantize.common.files import read_text
from quantize.fit.context_memory import KV_DTYPE_BYTES
from quantize.fit.gpus import DEFAULT_CONTEXTS, DEFAULT_GPUS, gpu_by_name
from quantize.measure.kv_cache import KV_CACHE_TYPES
from quantize.methods.configs import METHOD_NAMES, Method, Strict, known_device


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


class Serve(Strict):
    """The serve check: each variant behind its engine's OpenAI-compatible server (measure/serving.py)."""

    enabled: bool = True
    requests: int = Field(4, ge=1, description="chat completions sent `concurrency` at a time")
    concurrency: int = Field(4, ge=1)
    max_tokens: int = Field(32, ge=1, description="tokens per answer")
    repetitions: int = Field(3, ge=1, description="streamed completions timed for TTFT and decode tokens/sec")
    ctx: int = Field(2048, ge=64, description="context the server allocates (llama.cpp, vLLM)")
    timeout: float = Field(180, gt=0, description="seconds for the server to get healthy, and for each request")


class Eval(Strict):
    perplexity: Perplexity = Perplexity()
    kld: bool = True
    speed: Speed = Speed()
    serve: Serve = Serve()
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="compute dtype for torch evaluation (fp32 is the fast one on CPU)"
    )
    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks: wiki_rolling, wiki_cloze (local, "
                             "offline) or any lm-eval registry task (needs the hub)")
    task_limit: int | None = Field(None, ge=1, description="documents per lm-eval task (None: all)")
    kv_cache: list[Literal[tuple(KV_CACHE_TYPES)]] = Field(
        default_factory=list, description="score every GGUF variant again on llama.cpp with each of these K/V cache "
        "types (flash attention on for all), against the same base: what a quantized KV cache costs "
        "(measure/kv_cache.py); e.g. [f16, q8_0, q4_0]")
    engines: list[Literal["vllm"]] = Field(
        default_factory=list, description="score the base and every variant the engine loads again on the engine "
        "itself, on the same token ids, in its own dtype (vLLM: bfloat16): does the artefact deliver there the "
        "quality measured here (measure/on_engine.py)? Needs `quantize engine install vllm`")
    stream: bool = Field(False, description="evaluate the base layer by layer from its shards (float32), all "
                         "chunks at once: peak memory about one layer plus the chunks' hidden states, for a base "
                         "bigger than memory (measure/streamed.py)")

    @model_validator(mode="after")
    def _engines_need_the_base_store(self):
        if self.engines and not self.kld:
            raise ValueError("engines compares each variant's per-token NLL on the engine with ours against the "
                             "base's, which needs the base store: set kld: true or engines: []")
        return self

    @model_validator(mode="after")
    def _stream_in_float32(self):
        if self.stream and self.dtype != "float32":
            raise ValueError(f"stream: true evaluates in float32 (the layer-wise engine's dtype), got dtype "
                             f"{self.dtype!r}; set dtype: float32 or stream: false")
        return self


class Fit(Strict):
    gpus: list[str] = Field(default_factory=lambda: list(DEFAULT_GPUS))
    contexts: list[int] = Field(default_factory=lambda: list(DEFAULT_CONTEXTS), min_length=1)
    batch: int = Field(1, ge=1)
    kv_dtype: str = "f16"
    flash_attn: bool = True  # llama.cpp's default on GPUs; False adds each layer's attention scores

    @field_validator("gpus")
    @classmethod
    def _known_gpus(cls, names: list[str]) -> list[str]:
        try:
            return [gpu_by_name(n).name for n in names]
        except QuantizeError as exc:  # pydantic reports ValueError with the key path
            raise ValueError(str(exc)) from None

    @field_validator("kv_dtype")
    @classmethod
    def _known_kv_dtype(cls, name: str) -> str:
        if name not in KV_DTYPE_BYTES:
            raise ValueError(f"unknown kv dtype {name!r}; accepted: {', '.join(KV_DTYPE_BYTES)}")
        return name


class MustFit(Strict):
    gpu: str
    context: int = Field(ge=1)
    batch: int = Field(1, ge=1)

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, name: str) -> str:
        try:
            return gpu_by_name(name).name
        except QuantizeError as exc:
            raise ValueError(str(exc)) from None


class Gates(Strict):
    """Limits every variant must meet (CI): a variant that misses one is marked in results.json and the report,
    and `quantize run` exits 3. Unset gates are not checked."""

    max_kld: float | None = Field(None, ge=0, description="mean KL(base ‖ variant), nats")
    max_ppl_delta: float | None = Field(None, description="variant PPL − base PPL")
    min_same_top: float | None = Field(None, ge=0, le=1, description="share of positions with the base's top token")
    must_fit: list[MustFit] = Field(default_factory=list, description="GPU, context and batch the variant must fit "
                                                                      "(the recipe's kv_dtype and flash_attn)")
    min_tg_tps: float | None = Field(None, gt=0, description="generation tokens/sec, best thread count (median)")
    must_serve: bool = Field(False, description="the serve check (eval.serve) must pass: the engine loads the "
                                                "variant and answers every chat completion with text")

    @property
    def is_set(self) -> bool:
        return any(v is not None and v != [] and v is not False for v in self.model_dump().values())


LAYER_WISE_DEVICE = ("rtn", "gptq", "awq", "gguf", "auto")  # methods with a `device` key (and int8's scheme w8a8):
# gguf's and auto's go to the builds nested in them (the AWQ scales, the compressed-tensors quantizer)


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str = Field(description="bundled:smollm2-135m, bundled:gemma3-270m, a local HF directory, a .gguf "
                                   "file, or a hub id")
    revision: str | None = Field(None, description="hub commit, tag or branch of `model` (hub ids only; a local "
                                                   "model, e.g. given with --set model=DIR, ignores it)")
    methods: list[Method] = Field(min_length=1)
    calibration: Calibration = Calibration()
    eval: Eval = Eval()
    fit: Fit = Fit()
    gates: Gates = Gates()
    output: str | None = None
    device: str = Field("auto", description="where evaluation runs (the base and every torch artefact: perplexity, "
                                            "KLD, speed) and the default `device` of rtn, gptq, awq, int8 w8a8 and of "
                                            "the builds nested in gguf (AWQ scales) and auto (its GPTQ): auto (cuda "
                                            "when visible), cpu, cuda or cuda:N")
    seed: int = 0
    overrides: list[str] = Field(default_factory=list, description="the --set KEY=VALUE this recipe was run with "
                                                                    "(already applied; recorded in the output)")

    @model_validator(mode="before")
    @classmethod
    def _one_method_is_a_list_of_one(cls, data):
        # `method: {...}` is the common case; `methods: [...]` builds several variants on one base evaluation.
        if isinstance(data, dict) and "method" in data:
            if "methods" in data:
                raise ValueError("give either `method` or `methods`, not both")
            data = dict(data)
            data["methods"] = [data.pop("method")]
        # the recipe's `device` is the default of every layer-wise method that does not name its own
        if isinstance(data, dict) and "device" in data and isinstance(data.get("methods"), list):
            data = {**data, "methods": [{"device": data["device"], **m} if isinstance(m, dict) and (
                m.get("name") in LAYER_WISE_DEVICE or (m.get("name") == "int8" and m.get("scheme") == "w8a8"))
                else m for m in data["methods"]]}
        return data

    _known_device = field_validator("device")(lambda cls, value: known_device(value))

    @model_validator(mode="after")
    def _variants_unique(self):
        names = [m.default_variant() for m in self.methods]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique, repeated: {dupes}; set `variant:` on each method")
        return self

    @model_validator(mode="after")
    def _budget_gpus_known(self):
        for k, m in enumerate(self.methods):
            if m.name == "auto" and m.budget.gpu:
                try:
                    gpu_by_name(m.budget.gpu)
                except QuantizeError as exc:
                    raise ValueError(f"methods[{k}].budget.gpu: {exc}") from None
        return self

    @model_validator(mode="after")
    def _gates_are_measured(self):
        g = self.gates
        if (g.max_kld is not None or g.min_same_top is not None) and not self.eval.kld:
            raise ValueError("gates.max_kld and gates.min_same_top need `eval.kld: true`")
        if g.min_tg_tps is not None and not self.eval.speed.enabled:
            raise ValueError("gates.min_tg_tps needs `eval.speed.enabled: true`")
        if g.must_serve and not self.eval.serve.enabled:
            raise ValueError("gates.must_serve needs `eval.serve.enabled: true`")
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


def apply_overrides(data: dict, overrides: list[str], source: str, flag: str = "--set", prefix: str = "") -> dict:
    """The recipe mapping with each `KEY=VALUE` set: KEY is a dotted path (`eval.perplexity.max_chunks`,
    `methods.0.bits`; `method.` means the only method), VALUE is read as YAML (`8`, `null`, `[1, 2]`, `Q4_K_M`).
    Missing mappings on the path are created; the result is validated like the file. `flag` and `prefix`: how the
    command line gave them (`--gate max_kld=0.1` is `gates.max_kld=0.1`), so an error names what the user typed."""
    data = dict(data)
    if "method" in data and "methods" not in data:
        data["methods"] = [data.pop("method")]
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise QuantizeError(f"{source}: {flag} {item!r}: expected KEY=VALUE with a dotted KEY, "
                                f"e.g. {flag} {'max_kld=0.05' if prefix else 'eval.perplexity.max_chunks=8'}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise QuantizeError(f"{source}: {flag} {item!r}: the value is not valid YAML: {exc}") from None
        parts = (prefix + key.strip()).split(".")
        if parts[0] == "method":
            parts = ["methods", "0", *parts[1:]]
        target = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(target, list):
                if not part.isdigit() or int(part) >= len(target):
                    raise QuantizeError(f"{source}: {flag} {item!r}: `{where}` needs an index 0..{len(target) - 1}")
                part = int(part)
            if last:
                target[part] = value
            else:
                child = target.get(part) if isinstance(target, dict) else target[part]
                if child is None:  # a section the file leaves out: created
                    child = {}
                elif not isinstance(child, (dict, list)):
                    raise QuantizeError(f"{source}: {flag} {item!r}: `{where}` is a value, not a mapping")
                target[part] = dict(child) if isinstance(child, dict) else list(child)  # the caller's data untouched
                target = target[part]
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None, gates: list[str] | None = None) -> Recipe:
    """The recipe in `path`, with the command line's `--set KEY=VALUE` and `--gate KEY=VALUE` applied and recorded
    (`overrides`; a gate as `gates.KEY=VALUE`)."""
    path = Path(path)
    if not path.is_file():
        path = bundled_recipe(path)
    try:
        data = yaml.safe_load(read_text(path, "a YAML recipe"))
    except yaml.YAMLError as exc:
        raise QuantizeError(f"{path}: not valid YAML: {exc}") from None
    source = str(path)
    overrides, gates = list(overrides or []), list(gates or [])
    if overrides or gates:
        if not isinstance(data, dict):
            raise QuantizeError(f"{path}: a recipe is a YAML mapping of keys, got {type(data).__name__}")
        data = apply_overrides(data, overrides, source)
        data = apply_overrides(data, gates, source, flag="--gate", prefix="gates.")
        data["overrides"] = overrides + [f"gates.{g}" for g in gates]
        source += " with " + " ".join([*(f"--set {o}" for o in overrides), *(f"--gate {g}" for g in gates)])
    return parse_recipe(data, source)


def bundled_recipes() -> list[Path]:
    """The recipes shipped in the package (quantize/recipes: package data; in the repository, recipes/)."""
    return sorted(p.resolve() for p in (Path(__file__).resolve().parent / "recipes").glob("*.yaml"))


def bundled_recipe(name: Path) -> Path:
    """A recipe given by a name that is not a file here: `NAME`, `NAME.yaml` or `recipes/NAME.yaml` name a
    bundled recipe (so the README's commands work from any folder, and from an installed wheel)."""
    bundled = {p.stem: p for p in bundled_recipes()}
    stem = name.name.removesuffix(".yaml")
    if name.parent.name in ("", "recipes") and stem in bundled:
        return bundled[stem]
    raise QuantizeError(f"{name}: no such recipe file; bundled recipes: {', '.join(sorted(bundled)) or 'none'}")
