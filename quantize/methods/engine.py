"""Streamed, layer-by-layer calibration for decoder-only models (the GPTQ reference's `sequential` loop).

The model is built on the meta device; only one decoder layer's weights are read from the safetensors shards
at a time. The calibration tokens go through the embedding once; then for each layer the layer's method runs
on the activations entering it, the activations go through the processed layer to become the next layer's
inputs, and the finished layer goes to the writer and its weights are dropped.

What the engine knows of an architecture is its row's `Layer` in the architecture table (sources/architectures.py):
its groups of linears, AWQ's mappings, and how its norms store their weights. GPTQ's true-sequential order (q/k/v,
then o, then gate/up, then down, each calibrated on inputs that already went through the quantized linears before
it) runs a llama-family layer in stages (`staged_layer`), so one pass through the layer serves every group and also
gives the next layer's inputs; any other layout (Gemma 3's sandwich norms, Phi-3's fused linears, MLA, sparse MoE
blocks: experts.py) runs the model's own decoder layer once per group with a hook on the group's input
(`hooked_layer`). Activations (activations.py), the resume state (checkpoint.py) and the device (device.py) are
modules of their own:

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

from pathlib import Path
from typing import Callable, Iterator

import torch

from quantize.common.errors import QuantizeError
from quantize.common.heap import release_free_heap
from quantize.methods.activations import Activations, attention_masks, layer_type, rotary_tables
from quantize.methods.checkpoint import Checkpoint
from quantize.methods.experts import ExpertPolicy, capture, expert_lists, with_experts
from quantize.sources.architectures import ARCHITECTURES, Architecture, streamed_layer
from quantize.sources.models import meta_model
from quantize.sources.shards import Shards

BATCH = 8  # calibration sequences per forward pass


def materialize(module: torch.nn.Module, prefix: str, shards: Shards, dtype=torch.float32) -> None:
    """The module's parameters read from the shards, and its persistent buffers that the checkpoint holds (a
    router's score-correction bias); buffers the checkpoint lacks keep the values the constructor computed."""
    for name, param in list(module.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        tensor = shards.get(prefix + name).to(dtype)
        target._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    stored = set(shards.names())
    for name, buffer in list(module.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        if prefix + name in stored and leaf not in target._non_persistent_buffers_set:
            target._buffers[leaf] = shards.get(prefix + name).to(buffer.dtype)


def release(module: torch.nn.Module) -> None:
    module.to("meta")


def check_model(config: dict) -> None:
    """Fail before any work if the engine cannot stream this model: its type has no row in the architecture table
    or its row has no streamed layer. (A sliding window shorter than the sequences is masked per layer:
    activations.attention_masks.)"""
    streamed_layer(config)


def skeleton(base_path: Path, policy: ExpertPolicy = ExpertPolicy()):
    model = meta_model(base_path)
    try:
        check_model(model.config.to_dict())
    except QuantizeError as exc:
        raise QuantizeError(f"{base_path}: {exc}") from None
    return with_experts(model, policy)


def present(layer: torch.nn.Module, names) -> list[str]:
    """The names that are linears of this layer (a row may name linears a configuration lacks: DeepSeek's q_proj
    without q_lora_rank, its q_a/q_b_proj with it)."""
    out = []
    for name in names:
        owner, _, leaf = name.rpartition(".")
        try:
            module = layer.get_submodule(owner) if owner else layer
        except AttributeError:
            continue
        if isinstance(getattr(module, leaf, None), torch.nn.Linear):
            out.append(name)
    return out


def _expert_names(layer: torch.nn.Module) -> list[str] | None:
    """Each expert's module name in a sparse MoE layer (`{block}.experts.{e}`); None for a dense layer."""
    moe = expert_lists(layer)
    if not moe:
        return None
    path, experts = moe[0]
    return [f"{path}.{e}" for e in range(experts.num_experts)]


def _not_mlp(names) -> bool:
    return not names[0].startswith("mlp.")


def layer_stages(arch: Architecture, layer: torch.nn.Module) -> list[list[list[str]]]:
    """The layer's GPTQ stages in order, each a list of groups (linears that read one input). A dense layer: one
    group per stage (Layer.groups). A sparse MoE layer: the attention groups, then every expert's gate/up (and the
    shared expert's), then every expert's down (and the shared expert's): experts do not feed each other, so one
    pass through the layer serves all experts."""
    groups = [g for g in (present(layer, g) for g in arch.layer.groups) if g]
    e_names = _expert_names(layer)
    if e_names is None:
        return [[g] for g in groups]
    stages = [[g] for g in groups if _not_mlp(g)]
    gate, up, down = arch.moe.linears
    gate_up = [[f"{n}.{gate}", f"{n}.{up}"] for n in e_names]
    downs = [[f"{n}.{down}"] for n in e_names]
    if arch.moe.shared:
        gate_up.append([f"{arch.moe.shared}.gate_proj", f"{arch.moe.shared}.up_proj"])
        downs.append([f"{arch.moe.shared}.down_proj"])
    return stages + [gate_up, downs]


def awq_rows(arch: Architecture, layer: torch.nn.Module) -> list[tuple[str, list[str], str]]:
    """AWQ's rows for this layer (Layer.awq, keeping the linears the layer has). A sparse MoE layer: the attention
    rows; the post-attention norm scaling every expert's gate and up (and the shared expert's), judged by the whole
    MoE block (as AutoAWQ's Mixtral); each expert's up scaling its down (and the shared expert's)."""
    rows = [(prev, names, block) for prev, names, block in
            ((prev, present(layer, names), block) for prev, names, block in arch.layer.awq) if names]
    e_names = _expert_names(layer)
    if e_names is None:
        return rows
    rows = [r for r in rows if _not_mlp(r[1])]
    gate, up, down = arch.moe.linears
    block = e_names[0].rsplit(".", 2)[0]  # `{block}.experts.0` → the MoE block, which judges the norm's scale
    experts = [(n, up, down) for n in e_names]
    if arch.moe.shared:
        experts.append((arch.moe.shared, "up_proj", "down_proj"))
    rows.append(("post_attention_layernorm", [f"{n}.{x}" for n in e_names for x in (gate, up)]
                 + ([f"{arch.moe.shared}.gate_proj", f"{arch.moe.shared}.up_proj"] if arch.moe.shared else []),
                 block))
    return rows + [(f"{n}.{u}", [f"{n}.{d}"], f"{n}.{d}") for n, u, d in experts]


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
        if start:  # resumed: the activations entering layer `start`, as the interrupted build saved them
            hidden = checkpoint.state["hidden"].to(device)
        else:
            materialize(inner.embed_tokens, "model.embed_tokens.", shards)
            hidden = inner.embed_tokens(calib).float().to(device)  # [samples, seq_len, hidden]
            release(inner.embed_tokens)
        positions = rotary_tables(model, hidden, device)
        masks = attention_masks(model.config, int(hidden.shape[1]), device,
                                eager=model.config._attn_implementation == "eager")
        acts = Activations(hidden, positions[layer_type(model.config, start)], batch, forward_dtype,
                           masks[layer_type(model.config, start)])

    for i, layer in enumerate(inner.layers):
        if i < start:
            continue
        materialize(layer, f"model.layers.{i}.", shards)
        layer.to(device)
        if acts is not None:
            acts.position_embeddings = positions[layer_type(model.config, i)]
            acts.mask = masks[layer_type(model.config, i)]
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
    `on_stage(group, X)` gets the group's index in architectures.LLAMA.groups and its input X [samples, seq_len, in];
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
        captured, _, _ = capture(acts, layer, [names[0] for names in stage])
        for names in stage:
            on_stage(names, captured.pop(names[0]))
    return acts.run(layer) if quantize_between else None


def quantize_layers(base_path: Path, calib: torch.Tensor | None, quantize_group: Callable, ignore: Callable,
                    model_type: str, true_sequential: bool = True, batch: int = BATCH, device: str = "cpu",
                    forward_dtype: torch.dtype = torch.float32, checkpoint: Checkpoint | None = None,
                    policy: ExpertPolicy = ExpertPolicy(), prepare: Callable | None = None
                    ) -> Iterator[tuple[int, torch.nn.Module]]:
    """GPTQ-style streaming: per layer, the sequential groups in order. `quantize_group(layer_index,
    {name: linear}, X)` quantizes the linears in place from their common input X [samples, seq_len, in] (an
    expert's: [tokens, in]; None without calibration). `ignore(full_name)` says which linears stay as they are.
    `prepare(layer_index, layer, acts)`, when given, changes the layer in full precision before its first group is
    calibrated (SmoothQuant's fold); the groups then see the prepared layer's inputs."""
    arch = ARCHITECTURES[model_type]

    def process_layer(i, layer, acts):
        if prepare is not None and acts is not None:
            prepare(i, layer, acts)
        def on_stage(names: list[str], X: torch.Tensor | None) -> None:
            linears = {n: layer.get_submodule(n) for n in names if not ignore(f"model.layers.{i}.{n}")}
            if linears:
                quantize_group(i, linears, X)

        stages = layer_stages(arch, layer)
        if acts is None:
            for stage in stages:
                for names in stage:
                    on_stage(names, None)
            return None
        if arch.layer.staged:
            return staged_layer(layer, acts, lambda g, X: on_stage(list(arch.layer.groups[g]), X),
                                quantize_between=true_sequential)
        return hooked_layer(layer, acts, stages, on_stage, quantize_between=true_sequential)

    return stream_layers(base_path, calib, process_layer, batch, device, forward_dtype, checkpoint, policy)
