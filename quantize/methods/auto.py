"""The budgeted mix (method `auto`): the least lossy GGUF that weighs at most the budget.

    HF checkpoint ──gguf_convert──▶ F16 GGUF ─┬─ importance matrix (as for gguf) ─┐
                                              └─ sensitivity table (bytes, predicted KLD per tensor × type)
    assign(): min Σ predicted KLD  s.t.  Σ bytes ≤ budget ─▶ llama_model_quantize(tensor types) ─▶ model.gguf

The assignment is a multiple-choice knapsack, solved exactly by dynamic programming over the budget in units
of `unit` bytes (each option's bytes rounded up, so the solution always fits; what the rounding can cost is at
most one unit per tensor of unused budget). Its optimality gap is bounded by the Lagrangian dual of the exact
problem, max_λ Σ_g min_t (kld_gt + λ·bytes_gt) − λ·budget, which no assignment can beat; both are recorded.
The file is written by llama.cpp's own quantiser with one `--tensor-type` override per tensor, and checked
after: every tensor has the type it was given and the file's tensor bytes are within the budget.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from quantize.common.errors import QuantizeError
from quantize.common.ui import step
from quantize.formats import gguf_convert, ollama
from quantize.formats.tensors import gguf_stats
from quantize.methods import gguf as gguf_method, sensitivity
from quantize.methods.configs import MIX_CANDIDATES, SCHEME_CANDIDATES, AutoMethod
from quantize.runtimes import llamacpp
from quantize.sources.models import load_tokenizer

Config = AutoMethod

DP_UNITS = 20000  # the budget's resolution in the dynamic programme
# llama_ftype written as general.file_type, named after the type that holds most bytes (overrides need a
# quantized ftype; every tensor's own type is in the file)
FILE_TYPE = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q6_K": "Q6_K", "Q8_0": "Q8_0",
             "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS"}


def assign(options: list[dict[str, tuple[int, float]]], budget: int, units: int = DP_UNITS
           ) -> tuple[list[str], dict]:
    """options[g] = {type: (bytes, cost)}; the choice per group minimising Σ cost with Σ bytes ≤ budget.
    Returns (choices, solver facts: value, bytes, unit, Lagrangian lower bound, gap)."""
    if budget < sum(min(b for b, _ in o.values()) for o in options):
        raise QuantizeError(f"the budget ({budget} bytes for the quantized tensors) is below the smallest mix "
                            f"({sum(min(b for b, _ in o.values()) for o in options)} bytes)")
    unit = max(1, -(-budget // units))
    cap = budget // unit
    kinds = [list(o) for o in options]
    INF = np.inf
    best = np.full(cap + 1, INF)
    best[0] = 0.0
    picks = np.zeros((len(options), cap + 1), dtype=np.int16)
    for g, o in enumerate(options):
        new = np.full(cap + 1, INF)
        for k, kind in enumerate(kinds[g]):
            w = -(-o[kind][0] // unit)  # rounded up: the rounded problem's solutions fit the real budget
            if w > cap:
                continue
            cand = np.full(cap + 1, INF)
            cand[w:] = best[: cap + 1 - w] + o[kind][1]
            better = cand < new
            new[better], picks[g, better] = cand[better], k
        best = new
    c = int(np.argmin(best))
    if not np.isfinite(best[c]):
        raise QuantizeError(f"no mix fits {budget} bytes")
    value = float(best[c])
    choices = []
    for g in range(len(options) - 1, -1, -1):
        kind = kinds[g][picks[g, c]]
        choices.append(kind)
        c -= -(-options[g][kind][0] // unit)
    choices.reverse()
    used = sum(options[g][k][0] for g, k in enumerate(choices))
    bound = lagrangian_bound(options, budget)
    return choices, {"solver": "multiple-choice knapsack, dynamic programme over the budget in units of "
                               f"{unit} bytes (option bytes rounded up)", "unit_bytes": unit,
                     "predicted_kld": value, "bytes": used, "budget_bytes": budget,
                     "lagrangian_lower_bound": bound, "gap": value - bound}


def lagrangian_bound(options: list[dict[str, tuple[int, float]]], budget: int) -> float:
    """max over λ ≥ 0 of Σ_g min_t (cost + λ·bytes) − λ·budget: a lower bound on any feasible assignment's cost.
    The dual is concave and piecewise linear in λ; its maximum lies at a breakpoint, where it is found."""
    def dual(lam):
        return sum(min(c + lam * b for b, c in o.values()) for o in options) - lam * budget

    slopes = {0.0}
    for o in options:  # breakpoints: λ where two options of one group cost the same
        items = list(o.values())
        for i, (b1, c1) in enumerate(items):
            for b2, c2 in items[i + 1:]:
                if b1 != b2 and (c2 - c1) / (b1 - b2) > 0:
                    slopes.add((c2 - c1) / (b1 - b2))
    return max(dual(lam) for lam in sorted(slopes))


def build(method: AutoMethod, base, out_dir: Path, calib: torch.Tensor, calib_info: dict | None = None) -> dict:
    if method.budget.gpu and not (method.budget.weight_bytes or method.budget.weight_bytes_by_kv):
        raise QuantizeError("a gpu budget is resolved to bytes by the run (pipeline); build got none")
    if method.target == "compressed-tensors":
        return build_compressed(method, base, out_dir, calib, calib_info)
    return build_gguf(method, base, out_dir, calib, calib_info)


def build_compressed(method: AutoMethod, base, out_dir: Path, calib: torch.Tensor, calib_info: dict | None) -> dict:
    """The budgeted mix as compressed-tensors: one scheme per group of linears vLLM fuses (q/k/v, gate/up) or per
    linear (o, down), from the candidates vLLM's WNA16 kernels load (4 or 8 bits, symmetric) or fp16 (the linear
    left unquantized), built by RTN or GPTQ with per_module schemes."""
    from quantize.methods import gptq, rtn
    from quantize.methods.configs import CONFIGS
    from quantize.methods.statistics import importance_matrix
    from quantize.formats.compressed_tensors import storage_dtype
    from quantize.formats.tensors import weight_bytes
    from quantize.sources.models import ignored
    from quantize.sources.architectures import streamed_layer
    from quantize.sources.shards import Shards

    config = base.config
    shards = Shards(base.path)
    stored = set(shards.names())  # a row may name linears this configuration lacks (architectures.present)
    groups_by_layer = [(i, [f"model.layers.{i}.{n}" for n in g if f"model.layers.{i}.{n}.weight" in stored])
                       for i in range(config["num_hidden_layers"]) for g in streamed_layer(config).groups]
    groups_by_layer = [(i, g) for i, g in groups_by_layer if g]
    groups_by_layer = [(i, g) for i, g in groups_by_layer if not any(ignored(m, method.ignore) for m in g)]
    members = {f"{m}.weight" for _, g in groups_by_layer for m in g}
    fixed = sum(2 * math.prod(shards.shape(n)) for n in shards.names() if n not in members)  # stored 2-byte
    sums, counts = importance_matrix(base.path, calib)
    importance = {k: (sums[k] / counts[k]).numpy() for k in sums}
    ids = calib[: method.sensitivity_samples]
    groups, fixed, provenance = sensitivity.measure_linear(base.path, groups_by_layer, importance, ids,
                                                           table_types(method, SCHEME_CANDIDATES), method.probe_bpw,
                                                           storage_dtype(config), fixed)
    b = method.budget
    if b.scheme:  # what that scheme weighs on every group (its per-channel form where its group size does not fit)
        bits = sensitivity.scheme(b.scheme)[0]
        budget = fixed + sum(g.options.get(b.scheme, g.options.get(f"w{bits}ch", {})).get("bytes") or
                             _no_fit(b.scheme, g) for g in groups)
    else:
        params = sum(math.prod(shards.shape(n)) for n in shards.names())
        budget = b.bytes or b.weight_bytes or int(b.bpw * params / 8)
    groups = only(groups, method.candidate_types)
    choices, solver, by_bytes = choose(groups, budget, fixed)
    per_module, keep_fp16 = [], []
    for g, kind in zip(groups, choices):
        pattern = "^(" + "|".join(re.escape(m) for m in g.modules) + ")$"
        if kind == "fp16":
            keep_fp16.append(pattern)
        else:
            bits, gs = sensitivity.scheme(kind)
            per_module.append({"match": pattern, "bits": bits, "group_size": gs})
    quantizer = CONFIGS[method.quantizer](name=method.quantizer, bits=4, group_size=128, sym=True,
                                          per_module=per_module, ignore=[*method.ignore, *keep_fp16],
                                          variant=method.default_variant(), device=method.device)
    info = {"gptq": gptq, "rtn": rtn}[method.quantizer].build(quantizer, base, out_dir, calib if method.quantizer == "gptq" else None,
                                           calib_info)
    written = sum(weight_bytes(out_dir).values())
    if written > budget:
        raise QuantizeError(f"{out_dir}: {written} bytes of tensors, over the budget of {budget}")
    return {**info, "bytes": written, "quantizer": quantizer.model_dump(mode="json"),
            **write_mix(out_dir, "modules", groups, choices, solver, provenance, by_bytes, b, budget)}


def choose(groups: list, budget: int, fixed: int) -> tuple[list[str], dict, dict[str, int]]:
    """The assignment of the table's groups within `budget` bytes (`fixed` of them taken by the other tensors):
    (type per group, solver facts over the whole file, bytes by type)."""
    options = [{k: (o["bytes"], o["predicted"]) for k, o in g.options.items()} for g in groups]
    choices, solver = assign(options, budget - fixed)
    solver.update(budget_bytes=budget, fixed_bytes=fixed, bytes=solver["bytes"] + fixed)
    by_bytes: dict[str, int] = {}
    for g, k in zip(groups, choices):
        by_bytes[k] = by_bytes.get(k, 0) + g.options[k]["bytes"]
    step(f"mix for {budget} bytes: " + ", ".join(f"{k} {choices.count(k)}" for k in sorted(by_bytes))
         + f"; predicted KLD {solver['predicted_kld']:.4g} (lower bound {solver['lagrangian_lower_bound']:.4g})")
    return choices, solver, by_bytes


def choose_kv(groups: list, fixed: int, left_by_kv: dict[str, int], costs: dict[str, dict]) -> tuple[dict, tuple]:
    """kv_dtype auto: for each cache type the mix of the bytes it leaves for weights; the type whose mix's predicted
    KLD plus the cache's own measured KLD is least. Returns ({"chosen", "options": per type}, choose()'s result)."""
    options, solved = {}, {}
    for kv, left in left_by_kv.items():
        try:
            if left <= 0:
                raise QuantizeError("the cache and the overhead leave nothing for the weights")
            solved[kv] = choose(groups, left, fixed)
        except QuantizeError as exc:  # this cache leaves less than the smallest mix
            options[kv] = {"weight_budget_bytes": left, "kv_kld": costs[kv]["kld"], "fits": False, "why": str(exc)}
            continue
        weights = solved[kv][1]["predicted_kld"]
        options[kv] = {"weight_budget_bytes": left, "predicted_weights_kld": weights, "kv_kld": costs[kv]["kld"],
                       "predicted_kld": weights + costs[kv]["kld"], "fits": True}
    if not solved:
        raise QuantizeError("no mix fits with any KV cache type (" + "; ".join(
            f"{kv}: {o['weight_budget_bytes']} bytes for weights" for kv, o in options.items()) + ")")
    chosen = min(solved, key=lambda kv: options[kv]["predicted_kld"])
    step(f"KV cache {chosen}: predicted KLD " + ", ".join(
        f"{kv} {o['predicted_kld']:.4g}" if o["fits"] else f"{kv} does not fit" for kv, o in options.items()))
    return {"chosen": chosen, "options": options,
            "how": "per KV cache type: the mix of the bytes it leaves for weights (predicted KLD) + the cache's own "
                   f"KLD against an F16 cache on the F16 GGUF ({next(iter(costs.values()))['tokens']} calibration "
                   "positions, flash attention on); the least sum"}, solved[chosen]


def write_mix(out_dir: Path, label: str, groups: list, choices: list[str], solver: dict, provenance: dict,
              by_bytes: dict[str, int], budget_spec, budget: int) -> dict:
    """mix.json beside the artefact (each group's type, bytes, prediction, probe KLD; groups named by `label`:
    "tensor" for GGUF, "modules" for compressed-tensors) and the manifest's budget / mix / predicted_kld."""
    mix = [{label: g.name if label == "tensor" else g.modules, "type": k, "bytes": g.options[k]["bytes"],
            "predicted_kld": g.options[k]["predicted"], "probe": g.probe, "probe_kld": g.measured}
           for g, k in zip(groups, choices)]
    (out_dir / "mix.json").write_text(json.dumps({"solver": solver, "sensitivity": provenance, "tensors": mix},
                                                 indent=1))
    return {"budget": {**budget_spec.model_dump(mode="json", exclude_none=True), "bytes_resolved": budget},
            "mix": {"solver": solver, "sensitivity": provenance, "bytes_by_type": by_bytes,
                    "tensors_by_type": {k: choices.count(k) for k in sorted(by_bytes)}},
            "predicted_kld": solver["predicted_kld"]}


def table_types(method: AutoMethod, defaults: list[str]) -> list[str]:
    """The types the sensitivity table measures: the defaults and any other candidate asked for, so that one cached
    table serves every candidate list (the mix then chooses among the recipe's candidates only)."""
    extra = [*method.candidate_types, *([method.budget.scheme] if method.budget.scheme else [])]
    return list(defaults) + [k for k in dict.fromkeys(extra) if k not in defaults]


def only(groups: list, kinds: list[str]) -> list:
    """The table with each group's options narrowed to `kinds` (a group left without one is an error)."""
    for g in groups:
        g.options = {k: o for k, o in g.options.items() if k in kinds}
        if not g.options:
            raise QuantizeError(f"{g.name}: none of the candidates {kinds} fits it")
    return groups


def _no_fit(kind: str, g) -> int:
    raise QuantizeError(f"budget scheme {kind}: neither it nor its per-channel form fits {g.modules}")


def build_gguf(method: AutoMethod, base, out_dir: Path, calib: torch.Tensor, calib_info: dict | None) -> dict:
    lib = llamacpp.binding()
    target = out_dir / "model.gguf"
    work = out_dir / "work"
    work.mkdir(exist_ok=True)
    metadata = gguf_method.gguf_metadata(base)
    source = gguf_convert.convert(base.path, work / "base-f16.gguf", "F16", name=base.name, metadata=metadata)
    arch_map = gguf_convert.tensor_names(gguf_convert.gguf_arch(source), base.config["num_hidden_layers"])
    imatrix, imatrix_info = gguf_method.importance(base, source, calib, calib_info, out_dir)
    ids = calib[: method.sensitivity_samples]
    groups, fixed, provenance = sensitivity.measure(base.path, source, arch_map, imatrix, ids,
                                                    table_types(method, MIX_CANDIDATES), method.probe_bpw)
    groups = only(groups, method.candidate_types)
    stats = gguf_stats(source)
    b = method.budget
    if b.mix:  # what llama.cpp's own mix weighs, quantized for real with the same importance matrix
        standard = work / f"standard-{b.mix}.gguf"
        llamacpp.quantize(source, standard, b.mix, imatrix)
        budget = gguf_stats(standard)["bytes"]
        standard.unlink()
    elif not b.weight_bytes_by_kv:
        budget = b.bytes or b.weight_bytes or int(b.bpw * stats["params"] / 8)
    kv_choice = None
    if b.weight_bytes_by_kv:  # kv_dtype auto: the cache type and the mix whose KLDs add up least
        costs = sensitivity.kv_cache_costs(base.path, source, ids, list(b.weight_bytes_by_kv))
        kv_choice, (choices, solver, by_bytes) = choose_kv(groups, fixed, b.weight_bytes_by_kv, costs)
        budget = b.weight_bytes_by_kv[kv_choice["chosen"]]
    else:
        choices, solver, by_bytes = choose(groups, budget, fixed)
    types = {g.name: k for g, k in zip(groups, choices)}
    main = max((k for k in by_bytes if k in FILE_TYPE), key=by_bytes.get, default="Q8_0")
    extra = {**imatrix_info.pop("metadata", {}), "quantize.mix.budget_bytes": budget,
             "quantize.mix.predicted_kld_x1e6": int(round(solver["predicted_kld"] * 1e6))}
    llamacpp.quantize(source, target, FILE_TYPE[main], imatrix, extra, tensor_types=types)
    written = check_written(target, types, budget)
    shutil.rmtree(work)
    info = {"format": "gguf", "type": f"auto ({main} mostly)", "llama_cpp_python": lib.__version__,
            **write_mix(out_dir, "tensor", groups, choices, solver, provenance, by_bytes, b, budget),
            **imatrix_info, **written}
    if kv_choice:  # predicted_kld stays the weights' (the main evaluation runs an F16 cache)
        info["kv_cache"] = kv_choice
    tokenizer = load_tokenizer(base.path)
    num_ctx = min(method.num_ctx, base.config.get("max_position_embeddings") or method.num_ctx)
    (out_dir / "Modelfile").write_text(ollama.modelfile(tokenizer, base.path, target.name, num_ctx))
    (out_dir / "README.md").write_text(model_card(base, info))
    return info


def check_written(path: Path, types: dict[str, str], budget: int) -> dict:
    """The file as llama.cpp wrote it: each tensor of the mix in its type, all tensors within the budget."""
    import gguf

    reader = gguf.GGUFReader(path)
    wrong = [(t.name, t.tensor_type.name, types[t.name]) for t in reader.tensors
             if t.name in types and t.tensor_type.name != types[t.name]]
    if wrong:
        raise QuantizeError(f"llama.cpp wrote {len(wrong)} tensors in another type than assigned, e.g. {wrong[:3]}")
    stats = gguf_stats(path)
    if stats["bytes"] > budget:
        raise QuantizeError(f"{path}: {stats['bytes']} bytes of tensors, over the budget of {budget}")
    return stats


def model_card(base, info: dict) -> str:
    mix = info["mix"]
    return "\n".join([
        f"# {base.path.name}: GGUF, budgeted mix", "",
        f"- base model: {base.describe()}",
        f"- budget: {info['budget']['bytes_resolved']} bytes of tensors ({json.dumps(info['budget'])}); written: "
        f"{info['bytes']} bytes, {info['bits_per_weight']:.3f} bits per weight",
        "- tensors by type: " + ", ".join(f"{k} {n}" for k, n in mix["tensors_by_type"].items()),
        f"- predicted KLD to the base: {info['predicted_kld']:.4g} (sum of per-tensor predictions from KLDs measured "
        f"on {mix['sensitivity']['tokens']} calibration tokens; the measured figure is in results.json)",
        *([f"- KV cache: {info['kv_cache']['chosen']} (run llama.cpp with -ctk {info['kv_cache']['chosen']} -ctv "
           f"{info['kv_cache']['chosen']} -fa on): chosen with the mix, " + ", ".join(
               f"{kv}: {o['predicted_kld']:.4g}" if o["fits"] else f"{kv}: does not fit"
               for kv, o in info["kv_cache"]["options"].items()) + " predicted"] if "kv_cache" in info else []),
        f"- quantized by llama.cpp's own quantiser (llama-cpp-python {info['llama_cpp_python']}), one tensor type "
        "per tensor (mix.json lists them; llama-quantize --tensor-type reproduces it with imatrix.gguf)", "",
        "Run: `llama-cli -m model.gguf` · `ollama create NAME -f Modelfile` · LM Studio: load model.gguf.", ""])
