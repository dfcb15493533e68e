"""How much each tensor costs in output quality at each GGML type: the table the budgeted mix (methods/auto.py)
optimises over.

For every quantizable tensor of the GGUF (a "group": one layer's attn_q, …, ffn_down, the embedding, the output
head) and every candidate type whose blocks fit its rows:

- bytes: what llama.cpp stores for it in that type (ggml's own quantiser, runtimes/llamacpp.roundtrip);
- error: the importance-weighted squared error of llama.cpp's rounding, Σ_j E[x_j²] Σ_i (w_ij − ŵ_ij)², the
  diagonal estimate of E‖(W − Ŵ)x‖² (importance = the imatrix's mean x² per input column; a tensor without an
  imatrix entry, the embedding, is quantized without one, and weighs its columns equally);
- measured: the KLD of the model's next-token distribution to the base when this group alone takes the probe
  type (the candidate nearest `probe_bpw`), every other tensor unchanged, on a held-out slice of tokens. The
  model runs in float32 from the slice's cached layer inputs: a tensor of layer i re-runs layers i … L−1 only.

The prediction for (group, type) is gain_g × error(g, type), gain_g = measured_g / error(g, probe): the measured
KLD scales the group's error to what it does to the output (second order: KLD and the error both grow with the
square of the weight perturbation), the error carries it across types. A mix's predicted KLD is the sum over its
groups (independent small perturbations add to second order). Both approximations are checked by measuring the
built artefacts (bench/budget_mix.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from quantize.common.cache import cache_root
from quantize.common.divergence import kl_divergence
from quantize.common.errors import QuantizeError
from quantize.common.ui import step
from quantize.formats.gguf_types import NEEDS_IMATRIX, bits_per_weight
from quantize.runtimes import llamacpp
from quantize.sources.models import load_model

VERSION = 2  # of the table's definition: a cached table from another version is not reused
# (2: probes never take a type that re-finds the tensor's own grid; the probe's KLD in float64, never below 0)
REHIT = 1e-2  # a type whose error is below this share of the tensor's median error re-finds its grid


@dataclass
class Group:
    name: str  # the GGUF tensor, or the fused linears' first module (compressed-tensors)
    modules: list[str]  # the HF modules that take the type together (a tied embedding: the embedding, which is
    # also the output head; compressed-tensors: the linears vLLM fuses, q/k/v and gate/up, or one linear)
    rows: int
    n_per_row: int
    layer: int | None  # decoder layer, or None for the embedding / output head
    options: dict[str, dict]  # type → {"bytes", "error", "predicted"}
    probe: str = ""
    measured: float = 0.0  # KLD with the probe type
    imatrix: bool = False


def quantizable(gguf_path: Path) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """The tensors llama.cpp's quantiser would quantize in a GGUF (llama-quant.cpp tensor_allows_quantization, the
    rules that apply to decoder models) as (name, shape [rows, n_per_row]), and the bytes of all the others."""
    import gguf

    names, fixed = [], 0
    for t in gguf.GGUFReader(gguf_path).tensors:
        if (len(t.shape) >= 2 and t.name.endswith("weight") and "_norm.weight" not in t.name
                and "ffn_gate_inp.weight" not in t.name):
            names.append((t.name, tuple(int(x) for x in reversed(t.shape))))
        else:
            fixed += int(t.n_bytes)
    return names, fixed


def hf_modules(model, names, arch_map) -> dict[str, str]:
    """GGUF tensor name → the HF module whose weight it is (a tied embedding: the embedding for both)."""
    out = {}
    for hf, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            gguf_name = arch_map.get_name(f"{hf}.weight", try_suffixes=(".weight",))
            if gguf_name:
                out.setdefault(gguf_name, hf)
    missing = [n for n, _ in names if n not in out]
    if missing:
        raise QuantizeError(f"the budgeted mix cannot place GGUF tensors {missing[:4]} on the model's modules")
    return out


class Probe:
    """The base model in float32 on a slice of tokens, with every decoder layer's inputs cached, so that one
    weight can be swapped and the output re-computed from its layer onward."""

    def __init__(self, model_path: Path, ids: torch.Tensor):
        self.model = load_model(model_path, "float32")
        self.ids = ids
        self.inner = self.model.model
        self.layers = self.inner.layers
        self.inputs: list[tuple] = []
        hooks = [layer.register_forward_pre_hook(self._keep, with_kwargs=True) for layer in self.layers]
        with torch.no_grad():
            logits = self.model(ids, use_cache=False).logits.float()  # no cache the re-runs would append to
        for h in hooks:
            h.remove()
        self.cap = getattr(self.model.config, "final_logit_softcapping", None)
        self.base = logits  # float32; each sequence's log-softmax in float64 when a KLD is taken
        with torch.no_grad():  # the layer-by-layer path must reproduce the model's own forward
            again = self.logits(0)
        drift = float((again - logits).abs().max())
        if drift > 1e-3:
            raise QuantizeError(f"re-running {type(self.model).__name__} layer by layer moves its logits by {drift}")

    def _keep(self, module, args, kwargs):  # (hidden states, the other arguments, keyword arguments)
        if args:
            self.inputs.append((args[0], args[1:], kwargs))
        else:
            self.inputs.append((kwargs["hidden_states"], (), {k: v for k, v in kwargs.items() if k != "hidden_states"}))

    def logits(self, first: int) -> torch.Tensor:
        """The output with layers `first` … L−1 re-run from their cached inputs (first 0: from the embedding)."""
        if first == 0:
            h = self.inner.embed_tokens(self.ids)
        else:
            h = self.inputs[first][0]
        for j in range(first, len(self.layers)):
            _, args, kwargs = self.inputs[j]
            out = self.layers[j](h, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        logits = self.model.lm_head(self.inner.norm(h)).float()
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits

    def kld(self, weights: dict[str, torch.Tensor], layer: int | None) -> float:
        """Mean KLD(base ‖ model) per token with each named module's weight replaced: log-softmax and sums in
        float64 (a tiny perturbation's KLD is far below float32's rounding of a 262k-term sum), never below 0."""
        params = {m: self.model.get_submodule(m).weight for m in weights}
        saved = {m: p.data for m, p in params.items()}
        for m, p in params.items():
            p.data = weights[m]
        try:
            with torch.no_grad():
                first = 0 if layer is None else layer
                total = 0.0
                logits = self.logits(first)
                for b in range(self.ids.shape[0]):  # one sequence at a time: [seq, vocab] temporaries
                    q = torch.log_softmax(logits[b].double(), -1)
                    p = torch.log_softmax(self.base[b].double(), -1)
                    total += float(kl_divergence(p, q).sum())
        finally:
            for m, p in params.items():
                p.data = saved[m]
        return max(total / self.ids.numel(), 0.0)


def table_key(model_path: Path, ids: torch.Tensor, importance: dict, candidates, probe_bpw: float,
              target: str = "gguf") -> str:
    h = hashlib.sha256(json.dumps({"v": VERSION, "candidates": list(candidates), "probe_bpw": probe_bpw,
                                   "target": target}).encode())
    for f in sorted(model_path.glob("*.safetensors")):
        h.update(f.name.encode() + str(f.stat().st_size).encode() + str(f.stat().st_mtime_ns).encode())
    h.update(ids.numpy().tobytes())
    for k in sorted(importance):
        h.update(k.encode() + np.asarray(importance[k], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def measure(model_path: Path, f16_gguf: Path, arch_map, importance: dict[str, np.ndarray], ids: torch.Tensor,
            candidates: list[str], probe_bpw: float) -> tuple[list[Group], int, dict]:
    """The table for a model (cached under the cache folder by model files, slice, importance, candidates).
    Returns (groups, bytes of the tensors that stay as they are, provenance)."""
    names, fixed = quantizable(f16_gguf)
    cached = cache_root() / "sensitivity" / f"{table_key(model_path, ids, importance, candidates, probe_bpw)}.json"
    if cached.is_file():
        return load_table(cached)
    probe = Probe(model_path, ids)
    modules = hf_modules(probe.model, names, arch_map)
    layer_of = {m: int(m.split(".")[2]) for m in modules.values() if m.startswith("model.layers.")}
    groups = []
    for kind in candidates:  # ggml sets up its per-type tables on first use: once, before the threads share them
        if llamacpp.fits_rows(kind, 256):
            llamacpp.roundtrip(kind, np.ones((1, 256), dtype=np.float32), np.ones(256, dtype=np.float32))
    pool = ThreadPoolExecutor(os.cpu_count() or 1)  # ggml's quantisers run without the GIL (ctypes releases it)
    for n, (name, (rows, n_per_row)) in enumerate(names):
        module = modules[name]
        weight = probe.model.get_submodule(module).weight.data
        if tuple(weight.shape) != (rows, n_per_row):
            raise QuantizeError(f"{name}: GGUF shape {(rows, n_per_row)}, HF {module} {tuple(weight.shape)}")
        w16 = weight.half().float().numpy()  # what the F16 GGUF holds, which llama.cpp quantizes
        imp = importance.get(name)
        g = Group(name, [module], rows, n_per_row, layer_of.get(module), {}, imatrix=imp is not None)
        weights = np.ones(n_per_row, dtype=np.float64) if imp is None else np.asarray(imp, dtype=np.float64)
        kinds = [k for k in candidates if llamacpp.fits_rows(k, n_per_row)
                 and not (imp is None and k in NEEDS_IMATRIX)]  # llama.cpp would refuse to write it
        deq = {}
        for kind, (d, stored) in zip(kinds, pool.map(lambda k: llamacpp.roundtrip(k, w16, imp), kinds)):
            err = float((((d - w16).astype(np.float64) ** 2).sum(0) * weights).sum())
            g.options[kind] = {"bytes": int(stored.size), "error": err}
            deq[kind] = d
        quantized = [k for k in g.options if k not in ("F16", "BF16", "F32")]
        if not quantized:
            raise QuantizeError(f"{name}: none of the candidate types {candidates} holds rows of {n_per_row}")
        g.probe = probe_type(g, quantized, bits_per_weight, probe_bpw)
        probe_group(probe, g, {module: torch.from_numpy(deq[g.probe])}, f"{n + 1}/{len(names)}")
        groups.append(g)
    pool.shutdown()
    return save_table(cached, groups, fixed, ids, probe_bpw, candidates)


def probe_type(g: Group, quantized: list[str], bpw, probe_bpw: float) -> str:
    """The candidate nearest probe_bpw bits per weight among those that really perturb the tensor. A base that was
    itself dequantized from a GGUF (both bundled models) has tensors that some types hold exactly (SmolLM2's Q4_1
    in Q5_1; Gemma 3's Q4_K in Q4_K): such a type's error is ~0, its measured KLD is rounding noise (even below
    0), and gain = KLD / error would scale that noise by a huge factor onto every other type. Those types keep
    their ~0 predictions (gain × ~0); they are only never the probe."""
    errors = sorted(g.options[k]["error"] for k in quantized)
    typical = errors[len(errors) // 2]
    usable = [k for k in quantized if g.options[k]["error"] >= REHIT * typical] or quantized
    return min(usable, key=lambda k: abs(bpw(k) - probe_bpw))


def probe_group(probe: Probe, g: Group, weights: dict[str, torch.Tensor], progress: str) -> None:
    """The group's KLD at its probe type, and every option's prediction: gain × error (module docstring)."""
    g.measured = probe.kld(weights, g.layer)
    gain = g.measured / g.options[g.probe]["error"] if g.options[g.probe]["error"] > 0 else 0.0
    for o in g.options.values():
        o["predicted"] = gain * o["error"]
    step(f"sensitivity {progress}: {g.name} at {g.probe}: KLD {g.measured:.3g}")


def save_table(cached: Path, groups: list[Group], fixed: int, ids: torch.Tensor, probe_bpw: float, candidates
               ) -> tuple[list[Group], int, dict]:
    provenance = {"tokens": int(ids.numel()), "sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                  "probe_bpw": probe_bpw, "candidates": list(candidates), "dtype": "float32",
                  "rank_correlation_error_vs_measured": rank_correlation(
                      [g.options[g.probe]["error"] for g in groups], [g.measured for g in groups])}
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".partial")
    tmp.write_text(json.dumps({"groups": [asdict(g) for g in groups], "fixed_bytes": fixed,
                               "provenance": provenance}))
    tmp.replace(cached)
    return groups, fixed, {**provenance, "version": VERSION, "cache": str(cached)}


def load_table(cached: Path) -> tuple[list[Group], int, dict]:
    data = json.loads(cached.read_text())
    step(f"sensitivity table: cached ({cached})")
    # the cache key holds VERSION: a table read back is of this version
    return [Group(**g) for g in data["groups"]], data["fixed_bytes"], {**data["provenance"], "version": VERSION,
                                                                       "cache": str(cached)}


def kv_cache_costs(model_path: Path, f16_gguf: Path, ids: torch.Tensor, kv_types: list[str]) -> dict[str, dict]:
    """What each llama.cpp K/V cache type costs on its own: the mean KLD(F16 cache ‖ that cache) of the F16 GGUF's
    next-token distributions over the second half of each window (the positions an evaluation scores), flash
    attention on in every run (llama.cpp needs it for a quantized V cache). The mix adds it to the weights'
    predicted KLD (to second order independent perturbations add; bench/results/gguf_mixes.md's KV table shows
    Q8_0 and Q4_K_M weights taking the same q4_0 cost). Cached beside the sensitivity tables."""
    key = table_key(model_path, ids, {}, kv_types, 0.0, "kv-cache")  # the model's files, the slice, the types
    cached = cache_root() / "sensitivity" / f"kv-{key}.json"
    if cached.is_file():
        step(f"KV cache costs: cached ({cached})")
        return json.loads(cached.read_text())
    n, first = int(ids.shape[1]), int(ids.shape[1]) // 2
    reference, out = [], {}
    for kv in ["f16", *[k for k in kv_types if k != "f16"]]:
        model = llamacpp.LlamaCppModel(f16_gguf, n_ctx=n, kv_type=kv.upper(), flash_attn=True)
        try:
            kld = []
            for w, window in enumerate(ids.tolist()):
                logp = torch.log_softmax(model.logits(window, first).double(), -1)
                if kv == "f16":
                    reference.append(logp.float())
                else:
                    kld.append(kl_divergence(reference[w].double(), logp))
        finally:
            model.close()
        value = float(torch.cat(kld).mean().clamp(min=0)) if kld else 0.0
        out[kv] = {"kld": value, "tokens": int(ids.shape[0]) * (n - first)}
        step(f"KV cache {kv}: KLD {value:.4g} against the F16 cache ({out[kv]['tokens']} positions)")
    out = {k: out[k] for k in kv_types}
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.with_suffix(".partial").write_text(json.dumps(out))
    cached.with_suffix(".partial").replace(cached)
    return out


# ---- compressed-tensors: integer grids (RTN's) on the linears vLLM fuses -----------------------------------------
def scheme(name: str) -> tuple[int, int]:
    """'w4g128' → (4, 128); 'w8ch' → (8, -1); 'fp16' → (16, 0): left unquantized."""
    if name == "fp16":
        return 16, 0
    m = re.fullmatch(r"w(\d+)(?:g(\d+)|ch)", name)
    if not m:
        raise QuantizeError(f"unknown scheme {name!r}: w<bits>g<group size>, w<bits>ch or fp16")
    return int(m[1]), int(m[2]) if m[2] else -1


def scheme_bits_per_weight(name: str, cols: int = 4096) -> float:
    bits, gs = scheme(name)
    return 16.0 if gs == 0 else bits + 16 / (cols if gs == -1 else gs)  # an fp16 scale per group


def scheme_bytes(name: str, rows: int, cols: int) -> int:
    """What the compressed-tensors writer stores for one symmetric linear: packed codes (int32 words), an fp16
    scale per group, the int64 [rows, cols] weight_shape; unquantized: fp16."""
    bits, gs = scheme(name)
    if gs == 0:
        return rows * cols * 2
    groups = rows * (1 if gs == -1 else cols // gs)
    return rows * -(-cols * bits // 32) * 4 + groups * 2 + 16


def measure_linear(model_path: Path, layout_groups: list[tuple[int, list[str]]], importance: dict[str, np.ndarray],
                   ids: torch.Tensor, candidates: list[str], probe_bpw: float, dtype: torch.dtype,
                   fixed: int) -> tuple[list[Group], int, dict]:
    """The table for compressed-tensors: each (layer, linears read together) group takes one scheme (vLLM fuses
    q/k/v and gate/up into one layer with one scheme); options where every member's input size takes the group size.
    Error: RTN's rounding (minmax, symmetric, scales rounded to the storage dtype), importance-weighted; probe:
    the group's linears all at the probe scheme."""
    from quantize.methods import grids

    key = table_key(model_path, ids, importance, candidates, probe_bpw, "compressed-tensors")
    cached = cache_root() / "sensitivity" / f"{key}.json"
    if cached.is_file():
        return load_table(cached)
    probe = Probe(model_path, ids)
    groups = []
    for n, (layer, modules) in enumerate(layout_groups):
        lins = {m: probe.model.get_submodule(m) for m in modules}
        cols = {lin.in_features for lin in lins.values()}
        g = Group(modules[0], modules, sum(lin.out_features for lin in lins.values()), max(cols), layer, {},
                  imatrix=True)
        deq: dict[str, dict[str, torch.Tensor]] = {}
        for kind in candidates:
            bits, gs = scheme(kind)
            if gs > 0 and any(c % gs for c in cols):
                continue
            err, n_bytes, deq[kind] = 0.0, 0, {}
            for m, lin in lins.items():
                W = lin.weight.data.to(dtype).float()
                if gs == 0:
                    d = W
                else:
                    s, z = grids.scale_zero(W, bits, True, gs)
                    s = grids.storable_scale(s, dtype)
                    d = grids.dequantize(grids.quantize(W, s, z, bits, True, gs), s, z, gs)
                imp = torch.as_tensor(importance[f"{m}.weight"], dtype=torch.float64)
                err += float((((d - lin.weight.data).double() ** 2).sum(0) * imp).sum())
                n_bytes += scheme_bytes(kind, lin.out_features, lin.in_features)
                deq[kind][m] = d
            g.options[kind] = {"bytes": n_bytes, "error": err}
        quantized = [k for k in g.options if k != "fp16"]
        if not quantized:
            raise QuantizeError(f"{modules}: no candidate scheme of {candidates} fits input sizes {sorted(cols)}")
        g.probe = probe_type(g, quantized, lambda k: scheme_bits_per_weight(k, g.n_per_row), probe_bpw)
        probe_group(probe, g, deq[g.probe], f"{n + 1}/{len(layout_groups)}")
        groups.append(g)
    return save_table(cached, groups, fixed, ids, probe_bpw, candidates)


def rank_correlation(a, b) -> float:
    """Spearman's ρ (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r
    if len(a) < 2:
        return math.nan
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])
