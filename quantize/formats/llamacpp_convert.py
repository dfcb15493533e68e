"""HF → GGUF through llama.cpp's own converter (convert_hf_to_gguf.py, its conversion/ package of one module per
architecture, and its gguf-py), the one that ships with the llama.cpp we run: every architecture llama.cpp knows
converts as llama.cpp itself converts it.

The converter is not in the llama-cpp-python wheel; it is in that package's sdist. `converter()` takes it from the
sdist of the installed llama-cpp-python version (fetched from the package index by name, once, into the cache
folder), or from a llama.cpp checkout named by QUANTIZE_LLAMA_CPP.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from quantize.common.cache import cache_root
from quantize.common.errors import QuantizeError
from quantize.common.files import read_json
from quantize.sources.architectures import ARCHITECTURES
from quantize.sources.shards import Shards

SCRIPT = "convert_hf_to_gguf.py"
# the converter, and the chat templates llama.cpp tests against (real models' Jinja, tests/test_ollama.py)
PARTS = (SCRIPT, "conversion/", "gguf-py/", "models/templates/")
OUT_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}


def converter() -> Path:
    """The converter script, beside its conversion/, gguf-py/ and models/templates/."""
    checkout = os.environ.get("QUANTIZE_LLAMA_CPP")
    if checkout:
        script = Path(checkout) / SCRIPT
        if not script.is_file():
            raise QuantizeError(f"QUANTIZE_LLAMA_CPP={checkout}: no {SCRIPT} there (a llama.cpp checkout holds it)")
        return script
    version = metadata.version("llama-cpp-python")
    folder = cache_root() / f"llama.cpp-sdist-parts-{version}"
    if (folder / SCRIPT).is_file():
        return folder / SCRIPT
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                              f"llama-cpp-python=={version}", "-d", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode != 0 or not sdists:
            raise QuantizeError(f"GGUF conversion needs llama.cpp's converter from the llama-cpp-python {version} "
                                f"sdist, which pip could not fetch ({got.stderr.strip()[-300:]}); or set "
                                "QUANTIZE_LLAMA_CPP to a llama.cpp checkout of the same version")
        partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                inner = member.name.split("/vendor/llama.cpp/", 1)
                if len(inner) == 2 and inner[1].startswith(PARTS) and member.isfile():
                    member.name = inner[1]
                    tar.extract(member, partial, filter="data")
        try:
            partial.rename(folder)
        except OSError:  # another process extracted it first
            shutil.rmtree(partial, ignore_errors=True)
    return folder / SCRIPT


def supports(config: dict) -> bool:
    """Whether llama.cpp's converter registers the model's architecture (config.json `architectures`, or where a
    config lacks it, transformers' causal-LM class for its model_type)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    registered = set()
    for module in (converter().parent / "conversion").glob("*.py"):
        for call in re.findall(r"@ModelBase\.register\(([^)]*)\)", module.read_text()):
            registered.update(re.findall(r'"([^"]+)"', call))
    archs = config.get("architectures") or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"), "")]
    return any(arch in registered for arch in archs)


def convert(model_dir: Path, out_file: Path, out_type: str = "F16", name: str | None = None,
            metadata: dict | None = None) -> Path:
    """Write `out_file` with llama.cpp's converter (via a temporary name, renamed when complete). `name` and the
    `general.*` keys of `metadata` go in through the converter's --model-name and --metadata override file (its
    base models as one `general.base_models` list)."""
    if out_type not in OUT_TYPES:
        raise QuantizeError(f"GGUF out type {out_type!r} for llama.cpp's converter; accepted: {', '.join(OUT_TYPES)}")
    partial = out_file.with_name(out_file.name + ".partial")
    config = read_json(model_dir / "config.json", "a Hugging Face config.json")
    arch = ARCHITECTURES.get(config.get("model_type"))
    with tempfile.TemporaryDirectory() as tmp:
        source = with_converter_keys(model_dir, config, arch, Path(tmp))
        no_mtp = not has_mtp_tensors(model_dir, arch)
        _run(source, model_dir, partial, out_type, name, metadata, out_file, no_mtp)
    partial.replace(out_file)
    return out_file


def with_converter_keys(model_dir: Path, config: dict, arch, tmp: Path) -> Path:
    """The folder the converter reads: `model_dir` itself, or, where its config.json lacks keys the converter needs
    (the architecture row's `converter_keys`), a folder of the same name in `tmp` that links every file and holds
    the amended config.json."""
    missing = {k: v for k, v in (arch.converter_keys if arch else {}).items() if k not in config}
    if not missing:
        return model_dir
    view = tmp / model_dir.name  # the same name: the converter takes general.name from it
    view.mkdir()
    for entry in model_dir.iterdir():
        if entry.name != "config.json":
            (view / entry.name).symlink_to(entry.resolve())
    (view / "config.json").write_text(json.dumps({**config, **missing}, indent=2))
    return view


def has_mtp_tensors(model_dir: Path, arch) -> bool:
    """False where the family's published checkpoints carry multi-token-prediction tensors (the architecture row's
    `mtp_tensors`) and this one has none: llama.cpp's converter then needs --no-mtp."""
    if arch is None or arch.mtp_tensors is None:
        return True
    return any(n.startswith((arch.mtp_tensors, "model." + arch.mtp_tensors)) for n in Shards(model_dir).names())


def _run(source: Path, model_dir: Path, partial: Path, out_type: str, name: str | None, metadata: dict | None,
         out_file: Path, no_mtp: bool = False) -> None:
    """The converter on `source` (model_dir or its view) into `partial`; a failure names model_dir."""
    cmd = [sys.executable, str(converter()), str(source), "--outfile", str(partial), "--outtype", OUT_TYPES[out_type]]
    if no_mtp:
        cmd.append("--no-mtp")
    if name:
        cmd += ["--model-name", name]
    override = out_file.with_name(out_file.name + ".metadata.json")
    if metadata:
        flat = {k: v for k, v in metadata.items() if not k.startswith("general.base_model.")}
        bases: dict[int, dict] = {}
        for key, value in metadata.items():
            if found := re.fullmatch(r"general\.base_model\.(\d+)\.(\w+)", key):
                bases.setdefault(int(found.group(1)), {})[found.group(2)] = value
        if bases:
            flat["general.base_models"] = [bases[i] for i in sorted(bases)]
        override.write_text(json.dumps(flat))
        cmd += ["--metadata", str(override)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        override.unlink(missing_ok=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        last = [line for line in done.stderr.splitlines() if line.strip()][-3:]
        raise QuantizeError(f"{model_dir}: llama.cpp's convert_hf_to_gguf.py failed: {' | '.join(last)}")
