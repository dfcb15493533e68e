"""What every streamed weight-only method (RTN, GPTQ, AWQ) shares: the group-size check, the layer loop, the
per-layer log and the writers (compressed-tensors, or the classic gptq/awq layouts). A method that solves one
linear at a time (RTN, GPTQ) hands `build_streamed` its solve:

    solve(W, H | None, group_size, bits) -> Solved(q, scale, zero, row_loss, damp)

H is the linear's input Hessian (methods/statistics.py) when the method calibrates, else None. W may hold the
rows of several linears that share H and the group size (q/k/v, gate/up); the log books the solve's seconds on
the first of them (0 on the others) and names the linears solved with it. The engine knows no method: it
gathers the statistic and calls the solve it was given.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from quantize.common.errors import QuantizeError
from quantize.common.ui import track
from quantize.formats import CLASSIC_BITS
from quantize.formats.classic import ClassicWriter
from quantize.formats.compressed_tensors import CompressedTensorsWriter, storage_dtype
from quantize.formats.mlx import MlxWriter
from quantize.methods import grids
from quantize.methods.checkpoint import Checkpoint
from quantize.methods.configs import GROUP_SIZES
from quantize.methods.device import peak_vram, reset_peak_vram, resolve_device, resolve_forward_dtype
from quantize.methods.engine import quantize_layers, skeleton
from quantize.methods.experts import ExpertPolicy, expert_lists
from quantize.methods.ranks import for_method, resume_point
from quantize.methods.statistics import Hessian, accumulate_hessian
from quantize.runtimes import litert
from quantize.sources.architectures import ARCHITECTURES
from quantize.sources.models import BaseModel, ignored, load_tokenizer


@dataclass
class Solved:
    """One solve of a weight matrix W [rows, cols] onto its group grids."""

    q: torch.Tensor  # integer codes [rows, cols] (int32, natural column order)
    scale: torch.Tensor  # [rows, n_groups]
    zero: torch.Tensor  # [rows, n_groups]
    row_loss: torch.Tensor  # [rows]: the method's loss per output row (GPTQ: Σ_j (w − q)² / Hinv_jj² / 2)
    damp: float = 0.0  # the absolute dampening added to diag(H) (GPTQ)
    extra: dict | None = None  # what else the writer stores (NVFP4: the global scale the stacked linears share)

    @property
    def loss(self) -> float:
        return float(self.row_loss.sum())


def divisors(n: int) -> list[int]:
    """The group sizes a recipe may ask (configs.GROUP_SIZES) that divide n: never one the schema refuses."""
    return [d for d in GROUP_SIZES if n % d == 0]


def group_size_for(name: str, cols: int, group_size: int, on_indivisible: str) -> int:
    """The group size a linear really gets: the recipe's, or per-channel (-1) when its input size is not a
    multiple of it and the recipe allows the fallback; otherwise a clear error."""
    if group_size == -1 or cols % group_size == 0:
        return group_size
    if on_indivisible == "channel":
        return -1
    raise QuantizeError(
        f"{name}: input size {cols} is not divisible by group_size {group_size}; group sizes that work for it: "
        f"{', '.join(map(str, divisors(cols))) or 'none'} or -1 (per channel). Set `group_size`, add the layer "
        "to `ignore`, or set `on_indivisible: channel` to quantize such layers per channel."
    )


def check_group_sizes(model: torch.nn.Module, method) -> None:
    """Fail before any work if a layer cannot take the group size (and no fallback is allowed), or if a classic
    layout (one group size, every decoder linear quantized) cannot hold the result."""
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and ".layers." in name):
            continue
        classic = method.format in CLASSIC_BITS  # one group size, every decoder linear
        if ignored(name, method.ignore):
            if classic:
                raise QuantizeError(f"{name}: format {method.format!r} quantizes every decoder-layer linear; it "
                                    "matches `ignore`. Narrow `ignore` or use format compressed-tensors.")
            continue
        gs = group_size_for(name, module.in_features, method.scheme_for(name)[1], method.on_indivisible)
        if classic and gs != method.group_size:
            raise QuantizeError(f"{name}: input size {module.in_features} is not divisible by group_size "
                                f"{method.group_size}, and format {method.format!r} holds one group size for all "
                                f"linears; group sizes that work for it: {', '.join(map(str, divisors(module.in_features)))}"
                                " or use format compressed-tensors (per-channel fallback)")


def with_format_rules(method, config: dict):
    """The method with the linears that its format's loader re-quantizes itself on load (the architecture row's
    `keep_float`: mlx-lm's DeepSeek kv_b_proj) added to `ignore`, so the artefact keeps them in float and the loader
    rounds them once, as from its own conversion."""
    arch = ARCHITECTURES.get(config.get("model_type"))
    keep = arch.keep_float.get(method.format, ()) if arch else ()
    if not keep:
        return method
    return method.model_copy(update={"ignore": [*method.ignore, *(rf"\.{re.escape(n)}$" for n in keep)]})


def expert_policy(method) -> ExpertPolicy:
    """The recipe's expert calibration (GPTQ, AWQ) for sparse MoE models; RTN calibrates nothing."""
    return ExpertPolicy(getattr(method, "expert_calibration", "routed"), getattr(method, "expert_min_tokens", None))


def build_streamed(method, base: BaseModel, out_dir: Path, calib: torch.Tensor | None,
                   solve: Callable[[torch.Tensor, Hessian | None, int, int], Solved], keep: dict | None = None,
                   prepare: Callable | None = None, stored=None) -> dict:
    """Under torchrun (methods/ranks.py) every rank runs this on its slice of the calibration samples: the
    Hessians are all-reduced, rank 0 solves each group and broadcasts it, and rank 0 alone writes.
    `prepare(i, layer, acts)` changes each layer before its groups (engine.quantize_layers); `stored`
    (formats/compressed_tensors.Stored) writes the codes themselves: W8A8-INT8, FP8."""
    method = with_format_rules(method, base.config)
    policy = expert_policy(method)
    meta = skeleton(base.path, policy)
    check_group_sizes(meta, method)
    ranks = for_method(method, sparse_moe=any(expert_lists(layer) for layer in meta.model.layers))
    samples = 0 if calib is None else int(calib.shape[0])
    log, pending = [], {}

    def quantize_group(i: int, linears: dict[str, torch.nn.Linear], X: torch.Tensor | None) -> None:
        hess = None
        if X is not None:  # the linears of a group read the same input (q/k/v, gate/up): one Hessian for all
            hess = Hessian.zeros(X.shape[-1], device=X.device)
            for part in X.split(8 if X.dim() == 3 else 4096):  # 8 sequences (an expert's: 4096 tokens) at a time
                accumulate_hessian(hess, part)
            ranks.all_reduce_hessian(hess)  # over every rank's tokens (a no-op in one process)
        # Linears that read the same input (so share H) and get the same group size are solved as one matrix:
        # GPTQ and RTN treat output rows independently, so stacking the rows gives each linear its own result in
        # one column loop instead of one loop per linear.
        by_scheme: dict[tuple[int, int], list[str]] = {}
        for n, lin in linears.items():
            bits, asked = method.scheme_for(f"model.layers.{i}.{n}")
            gs = group_size_for(f"model.layers.{i}.{n}", lin.in_features, asked, method.on_indivisible)
            by_scheme.setdefault((bits, gs), []).append(n)
        for (bits, gs), names in by_scheme.items():
            start = time.perf_counter()
            W = torch.cat([linears[n].weight.data for n in names])
            r = ranks.shared_solve(lambda: solve(W, hess, gs, bits), W.device)  # torchrun: solved on rank 0
            seconds = round(time.perf_counter() - start, 4)
            first = 0
            for n in names:
                lin, full = linears[n], f"model.layers.{i}.{n}"
                rows = slice(first, first + lin.out_features)
                first += lin.out_features
                lin.weight.data = grids.dequantize(r.q[rows], r.scale[rows], r.zero[rows], gs).to(lin.weight.dtype)
                pending[full] = (r.q[rows].cpu(), r.scale[rows].cpu(), r.zero[rows].cpu(), gs, bits, r.extra or {})
                log.append({"layer": i, "module": n, **({"bits": bits} if method.per_module else {}),
                            "group_size": gs, "loss": float(r.row_loss[rows].sum()),
                            "samples": samples, "damp": r.damp,
                            "tokens": 0 if hess is None else hess.n,
                            "seconds": seconds if n == names[0] else 0.0, "solved_with": names})

    not_quantized = lambda name: ignored(name, method.ignore)  # noqa: E731
    device = ranks.device(resolve_device(method.device, f"method {method.name} `device`"))
    forward_dtype, dtype_reason = resolve_forward_dtype(method.forward_dtype, device)
    checkpoint = resume_point(out_dir, ranks)
    reset_peak_vram(device)
    layers = quantize_layers(base.path, ranks.local(calib), quantize_group, not_quantized, meta.config.model_type,
                             method_true_sequential(method), device=device, forward_dtype=forward_dtype,
                             checkpoint=checkpoint, policy=policy, prepare=prepare)
    if ranks.rank != 0:  # run every layer on this rank's share; rank 0 writes (and empties `pending`)
        for _ in layers:
            pending.clear()
        return {}
    info = write_streamed(method, base, out_dir, meta, layers, pending, log, checkpoint=checkpoint, keep=keep,
                          stored=stored)
    return {**info, "device": device, "forward_dtype": str(forward_dtype).removeprefix("torch."),
            "forward_dtype_reason": dtype_reason, **peak_vram(device),
            **({"ranks": ranks.describe(calib)} if ranks.many else {})}


def scheme_name(method) -> str:
    """w{bits}a16, or "mixed" when per_module schemes give some linears other bits."""
    return "mixed" if any(m.bits != method.bits for m in method.per_module) else f"w{method.bits}a16"


def scale_dtype(method, base: BaseModel) -> torch.dtype:
    """The dtype the artefact stores scales in (the solve rounds them to it before coding): the base's storage
    dtype for compressed-tensors and MLX (whose fp32 copy of an fp32 base's scales is then exact), fp16 for the
    classic layouts, bfloat16 for LiteRT."""
    if method.format == "litert":  # ai-edge-quantizer stores block scales as bfloat16 values (formats/litert.py)
        return torch.bfloat16
    return torch.float16 if method.format in CLASSIC_BITS else storage_dtype(base.config)


def write_streamed(method, base: BaseModel, out_dir: Path, meta: torch.nn.Module, layers, pending: dict,
                   log: list[dict], pack: bool = True, checkpoint: Checkpoint | None = None,
                   keep: dict | None = None, stored=None) -> dict:
    """Write each processed layer as it comes: linears listed in `pending` (name → q, scale, zero, group size)
    packed as compressed-tensors, MLX or a classic layout (`method.format`), everything else in the storage dtype; then the rest, the config, tokenizer and the log.
    With pack=False every layer is written dense as it is, e.g. AWQ's scaled-but-unquantised export.
    With a `checkpoint` that holds a state (an interrupted build), the writer and the log continue from it.
    `keep`, when given, receives each processed layer's tensors as the method left them in process (each quantized
    linear holding its dequantized weights), under the checkpoint's names: the model the artefact should reload as."""
    n_layers = meta.config.num_hidden_layers
    if method.format in ("compressed-tensors", "litert"):  # LiteRT: converted from it at the end
        writer = CompressedTensorsWriter(out_dir, base.path, n_layers, stored)
    elif method.format == "mlx":
        writer = MlxWriter(out_dir, base.path, n_layers)
    else:
        extra = {"bits": method.bits, "damp_percent": getattr(method, "damp", None),
                 "true_sequential": getattr(method, "true_sequential", None),
                 "static_groups": getattr(method, "act_order", False), "meta": {"quantizer": [f"quantize {method.name}"]}}
        writer = ClassicWriter(out_dir, base.path, n_layers, method.format, extra)
    resumed_at = 0
    if checkpoint is not None:
        if checkpoint.state is not None:
            resumed_at = checkpoint.next_layer
            writer.restore(checkpoint.state["writer"])
            log[:] = checkpoint.state["log"]
        checkpoint.extra = lambda: {"writer": writer.state(), "log": list(log)}
    for i, layer in track(layers, f"{method.default_variant()} layers", total=n_layers - resumed_at):
        prefix = f"model.layers.{i}."
        tensors = {}
        for pname, p in layer.named_parameters():
            owner = prefix + pname.rsplit(".", 1)[0]
            if pack and owner in pending and pname.endswith("weight"):
                q, scale, zero, gs, bits, extra = pending.pop(owner)
                tensors.update(writer.packed(owner, q, scale, zero, bits, method.sym, gs,
                                             getattr(method, "act_order", False), **extra))
            else:
                tensors[prefix + pname] = p.data.to("cpu", writer.dtype)
        assert not [n for n in pending if n.startswith(prefix)], f"layer {i}: quantized linears left unwritten"
        writer.write_shard(i, tensors)
        book_expert_tokens(log, i, layer)
        if keep is not None:
            keep.update({prefix + k: v.detach().to("cpu", copy=True) for k, v in layer.state_dict().items()})

    # every linear left unquantized goes in the config's ignore list, and every MoE router (`{block}.gate`: a
    # linear of vLLM's model, not of transformers' 3-D MoE block, which no method quantizes; without it in `ignore`
    # vLLM builds a WNA16 kernel for it, as llm-compressor's MoE recipes ignore "re:.*mlp.gate$")
    quantized = {f"model.layers.{r['layer']}.{r['module']}" for r in log}
    names = [n for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)]
    routers = [f"model.layers.{i}.{path.rsplit('.', 1)[0]}.gate" for i, layer in enumerate(meta.model.layers)
               for path, _ in expert_lists(layer)]
    kept = [n for n in names if n not in quantized] + [r for r in routers if r not in names]
    qconfig = writer.finish(kept)
    load_tokenizer(base.path).save_pretrained(out_dir)
    # the artefact's log holds what the method decided; wall times differ between runs, so they go to the
    # manifest (`solve_seconds`) and the same recipe writes the same bytes twice
    seconds = [{"layer": r["layer"], "module": r["module"], "seconds": r["seconds"]} for r in log]
    with open(out_dir / "quantize-log.jsonl", "w") as fh:
        fh.writelines(json.dumps({k: v for k, v in row.items() if k != "seconds"}) + "\n" for row in log)
    if checkpoint is not None:
        checkpoint.done()  # the artefact is complete: no resume state in it
    fmt = method.format if qconfig is not None else "safetensors-fp16"
    extra = {}
    if method.format == "litert" and qconfig is not None:
        extra["litert"] = litert.build(out_dir, weight_only=method.litert_compute == "float")
        qconfig = None  # the .tflite holds the scheme; config.json no longer names one
    if qconfig is not None and getattr(writer, "stored", None) is not None:  # W8A8-INT8, FP8: name the layout
        fmt = f"compressed-tensors ({writer.format})"
    return {"format": fmt, "quantization_config": qconfig, "quantized_linears": len(log), **expert_summary(meta, log),
            "ignored_linears": kept, "total_loss": sum(r["loss"] for r in log),
            "channel_fallback": sorted({r["module"] for r in log
                                        if r["group_size"] != method.scheme_for(f"model.layers.{r['layer']}.{r['module']}")[1]}),
            "solve_seconds": seconds, **({"resumed_at_layer": resumed_at} if resumed_at else {}), **extra}


def book_expert_tokens(log: list[dict], i: int, layer: torch.nn.Module) -> None:
    """Layer i's rows of the log for expert linears get the calibration tokens routed to their expert and what the
    expert was calibrated on (ExpertPolicy): "routed", or "all" (every token entering the block)."""
    for path, experts in expert_lists(layer):
        counts = getattr(experts, "calibration_routed", None)
        if counts is None:  # no calibration (RTN)
            continue
        for row in reversed(log):  # layer i's rows are the log's last ones
            if row["layer"] != i:
                break
            expert = row["module"].removeprefix(path + ".").split(".")[0]
            if row["module"].startswith(path + ".") and expert.isdigit():
                row["routed_tokens"] = counts[int(expert)]
                row["calibrated_on"] = "all" if int(expert) in experts.all_tokens else "routed"


def expert_summary(meta: torch.nn.Module, log: list[dict]) -> dict:
    """For the manifest of a sparse MoE model: the expert calibration policy and the experts that fell back to
    every token (routed fewer than min_tokens)."""
    moe = [m for layer in meta.model.layers for _, m in expert_lists(layer)]
    if not moe:
        return {}
    policy = moe[0].policy
    rows = [r for r in log if "routed_tokens" in r]
    fell_back = sorted({f"model.layers.{r['layer']}.{r['module'].rpartition('.')[0]}" for r in rows
                        if r["calibrated_on"] == "all"}) if policy.calibration == "routed" else []
    return {"experts": {
        "calibration": policy.calibration, "min_tokens": moe[0].min_tokens if policy.calibration == "routed" else None,
        "policy": ("each expert calibrated on the tokens routed to it; an expert routed fewer than min_tokens is "
                   "calibrated on every token entering its block" if policy.calibration == "routed"
                   else "every expert calibrated on every token entering its block"),
        "calibrated_on_all_tokens": fell_back,
        "routed_tokens": {"min": min((r["routed_tokens"] for r in rows), default=None),
                          "max": max((r["routed_tokens"] for r in rows), default=None)}}}


def method_true_sequential(method) -> bool:
    return getattr(method, "true_sequential", True)
