"""A model's shape from its config.json or a GGUF's metadata: the dimensions the fit arithmetic needs (ModelShape)
and the exact parameter count of each part (ParamCounts), for the Llama / Mistral / Qwen2 / Mixtral / Gemma 3
layout (attention q, k, v, o; gated MLP per expert; router; RMSNorms)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantize.common.errors import QuantizeError
from quantize.sources.models import tied_embeddings

# transformers' Gemma3TextConfig defaults: Gemma 3 config.json files (e.g. gemma-3-4b-it) omit these.
_MODEL_TYPE_DEFAULTS: dict[str, dict] = {
    "gemma3_text": {
        "vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "max_position_embeddings": 131072, "sliding_window": 4096, "sliding_window_pattern": 6,
    },
}


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    intermediate_size: int
    sliding_window: int | None
    sliding_layers: int  # layers that keep only the last sliding_window tokens; 0 if none
    n_params_estimate: int  # rough: embeddings + attention + gated MLP, ignores norms/biases
    max_position_embeddings: int | None = None
    n_heads: int = 0  # query heads; 0 in reports written before it was recorded (then hidden // head_dim)

    @property
    def query_heads(self) -> int:
        return self.n_heads or self.hidden_size // self.head_dim


def shape_from_config(cfg: dict) -> ModelShape:
    """ModelShape from a Hugging Face config.json dict (text_config is used when nested)."""
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    cfg = {**_MODEL_TYPE_DEFAULTS.get(cfg.get("model_type", ""), {}), **cfg}

    def need(key: str) -> int:
        if cfg.get(key) is None:
            raise QuantizeError(f"config.json is missing required key {key!r}")
        return int(cfg[key])

    n_layers = need("num_hidden_layers")
    hidden = need("hidden_size")
    n_heads = need("num_attention_heads")
    n_kv_heads = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    vocab = need("vocab_size")
    inter = need("intermediate_size")

    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:  # Qwen2-style: window set but switched off
        window = None
    layer_types = cfg.get("layer_types")
    if window is None:
        sliding = 0
    elif layer_types:  # Gemma 3 / newer transformers: explicit per-layer list
        sliding = sum(1 for t in layer_types if t == "sliding_attention")
    elif cfg.get("sliding_window_pattern"):  # every Nth layer is full attention
        sliding = n_layers - n_layers // int(cfg["sliding_window_pattern"])
    else:  # Mistral-style: every layer uses the window
        sliding = n_layers

    embed = vocab * hidden * (1 if tied_embeddings(cfg) else 2)
    attn = hidden * head_dim * (2 * n_heads + 2 * n_kv_heads)  # q, o + k, v projections
    mlp = 3 * hidden * inter  # gate, up, down
    return ModelShape(
        n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, hidden_size=hidden,
        vocab_size=vocab, intermediate_size=inter,
        sliding_window=int(window) if window is not None else None, sliding_layers=sliding,
        n_params_estimate=embed + n_layers * (attn + mlp),
        max_position_embeddings=cfg.get("max_position_embeddings"), n_heads=n_heads,
    )


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token embedding
    lm_head: int  # 0 when tied to the embedding
    attn: dict[str, int]  # per layer: q, k, v, o
    mlp_per_expert: dict[str, int]  # per layer and expert: gate, up, down
    router: int  # per layer (MoE gate), 0 for dense
    norms: int  # all layers + final
    n_layers: int
    n_experts: int
    n_active: int
    vocab: int
    rows_per_layer: int  # output rows of all quantized linears in one layer (one int8 scale each)

    @property
    def total(self) -> int:
        per_layer = sum(self.attn.values()) + self.n_experts * sum(self.mlp_per_expert.values()) + self.router
        return self.embedding + self.lm_head + self.n_layers * per_layer + self.norms

    @property
    def active(self) -> int:
        """Parameters read per token: all but the experts not routed to (MoE); = total for dense models."""
        return self.total - self.n_layers * (self.n_experts - self.n_active) * sum(self.mlp_per_expert.values())


def param_counts(cfg: dict) -> ParamCounts:
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    shape = shape_from_config(cfg)
    hidden, layers, heads = shape.hidden_size, shape.n_layers, int(cfg["num_attention_heads"])
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1)
    active = int(cfg.get("num_experts_per_tok") or 1) if experts > 1 else 1
    inter = int(cfg.get("moe_intermediate_size") or shape.intermediate_size) if experts > 1 else shape.intermediate_size
    q_out, kv_out = heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    tied = tied_embeddings(cfg)
    norms_per_layer = 2 + (2 if cfg.get("model_type", "").startswith("gemma3") else 0)  # Gemma 3: pre/post FFN norms
    qk_norms = 2 * shape.head_dim if cfg.get("model_type", "").startswith("gemma3") else 0  # Gemma 3 q/k norms
    return ParamCounts(
        embedding=shape.vocab_size * hidden, lm_head=0 if tied else shape.vocab_size * hidden,
        attn={"q": hidden * q_out, "k": hidden * kv_out, "v": hidden * kv_out, "o": q_out * hidden},
        mlp_per_expert={"gate": hidden * inter, "up": hidden * inter, "down": inter * hidden},
        router=hidden * experts if experts > 1 else 0,
        norms=layers * (norms_per_layer * hidden + qk_norms) + hidden,
        n_layers=layers, n_experts=experts, n_active=active, vocab=shape.vocab_size,
        rows_per_layer=q_out + 2 * kv_out + hidden + experts * (2 * inter + hidden))


def shape_config_from_gguf(path: Path) -> dict:
    """A config.json-like dict from a GGUF's metadata (header only)."""
    import gguf

    reader = gguf.GGUFReader(path)

    def value(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = value("general.architecture")
    if arch is None:
        raise QuantizeError(f"{path}: no general.architecture in the GGUF metadata")
    k = lambda name: f"{arch}.{name}"  # noqa: E731
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    heads = value(k("attention.head_count"))
    cfg = {
        "model_type": {"gemma3": "gemma3_text"}.get(arch, arch),
        "num_hidden_layers": value(k("block_count")), "hidden_size": value(k("embedding_length")),
        "intermediate_size": value(k("feed_forward_length")), "num_attention_heads": heads,
        "num_key_value_heads": value(k("attention.head_count_kv"), heads),
        "head_dim": value(k("attention.key_length")), "max_position_embeddings": value(k("context_length")),
        "vocab_size": value(k("vocab_size")) or (len(tokens.data) if tokens else None),
        "sliding_window": value(k("attention.sliding_window")),
        "num_local_experts": value(k("expert_count")), "num_experts_per_tok": value(k("expert_used_count")),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
    if arch == "gemma3" and cfg["sliding_window"]:
        cfg["sliding_window_pattern"] = 6  # llama.cpp's Gemma 3 graph: every 6th layer is global
    return {key: v for key, v in cfg.items() if v is not None}


def shape_and_counts(cfg: dict) -> tuple[ModelShape, ParamCounts]:
    return shape_from_config(cfg), param_counts(cfg)
