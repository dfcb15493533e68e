"""The calibration activations entering a decoder layer, and how the engine runs blocks of the layer on them: in
batches, with the rotary table of the layer's attention kind and, under eager attention, a causal mask; and the
blocked causal attention AWQ's forwards switch on (causal_blocks)."""

from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

CAUSAL_BLOCK = 64  # query positions per block of blocked_causal_attention
BLOCKED = "quantize_blocked_causal"  # its name in transformers' AttentionInterface


class Activations:
    """The calibration activations entering the current decoder layer, and how to run blocks of it on them.

    hidden: [samples, seq_len, hidden]; position_embeddings: (cos, sin) [1, seq_len, head_dim]. Blocks run in
    batches of `batch` sequences, causal attention over whole sequences: `mask`, set per layer by the engine
    (attention_masks), is None under sdpa (is_causal), an additive causal mask [1, 1, seq_len, seq_len] under eager
    attention (e.g. Gemma 2, whose soft-capping sdpa does not do), and a windowed one for a layer that attends
    within a sliding window shorter than the sequences.

    The activations are kept in float32. With forward_dtype bfloat16 the blocks run under autocast: linears and
    attention in bfloat16 (about 4x the float32 matmul rate on CPUs with AVX512-BF16, and the usual dtype on
    GPUs), norms and the residual additions in float32; what a block returns is float32 again."""

    def __init__(self, hidden: torch.Tensor, position_embeddings, batch: int,
                 forward_dtype: torch.dtype = torch.float32, mask: torch.Tensor | None = None):
        self.hidden, self.position_embeddings, self.batch = hidden, position_embeddings, batch
        self.forward_dtype, self.mask = forward_dtype, mask

    def forward(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`block` (a decoder layer, its attention, its MLP, a linear or a function of x) applied to x
        [samples, seq_len, d] in batches."""
        takes_positions = sees_positions(block)
        outs = []
        autocast = torch.autocast(x.device.type, dtype=self.forward_dtype,
                                  enabled=self.forward_dtype != torch.float32)
        for s in range(0, x.shape[0], self.batch):
            xb = x[s : s + self.batch]
            with autocast:
                if takes_positions:  # decoder layer or attention: rotary (cos, sin) for this batch, causal mask
                    n = xb.shape[0]
                    if isinstance(self.position_embeddings, torch.Tensor):  # DeepSeek-V2: one complex freqs_cis
                        positions = self.position_embeddings.expand(n, -1, -1)
                    else:
                        cos, sin = self.position_embeddings
                        positions = (cos.expand(n, -1, -1), sin.expand(n, -1, -1))
                    result = block(xb, attention_mask=self.mask, position_embeddings=positions)
                else:
                    result = block(xb)
            outs.append((result[0] if isinstance(result, tuple) else result).float())
        return torch.cat(outs)

    def run(self, layer: torch.nn.Module) -> torch.Tensor:
        return self.forward(layer, self.hidden)

    def capture(self, layer: torch.nn.Module, names: list[str], outputs: list[str] = ()) \
            -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """One pass through `layer`: the inputs each submodule in `names` saw, [samples, seq_len, in_features], the
        outputs of each in `outputs` (float32, as `forward` returns them), and the layer's output."""
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        made: dict[str, list[torch.Tensor]] = {n: [] for n in outputs}
        hooks = [layer.get_submodule(n).register_forward_hook(lambda m, inp, out, n=n: seen[n].append(inp[0]))
                 for n in names]
        hooks += [layer.get_submodule(n).register_forward_hook(
            lambda m, inp, out, n=n: made[n].append((out[0] if isinstance(out, tuple) else out).float()))
            for n in outputs]
        try:
            out = self.run(layer)
        finally:
            for h in hooks:
                h.remove()
        return _joined(seen), _joined(made), out


def _joined(parts: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor | None]:
    """Each module's batches as one tensor; None for a module never called (an idle expert)."""
    return {n: torch.cat(xs) if xs else None for n, xs in parts.items()}


def sees_positions(block) -> bool:
    """Whether `block` mixes positions (a decoder layer or its attention: it takes the rotary table and the mask);
    otherwise it treats each token alone (an MLP, a sparse MoE block, a linear), so any set of tokens can go
    through it as one sequence."""
    return "position_embeddings" in inspect.signature(getattr(block, "forward", block)).parameters


def causal_attention_mask(n: int, window: int | None, device) -> torch.Tensor:
    """The additive mask [1, 1, n, n]: query i sees key j ≤ i, and with a window only j > i − window (transformers'
    sliding_window_overlay), −inf (float32's min) elsewhere."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    allowed = (j <= i) if window is None else (j <= i) & (j > i - window)
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]


def attention_masks(config, seq_len: int, device, eager: bool) -> dict:
    """The mask each attention kind of the model needs on `seq_len`-token sequences (keyed as layer_type keys
    them): a layer attending within a sliding window shorter than the sequences gets the windowed causal mask, as
    transformers builds it (`layer_types` naming it sliding_attention, or every layer where a config has a
    sliding_window and no layer_types: Mistral, Phi-3); under eager attention every layer gets the causal mask;
    else None (sdpa's is_causal)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    masks = {}
    for kind in set(types or [None]):
        windowed = window is not None and (kind == "sliding_attention" if types else True) and window < seq_len
        masks[kind] = (causal_attention_mask(seq_len, window if windowed else None, device)
                       if windowed or eager else None)
    return masks


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


def blocked_causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             is_causal=None, **kwargs):
    """transformers' sdpa attention, except for a causal pass over more than CAUSAL_BLOCK positions without a mask:
    that runs one block of queries at a time on the keys up to the block's end (a boolean causal mask within it).
    torch's CPU flash kernel splits the keys in blocks of 512 and skips none of a 512-token causal square; by blocks
    of 64 the same attention takes about 0.7 of the time (8 × 9 heads × 512 × 64: 18.0 ms against 26.3 ms on an
    AVX512 EPYC), the same numbers to float rounding. query/key/value [batch, heads, seq, head_dim]."""
    n = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None or not causal or dropout or n <= CAUSAL_BLOCK or key.shape[2] != n:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    parts = []
    for s in range(0, n, CAUSAL_BLOCK):
        e = min(s + CAUSAL_BLOCK, n)
        sees = torch.ones(e - s, e, dtype=torch.bool, device=query.device).tril(s)  # query s + r sees keys ≤ s + r
        parts.append(sdpa_attention_forward(module, query[:, :, s:e], key[:, :, :e], value[:, :, :e], sees,
                                            scaling=scaling, is_causal=False, **kwargs)[0])
    return torch.cat(parts, dim=1), None  # [batch, seq, heads, head_dim], as sdpa_attention_forward returns it


AttentionInterface.register(BLOCKED, blocked_causal_attention)


@contextlib.contextmanager
def causal_blocks(layer: torch.nn.Module):
    """Within the block, the modules of `layer` that attend with sdpa attend with blocked_causal_attention (their
    config's attention implementation, restored after; set on each such config alone, not through the setter,
    which would also set it on the config's sub-configs)."""
    configs = {id(c): c for m in layer.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_attn_implementation", None) == "sdpa"}
    for c in configs.values():
        c._attn_implementation_internal = BLOCKED
    try:
        yield
    finally:
        for c in configs.values():
            c._attn_implementation_internal = "sdpa"
