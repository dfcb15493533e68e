"""Sparse MoE blocks as the layer-wise engine sees them: every routed expert an ordinary linear per projection,
named as the checkpoint names it (ExpertList, in place of transformers' 3-D expert tensors), how experts that the
router starves of tokens are calibrated (ExpertPolicy), and the capture that applies that policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantize.methods.activations import Activations
from quantize.sources.architectures import ARCHITECTURES, Moe


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


def install_experts(model: torch.nn.Module, moe: Moe, policy: ExpertPolicy) -> None:
    """Every sparse MoE block of the (meta) model gets an ExpertList, and sits under its checkpoint name
    (`Moe.block`) so that its parameters are named as the shards name them; the decoder layer's own forward
    still reaches it as `mlp`."""
    for layer in model.model.layers:
        block = layer.mlp
        if not hasattr(block, "experts"):
            continue  # a dense layer of an MoE model (Qwen3-MoE's mlp_only_layers, DeepSeek's first layers)
        block.experts = ExpertList(block.experts, moe.linears, policy).to("meta")
        if moe.block != "mlp":
            del layer._modules["mlp"]
            layer._modules[moe.block] = block
            layer.__dict__["mlp"] = block  # found before nn.Module's lookup of _modules


def norm_readers(block: torch.nn.Module) -> list[torch.nn.Module]:
    """A sparse MoE block's unquantized modules that read the same normed input as its experts: the router (its
    `gate`) and, where there is one, the shared expert's sigmoid gate (Qwen3.5-MoE's `shared_expert_gate`). A scale
    folded into the norm (AWQ, SmoothQuant) multiplies their columns too, so they compute what they computed."""
    return [m for m in (block.gate, getattr(block, "shared_expert_gate", None)) if m is not None]


def expert_lists(layer: torch.nn.Module) -> list[tuple[str, ExpertList]]:
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, ExpertList)]


def has_experts(config: dict) -> bool:
    """Whether the engine streams this model type with sparse MoE experts (its architecture row)."""
    arch = ARCHITECTURES.get(config.get("model_type"))
    return arch is not None and arch.layer is not None and arch.moe is not None


def with_experts(model: torch.nn.Module, policy: ExpertPolicy = ExpertPolicy()) -> torch.nn.Module:
    """The meta model with its sparse MoE blocks' experts as linears (install_experts) where its layout has
    experts, as the engine, the writers and the size estimates see it; any other model as it is."""
    if has_experts(model.config.to_dict()):
        install_experts(model, ARCHITECTURES[model.config.model_type].moe, policy)
    return model


def capture(acts: Activations, layer: torch.nn.Module, names: list[str], outputs: list[str] = ()) \
        -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """acts.capture with the layer's expert policy (ExpertPolicy): after a pass, experts routed fewer than their
    minimum tokens join `all_tokens` and the pass is made again, so that each captured expert input holds either
    the expert's routed tokens or every token (an expert run on every token still adds only its routed tokens to
    the output). Each ExpertList keeps the routed counts of the final pass (`calibration_routed`, the table the
    artefact's log holds). Returns the inputs, the outputs of `outputs` and the layer's output (acts.capture)."""
    moe = [m for _, m in expert_lists(layer)]
    while True:
        for m in moe:
            m.routed = [0] * m.num_experts
        seen, made, out = acts.capture(layer, names, outputs)
        starved = [(m, m.starved()) for m in moe]
        if not any(s for _, s in starved):
            break
        for m, s in starved:
            m.all_tokens |= s
    for m in moe:
        m.calibration_routed = list(m.routed)
    return seen, made, out
