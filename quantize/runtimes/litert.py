"""LiteRT (TensorFlow Lite) artefacts, built and scored with LiteRT's own tools in the managed `litert` environment
(runtimes/engines.py) through runtimes/workers/litert_worker.py; our process never imports them.

    build(folder)        a symmetric compressed-tensors folder → the same folder as a LiteRT artefact: model.tflite
                         (prefill_<PREFILL_LENGTH> and decode signatures, CACHE_LENGTH KV cells) whose FULLY_CONNECTED
                         weights hold our codes and scales, checked by reading the written file back, and its
                         LiteRT-LM bundle model.litertlm
    build_with_recipe    the base model through one of ai-edge-quantizer's own recipes (the baseline)
    generate(folder)     a greedy chat answer from model.litertlm on LiteRT-LM's CPU engine
    LiteRTModel(folder)  scored on LiteRT's interpreter (XNNPack on the CPU): each chunk teacher-forced through the
                         decode signature, the log-probabilities of every position

What LiteRT computes by default is not a float matmul with our weights: its dynamic-range kernels quantize each
input row to int8 at run time (ai-edge-quantizer's `compute_precision: INTEGER`, `explicit_dequantize: false`),
which is the model a phone runs and the one scored here. 8-bit per-channel weights can instead be dequantized in
the graph (`litert_compute: float`): then LiteRT's logits equal a float evaluation of the same codes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from quantize.common.errors import QuantizeError
from quantize.formats import litert as litert_format
from quantize.runtimes import engines

WORKER = engines.WORKERS / "litert_worker.py"
PREFILL_LENGTH = 128  # the prefill signature's tokens per call
CACHE_LENGTH = 1024  # KV cells of both signatures: the longest context the file runs, and the longest chunk scored


DYNAMIC_RANGE = "float32, quantized to int8 per row at run time by LiteRT's dynamic-range kernels"
FLOAT_COMPUTE = "float32: the int8 weights dequantized in the graph (DEQUANTIZE) and float matmuls"


def version() -> str:
    """The pinned LiteRT tools, as the engine's row installs them (litert-torch's version is the probe's)."""
    pins = dict(r.split("==") for r in engines.engine("litert").requirements)
    return f"litert-torch {pins['litert-torch']}, ai-edge-quantizer {pins['ai-edge-quantizer']}, " \
           f"ai-edge-litert {pins['ai-edge-litert']}"


def run_worker(request: dict, what: str) -> dict:
    """One worker action (see the worker's docstring); its answer, or a refusal with the worker's last lines."""
    python = engines.require("litert")
    with tempfile.TemporaryDirectory(prefix="quantize-litert-") as tmp:
        request = {**request, "answer": str(Path(tmp) / "answer.json")}
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        done = subprocess.run([str(python), str(WORKER), str(Path(tmp) / "request.json")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=engines.environment())
        if done.returncode != 0 or not Path(request["answer"]).is_file():
            lines = [line for line in done.stdout.splitlines() if line.strip() and not line.startswith(("I0000", "W0000"))]
            raise QuantizeError(f"{what}: LiteRT {version()} failed: {' | '.join(lines[-3:])[-900:]}")
        return json.loads(Path(request["answer"]).read_text())


def export(dense: Path, out: Path, what: Path, **quantization) -> dict:
    """litert-torch's export of a float32 Hugging Face folder: out/model.tflite; with `quantization` (the worker's
    codes or recipe keys) also out/model_quantized.tflite and the .litertlm bundle holding it."""
    return run_worker({"action": "export", "model": str(dense), "out": str(out), "prefill_length": PREFILL_LENGTH,
                       "cache_length": CACHE_LENGTH, **quantization}, f"export of {what}")


def build(folder: Path, weight_only: bool = False) -> dict:
    """Turn the symmetric compressed-tensors checkpoint in `folder` into a LiteRT artefact in place: model.tflite,
    model.litertlm, config.json (without quantization_config), the tokenizer and litert.json; the checkpoint's
    tensors are removed. `weight_only`: the weights dequantized in the graph and float matmuls (8-bit per channel),
    instead of LiteRT's dynamic-range kernels."""
    with tempfile.TemporaryDirectory(prefix="litert-", dir=folder.parent) as tmp:
        tmp = Path(tmp)
        codes = litert_format.dense_and_codes(folder, tmp / "dense", tmp / "codes.safetensors")
        made = export(tmp / "dense", tmp / "out", folder, codes=str(tmp / "codes.safetensors"), bits=codes["bits"],
                      weight_only=weight_only)
        check = made["check"]
        if made["missing"] or check["differ"] or check["equal"] != codes["linears"]:
            raise QuantizeError(f"{folder}: the LiteRT file does not hold our codes: {made['replaced']} of "
                                f"{codes['linears']} linears replaced, missing {made['missing'][:3]}, read back "
                                f"equal {check['equal']}, differing {check['differ'][:3]}")
        for f in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
            f.unlink(missing_ok=True)
        _publish(tmp, made, folder)
    layout = (f"INT4 blocks of {codes['block']}, float16 scales" if codes["bits"] == 4
              else "INT8 per output channel, float32 scales")
    return _describe(folder, made, weights=f"our codes: {layout}", linears=codes["linears"],
                     scales_raised=codes["scales_raised"], read_back_equal=check["equal"],
                     **({"activations": FLOAT_COMPUTE} if weight_only else {}))


def build_with_recipe(base: Path, folder: Path, recipe: str, linears_only: bool = False) -> dict:
    """LiteRT's own baseline: the base model's float export quantized by ai-edge-quantizer's `recipe` (on every op
    it names, or with `linears_only` on the decoder's linears alone, as our methods quantize)."""
    with tempfile.TemporaryDirectory(prefix="litert-", dir=folder.parent) as tmp:
        tmp = Path(tmp)
        litert_format.dense_checkpoint(base, tmp / "dense")
        made = export(tmp / "dense", tmp / "out", base, recipe=recipe, linears_only=linears_only)
        _publish(tmp, made, folder)
    scope = ", the decoder's linears only (embedding and logits head float32)" if linears_only else ""
    return _describe(folder, made, weights=f"ai-edge-quantizer recipe {recipe}{scope}")


def _publish(tmp: Path, made: dict, folder: Path) -> None:
    """The quantized model as model.tflite, its bundle as model.litertlm, the dense folder's config and tokenizer."""
    shutil.move(str(tmp / "out" / "model_quantized.tflite"), folder / litert_format.MODEL_FILE)
    if made.get("bundle"):
        shutil.move(made["bundle"], folder / litert_format.BUNDLE_FILE)
    for f in (tmp / "dense").iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)


def _describe(folder: Path, made: dict, **facts) -> dict:
    info = {"engine": version(),
            "activations": DYNAMIC_RANGE, **facts,
            "signatures": [f"prefill_{PREFILL_LENGTH}", "decode"], "cache_length": CACHE_LENGTH,
            "bytes_by_type": made["bytes_by_type"], "kv_cache_bytes": made["kv_cache_bytes"],
            "bundle": litert_format.BUNDLE_FILE if made.get("bundle") else None,
            "export_and_quantize_seconds": made["seconds"]}
    (folder / litert_format.INFO_FILE).write_text(json.dumps(info, indent=1))
    return info


def device_fit(on_device: dict) -> dict:
    """The fit entry of a LiteRT variant (plan and run): no GPU rows, its memory on the device instead."""
    return {"rows": [], "largest_context": {}, "protocol": {"engine": "litert"}, "on_device": on_device}


def memory(folder: Path) -> dict:
    """What the LiteRT artefact holds in memory on the device besides activations: its constant tensors and the KV
    cache its decode signature threads (float32, a fixed number of cells), as counted when the file was written."""
    info = json.loads((folder / litert_format.INFO_FILE).read_text())
    weights = sum(info["bytes_by_type"].values())
    return {"weights_bytes": weights, "kv_cache_bytes": info["kv_cache_bytes"], "cache_length": info["cache_length"],
            "total_bytes": weights + info["kv_cache_bytes"],
            "note": "constant tensors of model.tflite + the decode signature's float32 KV cache tensors at its "
                    "cache length; activations and the runtime not counted"}


def generate(folder: Path, prompt: str, max_tokens: int) -> dict:
    """A greedy chat answer from the folder's .litertlm on LiteRT-LM's CPU engine: {answer, load_s, answer_s}."""
    return run_worker({"action": "generate", "model": str(folder / litert_format.BUNDLE_FILE), "prompt": prompt,
                       "tokenizer": str(folder), "max_tokens": max_tokens}, f"LiteRT-LM generation from {folder}")


class LiteRTModel:
    streamed = True  # scored by chunk_logits over every chunk at once

    def __init__(self, path: Path, threads: int = 2):
        self.path, self.threads = Path(path), threads
        engines.require("litert")
        config = json.loads((self.path / "config.json").read_text())
        self.vocab_size = int((config.get("text_config") or config)["vocab_size"])
        info_file = self.path / litert_format.INFO_FILE
        self.info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        self.version = version()
        self.settings = (f"ai-edge-litert interpreter (XNNPack), {threads} threads, decode signature teacher-forced "
                         f"from an empty cache of {self.info.get('cache_length', '?')} cells")

    def chunk_logits(self, ids: torch.Tensor):
        """(chunk index, log-probabilities [n, vocab]) for every chunk of ids [chunks, n]: row t predicts t + 1."""
        with tempfile.TemporaryDirectory(prefix="quantize-litert-") as tmp:
            tmp = Path(tmp)
            np.save(tmp / "ids.npy", ids.numpy().astype(np.int64))
            self.last = run_worker({"action": "score", "model": str(self.path / litert_format.MODEL_FILE),
                                    "ids": str(tmp / "ids.npy"), "out": str(tmp / "out"), "threads": self.threads},
                                   f"scoring {self.path}")
            for i in range(ids.shape[0]):
                yield i, torch.from_numpy(np.load(tmp / "out" / f"chunk_{i}.npy"))

    def speed_note(self) -> str:
        """No llama-bench run on LiteRT yet: the decode rate its scoring measured, said as what it is."""
        last = getattr(self, "last", None)
        if not last:
            return "LiteRT: no speed run"
        return (f"LiteRT: no llama-bench run; scoring decoded {last['tokens']} tokens teacher-forced through the "
                f"decode signature at {last['ms_per_token']} ms per token ({last['threads']} threads, "
                f"{last['cache_length']}-cell cache, positions 0 to the chunk length, Python's loop and a float64 "
                "log-softmax per token included)")

    def close(self) -> None:
        pass
