"""Streamed, layer-by-layer calibration for decoder-only models (the GPTQ reference's `sequential` loop).

The model is built on the meta device; only one decoder layer's weights are read from the safetensors shards
at a time. The calibration tokens go through the embedding once; then for each layer the layer's method runs
on the activations entering it, the activations go through the processed layer to become the next layer's
inputs, and the finished layer goes to the writer and its weights are dropped.

What the engine knows of an architecture is one row of LAYOUTS: its groups of linears, AWQ's mappings, and how
its norms store their weights. GPTQ's true-sequential order (q/k/v, then o, then gate/up, then down, each
calibrated on inputs that already went through the quantized linears before it) runs a llama-family layer in
stages (`staged_layer`), so one pass through the layer serves every group and also gives the next layer's inputs;
any other layout (Gemma 3's sandwich norms, Phi-3's fused linears) runs the model's own decoder layer once per
group with a hook on the group's input (`hooked_layer`):

    h1 = input_layernorm(x)                      -> q/k/v inputs          quantize q/k/v
    a  = attention core on h1                    -> o_proj input          quantize o
    x2 = x + o_proj(a);  h2 = post_norm(x2)      -> gate/up inputs        quantize gate/up
    m  = act(gate_proj(h2)) * up_proj(h2)        -> down_proj input       quantize down
    out = x2 + down_proj(m)                      -> the next layer's x

The layer, the activations and the Hessians live on one device (`device: auto` picks CUDA when torch sees it);
the finished layer goes back to the CPU only to be written.

Peak memory ≈ one layer + its Hessians + the calibration activations (the layer's input, x2 and the current
stage's input; without true sequential all four stage inputs) + the embedding while it is used, not the model.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from quantize.common.errors import QuantizeError
from quantize.common.heap import release_free_heap
from quantize.sources.models import CHECKPOINT_EXPERTS, meta_model
from quantize.sources.shards import Shards

@dataclass(frozen=True)
class Layout:
    """What the engine and the methods need to know about one architecture's decoder layer (names relative to it).

    groups: the linears quantized together, in order (GPTQ "true sequential": each group sees inputs that already
        went through the quantized groups before it); the linears of a group read one input.
    awq: (op that feeds the linears, the linears, the block whose output judges a scale), AWQ's mappings; a row
        whose op is a linear applies where its outputs are the linears' inputs (v → o is skipped under
        grouped-query attention) or, for a fused gate_up, to its last rows (the up half).
    staged: the llama layer, which staged_layer runs in one pass per layer; other layouts run the decoder layer
        itself once per group with a hook on the group's input (hooked_layer): the same inputs, G + 1 passes.
    norm_offset: the RMSNorm computes x̂·(norm_offset + weight) (Gemma: 1), which AWQ's fold must respect.
    experts: a sparse MoE block's path and expert linear names as the checkpoint stores them (Experts); in a layer
        whose MLP is sparse, the groups and AWQ rows under `mlp.` are replaced by per-expert ones (layer_stages,
        awq_rows)."""

    groups: list[list[str]]
    awq: list[tuple[str, list[str], str]]
    staged: bool = False
    norm_offset: float = 0.0
    experts: "Experts | None" = None


@dataclass(frozen=True)
class Experts:
    """Where a sparse MoE block's experts live in the checkpoint: `block`, the block's name in the decoder layer
    (Mixtral: block_sparse_moe, which transformers 5 calls `mlp`), and each expert's gate, up and down linears
    (`{block}.experts.{e}.{name}`). The router is `{block}.gate`."""

    block: str
    linears: tuple[str, str, str]


_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
_LLAMA = Layout(
    groups=[_ATTN, ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    awq=[("input_layernorm", _ATTN, "self_attn"), ("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"),
         ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp"),
         ("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj")],
    staged=True)
_GEMMA = Layout(
    groups=_LLAMA.groups,
    awq=[("input_layernorm", _ATTN, "self_attn"), ("self_attn.v_proj", ["self_attn.o_proj"], "self_attn.o_proj"),
         ("pre_feedforward_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp"),
         ("mlp.up_proj", ["mlp.down_proj"], "mlp.down_proj")],
    norm_offset=1.0)
LAYOUTS: dict[str, Layout] = {
    # Qwen3's per-head q/k norms sit inside the attention, between q/k_proj and the rotary embedding
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    # Gemma 3: sandwich norms (post-attention and post-feed-forward norms on the branch outputs, the MLP fed by
    # pre_feedforward_layernorm), the embedding scaled by sqrt(hidden) (inside its module), sliding-window and
    # global layers with their own rotary tables, RMSNorm weights stored as offsets from 1. Gemma 2: the same
    # layout; its attention and final logit soft-capping run under eager attention (sources/models.meta_model)
    "gemma3_text": _GEMMA, "gemma2": _GEMMA,
    # Mixtral and Qwen3-MoE: attention as llama (Qwen3-MoE with Qwen3's q/k norms), a sparse MoE block instead of
    # the MLP (Qwen3-MoE's `mlp_only_layers` keep a dense MLP); see ExpertList
    "mixtral": Layout(groups=_LLAMA.groups, awq=_LLAMA.awq, experts=Experts(*CHECKPOINT_EXPERTS["mixtral"])),
    "qwen3_moe": Layout(groups=_LLAMA.groups, awq=_LLAMA.awq, experts=Experts(*CHECKPOINT_EXPERTS["qwen3_moe"])),
    # Phi-3: q/k/v fused in qkv_proj and gate/up in gate_up_proj (the fused tensors are what vLLM and llama.cpp
    # load); AWQ as AutoAWQ: norm → qkv, norm → gate_up, the up half of gate_up → down (no v → o: v is fused)
    "phi3": Layout(
        groups=[["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]],
        awq=[("input_layernorm", ["self_attn.qkv_proj"], "self_attn"),
             ("post_attention_layernorm", ["mlp.gate_up_proj"], "mlp"),
             ("mlp.gate_up_proj", ["mlp.down_proj"], "mlp.down_proj")]),
}


BATCH = 8  # calibration sequences per forward pass


def materialize(module: torch.nn.Module, prefix: str, shards: Shards, dtype=torch.float32) -> None:
    for name, param in list(module.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        tensor = shards.get(prefix + name).to(dtype)
        target._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


def release(module: torch.nn.Module) -> None:
    module.to("meta")


def check_model(config: dict, seq_len: int | None = None) -> None:
    """Fail before any work if the engine cannot stream this model: its type has no row in LAYOUTS, or
    (with calibration of `seq_len` tokens) a sliding window shorter than the calibration sequences."""
    model_type = config.get("model_type")
    if model_type not in LAYOUTS:
        raise QuantizeError(f"layer-wise methods support model types {', '.join(LAYOUTS)}; "
                            f"the model is {model_type!r}")
    window = config.get("sliding_window")
    if seq_len is not None and window and config.get("use_sliding_window", True) and seq_len > window:
        raise QuantizeError(f"calibration sequences of {seq_len} tokens exceed the model's sliding_window {window}; "
                            f"the layer-wise engine runs full causal attention, so use `calibration.seq_len` <= "
                            f"{window}")


@dataclass(frozen=True)
class ExpertPolicy:
    """How a sparse MoE block's experts are calibrated. `routed`: each expert's statistics come from the tokens the
    router sends it, and an expert that received fewer than `min_tokens` (default: the hidden size, the dimension
    of its gate/up Hessian, below which that Hessian is rank-deficient) is calibrated on every token entering the
    block instead (its output still uses only its routed tokens). `all`: every expert on every token (as
    llm-compressor's calibrate-all-experts)."""

    calibration: str = "routed"
    min_tokens: int | None = None


class Expert(torch.nn.Module):
    """One expert's MLP, down(act(gate(x)) · up(x)), its linears under the checkpoint's names."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inter: int, act_fn):
        super().__init__()
        self.names, self.act_fn = names, act_fn
        gate, up, down = names
        self.add_module(gate, torch.nn.Linear(hidden, inter, bias=False))
        self.add_module(up, torch.nn.Linear(hidden, inter, bias=False))
        self.add_module(down, torch.nn.Linear(inter, hidden, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class ExpertList(torch.nn.Module):
    """A sparse MoE block's experts as one Expert each, in place of transformers' 3-D expert tensors (its
    MixtralExperts / Qwen3MoeExperts: gate_up_proj [E, 2·inter, hidden], down_proj [E, hidden, inter]), so every
    expert linear is an ordinary linear, named as in the checkpoint, for every method and writer. forward is
    theirs (same routing inputs, same order of accumulation). It counts the tokens routed to each expert
    (`routed`, per pass); experts in `all_tokens` run on every token, so hooks on their linears see every token,
    and keep only their routed rows."""

    def __init__(self, experts: torch.nn.Module, names: tuple[str, str, str], policy: ExpertPolicy):
        super().__init__()
        n, inter2, hidden = experts.gate_up_proj.shape
        for e in range(n):
            self.add_module(str(e), Expert(names, hidden, inter2 // 2, experts.act_fn))
        self.num_experts, self.policy = n, policy
        self.min_tokens = max(1, policy.min_tokens if policy.min_tokens is not None else hidden)
        self.routed = [0] * n
        self.all_tokens: set[int] = set(range(n)) if policy.calibration == "all" else set()

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e in range(self.num_experts):
            top_k_pos, token_idx = torch.where((top_k_index == e).T)
            self.routed[e] += int(token_idx.numel())
            if e in self.all_tokens:
                y = self._modules[str(e)](hidden)[token_idx]
            elif token_idx.numel():
                y = self._modules[str(e)](hidden[token_idx])
            else:
                continue
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, top_k_pos, None]).to(out.dtype))
        return out

    def starved(self) -> set[int]:
        return {e for e, n in enumerate(self.routed) if n < self.min_tokens} - self.all_tokens


def install_experts(model: torch.nn.Module, layout: Layout, policy: ExpertPolicy) -> None:
    """Every sparse MoE block of the (meta) model gets an ExpertList, and sits under its checkpoint name
    (`Experts.block`) so that its parameters are named as the shards name them; the decoder layer's own forward
    still reaches it as `mlp`."""
    for layer in model.model.layers:
        block = layer.mlp
        if not hasattr(block, "experts"):
            continue  # a dense layer of an MoE model (Qwen3-MoE's mlp_only_layers)
        block.experts = ExpertList(block.experts, layout.experts.linears, policy).to("meta")
        if layout.experts.block != "mlp":
            del layer._modules["mlp"]
            layer._modules[layout.experts.block] = block
            layer.__dict__["mlp"] = block  # found before nn.Module's lookup of _modules


def expert_lists(layer: torch.nn.Module) -> list[tuple[str, ExpertList]]:
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, ExpertList)]


def skeleton(base_path: Path, policy: ExpertPolicy = ExpertPolicy()):
    model = meta_model(base_path)
    try:
        check_model(model.config.to_dict())
    except QuantizeError as exc:
        raise QuantizeError(f"{base_path}: {exc}") from None
    return with_experts(model, policy)


def has_experts(config: dict) -> bool:
    """Whether the engine streams this model type with sparse MoE experts (LAYOUTS)."""
    layout = LAYOUTS.get(config.get("model_type"))
    return layout is not None and layout.experts is not None


def with_experts(model: torch.nn.Module, policy: ExpertPolicy = ExpertPolicy()) -> torch.nn.Module:
    """The meta model with its sparse MoE blocks' experts as linears (install_experts) where its layout has
    experts, as the engine, the writers and the size estimates see it; any other model as it is."""
    if has_experts(model.config.to_dict()):
        install_experts(model, LAYOUTS[model.config.model_type], policy)
    return model


def _expert_names(layout: Layout, layer: torch.nn.Module) -> list[str] | None:
    """Each expert's module name in a sparse MoE layer (`{block}.experts.{e}`); None for a dense layer."""
    moe = expert_lists(layer)
    if not moe:
        return None
    path, experts = moe[0]
    return [f"{path}.{e}" for e in range(experts.num_experts)]


def layer_stages(layout: Layout, layer: torch.nn.Module) -> list[list[list[str]]]:
    """The layer's GPTQ stages in order, each a list of groups (linears that read one input). A dense layer: one
    group per stage (Layout.groups). A sparse MoE layer: the attention groups, then every expert's gate/up, then
    every expert's down (experts do not feed each other, so one pass through the layer serves all experts)."""
    e_names = _expert_names(layout, layer)
    if e_names is None:
        return [[g] for g in layout.groups]
    stages = [[g] for g in layout.groups if not g[0].startswith("mlp.")]
    gate, up, down = layout.experts.linears
    return stages + [[[f"{n}.{gate}", f"{n}.{up}"] for n in e_names], [[f"{n}.{down}"] for n in e_names]]


def awq_rows(layout: Layout, layer: torch.nn.Module) -> list[tuple[str, list[str], str]]:
    """AWQ's rows for this layer (Layout.awq). A sparse MoE layer: the attention rows; the post-attention norm
    scaling every expert's gate and up, judged by the whole MoE block (as AutoAWQ's Mixtral); each expert's up
    scaling its down."""
    e_names = _expert_names(layout, layer)
    if e_names is None:
        return layout.awq
    rows = [r for r in layout.awq if not r[1][0].startswith("mlp.")]
    gate, up, down = layout.experts.linears
    block = e_names[0].rsplit(".", 2)[0]  # `{block}.experts.0` → the MoE block, which judges the norm's scale
    rows.append(("post_attention_layernorm", [f"{n}.{x}" for n in e_names for x in (gate, up)], block))
    return rows + [(f"{n}.{up}", [f"{n}.{down}"], f"{n}.{down}") for n in e_names]


class Activations:
    """The calibration activations entering the current decoder layer, and how to run blocks of it on them.

    hidden: [samples, seq_len, hidden]; position_embeddings: (cos, sin) [1, seq_len, head_dim]. Blocks run in
    batches of `batch` sequences, causal attention over whole sequences: with no mask under sdpa (is_causal), with
    an additive causal mask [1, 1, seq_len, seq_len] under eager attention (`causal_mask`, e.g. Gemma 2, whose
    soft-capping sdpa does not do).

    The activations are kept in float32. With forward_dtype bfloat16 the blocks run under autocast: linears and
    attention in bfloat16 (about 4x the float32 matmul rate on CPUs with AVX512-BF16, and the usual dtype on
    GPUs), norms and the residual additions in float32; what a block returns is float32 again."""

    def __init__(self, hidden: torch.Tensor, position_embeddings, batch: int,
                 forward_dtype: torch.dtype = torch.float32, causal_mask: bool = False):
        self.hidden, self.position_embeddings, self.batch = hidden, position_embeddings, batch
        self.forward_dtype = forward_dtype
        self.mask = None
        if causal_mask:
            n = hidden.shape[1]
            self.mask = torch.full((n, n), torch.finfo(torch.float32).min, device=hidden.device).triu(1)[None, None]

    def forward(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`block` (a decoder layer, its attention, its MLP, a linear or a function of x) applied to x
        [samples, seq_len, d] in batches."""
        takes_positions = "position_embeddings" in inspect.signature(getattr(block, "forward", block)).parameters
        outs = []
        autocast = torch.autocast(x.device.type, dtype=self.forward_dtype,
                                  enabled=self.forward_dtype != torch.float32)
        for s in range(0, x.shape[0], self.batch):
            xb = x[s : s + self.batch]
            with autocast:
                if takes_positions:  # decoder layer or attention: rotary (cos, sin) for this batch, causal mask
                    cos, sin = self.position_embeddings
                    n = xb.shape[0]
                    result = block(xb, attention_mask=self.mask,
                                   position_embeddings=(cos.expand(n, -1, -1), sin.expand(n, -1, -1)))
                else:
                    result = block(xb)
            outs.append((result[0] if isinstance(result, tuple) else result).float())
        return torch.cat(outs)

    def run(self, layer: torch.nn.Module) -> torch.Tensor:
        return self.forward(layer, self.hidden)

    def capture(self, layer: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        """One pass through `layer`; the inputs each named submodule saw, [samples, seq_len, in_features]."""
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        hooks = [layer.get_submodule(n).register_forward_hook(lambda m, inp, out, n=n: seen[n].append(inp[0]))
                 for n in names]
        try:
            self.run(layer)
        finally:
            for h in hooks:
                h.remove()
        return {n: torch.cat(xs) if xs else None for n, xs in seen.items()}  # None: never called (an idle expert)


class Checkpoint:
    """Where a streamed build stands after its last finished decoder layer: `folder/.resume-state.pt` holds the
    layer index, the calibration activations entering the next layer (float32, exactly as computed) and the
    writer's state (`extra()`, set by the writer). Saved atomically after each layer's shard is on disk, so a
    build killed at any moment continues with the layer after the last saved one and writes the same bytes."""

    FILE = ".resume-state.pt"

    def __init__(self, folder: Path):
        self.path = folder / self.FILE
        self.state = torch.load(self.path, weights_only=False) if self.path.is_file() else None
        self.extra: Callable[[], dict] = dict

    @property
    def next_layer(self) -> int:
        return 0 if self.state is None else self.state["layer"] + 1

    def save(self, layer: int, hidden: torch.Tensor | None) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"layer": layer, "hidden": None if hidden is None else hidden.cpu(), **self.extra()}, tmp)
        os.replace(tmp, self.path)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def layer_type(config, i: int) -> str | None:
    """The attention kind of layer i where the model mixes kinds (Gemma 3: sliding_attention, full_attention)."""
    types = getattr(config, "layer_types", None)
    return types[i] if types else None


def rotary_tables(model, hidden: torch.Tensor, device) -> dict:
    """The rotary (cos, sin) [1, seq_len, head_dim] per attention kind: one table, or (Gemma 3) one per layer
    type, each with its own base frequency, as the model's own forward computes them."""
    rotary = type(model.model.rotary_emb)(config=model.config).to(device)  # fresh: inv_freq is not a weight
    positions = torch.arange(hidden.shape[1], device=device)[None]
    types = set(getattr(model.config, "layer_types", None) or [None])
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return {t: rotary(hidden[:1], positions, t) for t in types}
    table = rotary(hidden[:1], positions)
    return {t: table for t in types}


@torch.inference_mode()
def stream_layers(base_path: Path, calib: torch.Tensor | None, process_layer: Callable, batch: int = BATCH,
                  device: str = "cpu", forward_dtype: torch.dtype = torch.float32,
                  checkpoint: Checkpoint | None = None, policy: ExpertPolicy = ExpertPolicy(),
                  shards: Shards | None = None) -> Iterator[tuple[int, torch.nn.Module]]:
    """Yield (index, processed decoder layer) one at a time. `process_layer(i, layer, acts)` changes the layer
    in place; `acts` is the calibration Activations entering it (None without calibration). It may return the
    processed layer's output on those activations; otherwise they go through the processed layer here to become
    the next layer's inputs. The layer and the activations live on `device` (see `resolve_device`).

    With a `checkpoint`, the state is saved once the consumer has taken each layer (written it), and a checkpoint
    that holds a state starts after its layer, from its saved activations."""
    shards = shards or Shards(base_path)  # or a reader that dequantizes (formats/compressed_tensors)
    model = skeleton(base_path, policy)
    inner = model.model
    start = checkpoint.next_layer if checkpoint is not None else 0

    acts = None
    if calib is not None:
        try:
            check_model(model.config.to_dict(), int(calib.shape[1]))
        except QuantizeError as exc:
            raise QuantizeError(f"{base_path}: {exc}") from None
        if start:  # resumed: the activations entering layer `start`, as the interrupted build saved them
            hidden = checkpoint.state["hidden"].to(device)
        else:
            materialize(inner.embed_tokens, "model.embed_tokens.", shards)
            hidden = inner.embed_tokens(calib).float().to(device)  # [samples, seq_len, hidden]
            release(inner.embed_tokens)
        positions = rotary_tables(model, hidden, device)
        acts = Activations(hidden, positions[layer_type(model.config, start)], batch, forward_dtype,
                           causal_mask=model.config._attn_implementation == "eager")

    for i, layer in enumerate(inner.layers):
        if i < start:
            continue
        materialize(layer, f"model.layers.{i}.", shards)
        layer.to(device)
        if acts is not None:
            acts.position_embeddings = positions[layer_type(model.config, i)]
        out = process_layer(i, layer, acts)
        if acts is not None:
            acts.hidden = out if out is not None else acts.run(layer)
        yield i, layer
        if checkpoint is not None:  # the consumer has written layer i
            checkpoint.save(i, acts.hidden if acts is not None else None)
        release(layer)
        # glibc keeps freed blocks below its mmap threshold in the heap: without this, each layer's temporaries
        # stay counted in RSS and the peak grows with the layers instead of being one layer's
        release_free_heap()


def staged_layer(layer: torch.nn.Module, acts: Activations, on_stage: Callable, quantize_between: bool = True
                 ) -> torch.Tensor | None:
    """A llama-family decoder layer run on acts.hidden in the stages of the module docstring. After each stage
    `on_stage(group, X)` gets the group's LAYOUTS["llama"].groups index and its input X [samples, seq_len, in];
    with quantize_between the later stages run on the linears as on_stage left them (true sequential), and the
    result is the processed layer's output. Without it, all four inputs come from the layer as it was, and the
    caller runs the processed layer itself (returns None)."""
    attn, mlp = layer.self_attn, layer.mlp
    x = acts.hidden
    h1 = acts.forward(layer.input_layernorm, x)
    if quantize_between:
        on_stage(0, h1)
    seen = []  # the attention's o_proj input, captured while the attention runs
    hook = attn.o_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    try:
        attn_out = acts.forward(attn, h1)
    finally:
        hook.remove()
    a = torch.cat(seen)
    del seen
    if quantize_between:  # each stage input is dropped once the next stage has what it needs
        del h1, attn_out
        on_stage(1, a)
        attn_out = acts.forward(attn.o_proj, a)
        del a
    x2 = x + attn_out
    del attn_out
    h2 = acts.forward(layer.post_attention_layernorm, x2)
    if quantize_between:
        on_stage(2, h2)
    m = acts.forward(lambda v: mlp.act_fn(mlp.gate_proj(v)) * mlp.up_proj(v), h2)
    if not quantize_between:
        for group, X in enumerate((h1, a, h2, m)):
            on_stage(group, X)
        return None
    del h2
    on_stage(3, m)
    return x2 + acts.forward(mlp.down_proj, m)


def capture(acts: Activations, layer: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """acts.capture with the layer's expert policy (ExpertPolicy): after a pass, experts routed fewer than their
    minimum tokens join `all_tokens` and the pass is made again, so that each captured expert input holds either
    the expert's routed tokens or every token. Each ExpertList keeps the routed counts of the final pass
    (`calibration_routed`, the table the artefact's log holds)."""
    moe = [m for _, m in expert_lists(layer)]
    while True:
        for m in moe:
            m.routed = [0] * m.num_experts
        seen = acts.capture(layer, names)
        starved = [(m, m.starved()) for m in moe]
        if not any(s for _, s in starved):
            break
        for m, s in starved:
            m.all_tokens |= s
    for m in moe:
        m.calibration_routed = list(m.routed)
    return seen


def hooked_layer(layer: torch.nn.Module, acts: Activations, stages: list[list[list[str]]], on_stage: Callable,
                 quantize_between: bool = True) -> torch.Tensor | None:
    """staged_layer for any decoder layer: the layer's own forward, once per stage, with hooks that keep the
    input of each group's first linear; `on_stage(group, X)` for each group of the stage (layer_stages). With
    quantize_between each pass runs on the stages before it as on_stage left them (true sequential), and a last
    pass gives the processed layer's output; without it, one pass gives every group's input and the caller runs
    the layer (None)."""
    if not quantize_between:
        stages = [[g for stage in stages for g in stage]]
    for stage in stages:
        captured = capture(acts, layer, [names[0] for names in stage])
        for names in stage:
            on_stage(names, captured.pop(names[0]))
    return acts.run(layer) if quantize_between else None


def quantize_layers(base_path: Path, calib: torch.Tensor | None, quantize_group: Callable, ignore: Callable,
                    model_type: str, true_sequential: bool = True, batch: int = BATCH, device: str = "cpu",
                    forward_dtype: torch.dtype = torch.float32, checkpoint: Checkpoint | None = None,
                    policy: ExpertPolicy = ExpertPolicy()) -> Iterator[tuple[int, torch.nn.Module]]:
    """GPTQ-style streaming: per layer, the sequential groups in order. `quantize_group(layer_index,
    {name: linear}, X)` quantizes the linears in place from their common input X [samples, seq_len, in] (an
    expert's: [tokens, in]; None without calibration). `ignore(full_name)` says which linears stay as they are."""
    layout = LAYOUTS[model_type]

    def process_layer(i, layer, acts):
        def on_stage(names: list[str], X: torch.Tensor | None) -> None:
            linears = {n: layer.get_submodule(n) for n in names if not ignore(f"model.layers.{i}.{n}")}
            if linears:
                quantize_group(i, linears, X)

        stages = layer_stages(layout, layer)
        if acts is None:
            for stage in stages:
                for names in stage:
                    on_stage(names, None)
            return None
        if layout.staged:
            return staged_layer(layer, acts, lambda g, X: on_stage(layout.groups[g], X),
                                quantize_between=true_sequential)
        return hooked_layer(layer, acts, stages, on_stage, quantize_between=true_sequential)

    return stream_layers(base_path, calib, process_layer, batch, device, forward_dtype, checkpoint, policy)


def resolve_device(device: str, where: str) -> str:
    """The recipe's `device` (auto, cpu, cuda, cuda:N) as a torch device; auto is cuda when one is visible."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QuantizeError(f"{where}: device {device!r}, but this torch ({torch.__version__}) sees no CUDA "
                                "device; use `device: auto` or `cpu`")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise QuantizeError(f"{where}: device {device!r}, but only {torch.cuda.device_count()} CUDA device(s) "
                                "are visible")
    return device


def reset_peak_vram(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def peak_vram(device: str) -> dict:
    """For the manifest of a build on a GPU: the most memory torch's allocator held on it since reset_peak_vram."""
    if not device.startswith("cuda"):
        return {}
    return {"peak_vram_bytes": int(torch.cuda.max_memory_allocated(device))}


def native_bf16(device: str) -> tuple[bool, str]:
    """Whether `device` computes bfloat16 matmuls natively, and why: a CUDA GPU that supports bf16, or a CPU whose
    flags (/proc/cpuinfo) include avx512_bf16 or amx_bf16. Elsewhere bf16 is emulated and slower than float32
    (GPTQ on SmolLM2: 322.9 s vs 105.9 s on an AVX2-only EPYC)."""
    if device.startswith("cuda"):
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)}: bf16 {'supported' if ok else 'not supported'}"
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return False, "CPU flags unknown (no /proc/cpuinfo)"
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return bool(native), f"CPU flags: {', '.join(native)}" if native else "CPU without avx512_bf16 / amx_bf16"


def resolve_forward_dtype(value: str, device: str) -> tuple[torch.dtype, str]:
    """The recipe's forward_dtype (auto, float32, bfloat16) as a torch dtype, with the reason for the manifest."""
    if value != "auto":
        return getattr(torch, value), "set in the recipe"
    native, why = native_bf16(device)
    return (torch.bfloat16 if native else torch.float32), f"auto: {why}"
