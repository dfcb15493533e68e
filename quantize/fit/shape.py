"""A model's shape from its config.json or a GGUF's metadata: the dimensions the fit arithmetic needs (ModelShape)
and the parameter count of each part (ParamCounts), for the model types in the architecture table (sources/architectures.py) and no other: a type whose
attention or cache is not modelled here is refused, never guessed.

Two attention layouts:
- gqa: q, k, v, o projections; K and V cached per token and layer, 2 × n_kv_heads × head_dim elements.
- mla (DeepSeek-V2/V3, Kimi K2: multi-head latent attention): q_a/q_b (or q), kv_a (with the shared rope key),
  kv_b, o; llama.cpp caches the compressed latent and the rope key only, kv_lora_rank + qk_rope_head_dim
  elements per token and layer (one K cache, no V: src/llama-kv-cache.cpp, is_mla).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantize.common.errors import QuantizeError
from quantize.sources.architectures import ARCHITECTURES, Architecture, architecture, gguf_model_type
from quantize.sources.models import tied_embeddings

def layout(cfg: dict) -> Architecture:
    """The config's row of the architecture table, refused (naming the file's model type) when there is none."""
    return architecture(cfg)


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
    kv_per_token_layer: int = 0  # cached elements per token and layer; 0 in older reports (then 2 × kv heads × dim)
    recurrent_layers: int = 0  # linear-attention layers (no KV cache: a fixed-size state per sequence)
    recurrent_state: int = 0  # f32 elements of one such layer's state per sequence (conv + recurrent)
    llama_cpp_window: bool = True  # llama.cpp keeps the window for the sliding layers (the family's row; vLLM always)

    @property
    def query_heads(self) -> int:
        return self.n_heads or self.hidden_size // self.head_dim

    @property
    def kv_elements(self) -> int:
        """K and V elements cached per token and layer."""
        return self.kv_per_token_layer or 2 * self.n_kv_heads * self.head_dim


def flat_config(cfg: dict) -> dict:
    """config.json with a nested text_config (multimodal checkpoints) lifted, and transformers' omitted defaults."""
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    arch = ARCHITECTURES.get(cfg.get("model_type", ""))
    return {**(arch.defaults if arch else {}), **cfg}


def shape_from_config(cfg: dict) -> ModelShape:
    """ModelShape from a Hugging Face config.json dict (text_config is used when nested)."""
    cfg = flat_config(cfg)
    kind = layout(cfg)

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
    if cfg.get("intermediate_size") is None and kind.moe is not None and cfg.get(kind.moe.width_key):
        # a sparse MoE model without a dense MLP (Qwen3.5-MoE): the feed-forward width a token's activations span
        # is its routed experts' (and the shared expert's), which the compute buffers hold
        inter = int(cfg[kind.moe.width_key]) * int(cfg.get("num_experts_per_tok") or 1)
        inter += int(cfg.get(kind.moe.shared_width_key) or 0) if kind.moe.shared_width_key else 0
    else:
        inter = need("intermediate_size")

    window = cfg.get(kind.window_key)
    if cfg.get("use_sliding_window") is False:  # Qwen2-style: window set but switched off
        window = None
    layer_types = cfg.get("layer_types")
    recurrent, state = 0, 0
    if kind.attention == "hybrid":
        layer_types = hybrid_layer_types(cfg, n_layers)
        recurrent = layer_types.count("linear_attention")
        state = recurrent_state_elements(cfg)
    if window is None:
        sliding = 0
    elif layer_types:  # Gemma 3 / newer transformers: explicit per-layer list
        sliding = sum(1 for t in layer_types if t in ("sliding_attention", "chunked_attention"))
    elif cfg.get("sliding_window_pattern"):  # every Nth layer is full attention
        sliding = n_layers - n_layers // int(cfg["sliding_window_pattern"])
    else:  # Mistral-style: every layer uses the window
        sliding = n_layers

    embed = vocab * hidden * (1 if tied_embeddings(cfg) else 2)
    attn = hidden * head_dim * (2 * n_heads + 2 * n_kv_heads)  # q, o + k, v projections
    mlp = 3 * hidden * inter  # gate, up, down
    kv = 2 * n_kv_heads * head_dim
    if kind.attention == "mla":
        kv = int(cfg["kv_lora_rank"]) + int(cfg["qk_rope_head_dim"])
    return ModelShape(
        n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, hidden_size=hidden,
        vocab_size=vocab, intermediate_size=inter,
        sliding_window=int(window) if window is not None else None, sliding_layers=sliding,
        n_params_estimate=embed + n_layers * (attn + mlp),
        max_position_embeddings=cfg.get("max_position_embeddings"), n_heads=n_heads, kv_per_token_layer=kv,
        recurrent_layers=recurrent, recurrent_state=state, llama_cpp_window=kind.llama_cpp_window,
    )


def hybrid_layer_types(cfg: dict, n_layers: int) -> list[str]:
    """Each layer's kind in a hybrid model: config.json's `layer_types`, or transformers' default (Qwen3.5: every
    `full_attention_interval`-th layer full attention, the others linear attention)."""
    types = cfg.get("layer_types")
    if types:
        if len(types) != n_layers:
            raise QuantizeError(f"config.json: layer_types has {len(types)} entries for {n_layers} layers")
        return list(types)
    interval = int(cfg.get("full_attention_interval") or 4)
    return ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)]


def _linear_dims(cfg: dict) -> tuple[int, int, int, int, int]:
    """(key heads, key head dim, value heads, value head dim, conv kernel) of a Gated DeltaNet layer."""
    keys = ("linear_num_key_heads", "linear_key_head_dim", "linear_num_value_heads", "linear_value_head_dim",
            "linear_conv_kernel_dim")
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise QuantizeError(f"model type {cfg.get('model_type')!r}: the config gives no {', '.join(missing)}, so "
                            "the linear-attention layers' parameters and state would be guesses")
    return tuple(int(cfg[k]) for k in keys)


def recurrent_state_elements(cfg: dict) -> int:
    """One linear-attention layer's state per sequence, as llama.cpp allocates it (src/llama-hparams.cpp, f32):
    the conv state, (kernel − 1) × (value dim + 2 × key dim), and the recurrent state, key head dim × value dim
    (one [key head dim × value head dim] matrix per value head)."""
    kh, kd, vh, vd, kernel = _linear_dims(cfg)
    value_dim = vh * vd
    return (kernel - 1) * (value_dim + 2 * kh * kd) + kd * value_dim


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token embedding
    lm_head: int  # 0 when tied to the embedding
    attn: dict[str, int]  # per layer: q, k, v, o (gqa) or q_a, q_b, kv_a, kv_b, o (mla; q without q_lora_rank)
    attn_columns: dict[str, int]  # each of those projections' input columns
    mlp_per_expert: dict[str, int]  # per layer and routed expert (or the dense MLP): gate, up, down
    router: int  # per MoE layer (the expert gate), 0 for dense
    norms: int  # all layers + final
    n_layers: int
    n_experts: int  # routed experts per MoE layer; 1 for dense models
    n_active: int  # routed experts used per token
    vocab: int
    linear_rows: int  # output rows of all decoder linears (one int8 scale each)
    n_dense_layers: int = 0  # layers with a dense MLP instead of experts (DeepSeek's leading, Llama 4's interleaved)
    dense_mlp: dict[str, int] | None = None  # that dense MLP: gate, up, down
    shared_mlp: dict[str, int] | None = None  # per MoE layer, the always-used shared experts: gate, up, down
    n_linear_layers: int = 0  # hybrid models: layers whose attention is linear_attn instead of `attn`
    linear_attn: dict[str, int] | None = None  # per such layer: in_qkv, in_z, in_b, in_a, out
    linear_attn_columns: dict[str, int] | None = None
    dense_at: tuple[int, ...] = ()  # which layers are dense, where not the leading n_dense_layers (Llama 4)
    n_gqa: int = 1  # attention heads per KV head (llama.cpp's n_gqa; MLA: all heads share one latent)
    mla_heads: tuple[int, int, int] | None = None  # MLA: (heads, qk_nope_head_dim, v_head_dim) of kv_b

    @property
    def attention_total(self) -> int:
        """Attention linears' parameters over all layers (full and linear-attention ones)."""
        return ((self.n_layers - self.n_linear_layers) * sum(self.attn.values())
                + self.n_linear_layers * sum((self.linear_attn or {}).values()))

    def dense_layer(self, i: int) -> bool:
        """Whether layer i has a dense MLP instead of experts."""
        return i in self.dense_at if self.dense_at else i < self.n_dense_layers

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def total(self) -> int:
        moe = self.n_experts * sum(self.mlp_per_expert.values()) + sum((self.shared_mlp or {}).values()) + self.router
        return (self.embedding + self.lm_head + self.attention_total + self.norms
                + self.n_dense_layers * sum((self.dense_mlp or {}).values()) + self.n_moe_layers * moe)

    @property
    def active(self) -> int:
        """Parameters read per token: all but the experts not routed to (MoE); = total for dense models."""
        idle = self.n_experts - self.n_active
        return self.total - self.n_moe_layers * idle * sum(self.mlp_per_expert.values())


def _gated_mlp(hidden: int, width: int) -> dict[str, int]:
    return {"gate": hidden * width, "up": hidden * width, "down": width * hidden}


def param_counts(cfg: dict) -> ParamCounts:
    cfg = flat_config(cfg)
    kind = layout(cfg)
    shape = shape_from_config(cfg)
    hidden, layers, heads = shape.hidden_size, shape.n_layers, int(cfg["num_attention_heads"])
    # transformers ≥ 5 saves Qwen3-MoE's `num_experts` as `num_local_experts` (its attribute map): either key
    moe = kind.moe
    count_key = moe.count_key if moe else None
    experts = next((int(cfg[k]) for k in (count_key, "num_local_experts") if k and cfg.get(k)), 1)
    if moe and experts == 1:
        raise QuantizeError(f"model type {cfg.get('model_type')!r}: the config gives no expert count "
                            f"(`{count_key}`), so the parameter counts would be guesses")
    active = int(cfg.get("num_experts_per_tok") or 1) if experts > 1 else 1
    width = int(cfg[moe.width_key]) if experts > 1 else shape.intermediate_size
    if kind.attention == "mla":
        rope, nope, v_dim = int(cfg["qk_rope_head_dim"]), int(cfg["qk_nope_head_dim"]), int(cfg["v_head_dim"])
        kv_rank, q_rank = int(cfg["kv_lora_rank"]), cfg.get("q_lora_rank")
        q = ({"q_a": hidden * q_rank, "q_b": q_rank * heads * (nope + rope)} if q_rank
             else {"q": hidden * heads * (nope + rope)})
        attn = {**q, "kv_a": hidden * (kv_rank + rope), "kv_b": kv_rank * heads * (nope + v_dim),
                "o": heads * v_dim * hidden}
        columns = {"q": hidden, "q_a": hidden, "q_b": q_rank or 0, "kv_a": hidden, "kv_b": kv_rank, "o": heads * v_dim}
        attn_norms = kv_rank + (q_rank or 0)  # the latent RMSNorms
        attn_rows = (q_rank or 0) + heads * (nope + rope) + kv_rank + rope + heads * (nope + v_dim) + hidden
    else:
        q_out, kv_out = heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
        attn = {"q": hidden * q_out, "k": hidden * kv_out, "v": hidden * kv_out, "o": q_out * hidden}
        columns = {"q": hidden, "k": hidden, "v": hidden, "o": q_out}
        attn_norms = 2 * shape.head_dim if kind.qk_norm else 0
        attn_norms += heads if kind.attention_sinks else 0  # gpt-oss: a sink logit per query head
        attn_rows = q_out + 2 * kv_out + hidden
    n_linear, linear_attn, linear_columns, linear_small, linear_rows = 0, None, None, 0, 0
    if kind.attention == "hybrid":
        # Qwen3.5's full attention: q_proj also gives a sigmoid output gate per query channel (twice the rows)
        attn["q"] *= 2
        attn_rows += q_out
        n_linear = shape.recurrent_layers
        kh, kd, vh, vd, kernel = _linear_dims(cfg)
        qkv, value_dim = 2 * kh * kd + vh * vd, vh * vd
        linear_attn = {"in_qkv": hidden * qkv, "in_z": hidden * value_dim, "in_b": hidden * vh, "in_a": hidden * vh,
                       "out": value_dim * hidden}
        linear_columns = {"in_qkv": hidden, "in_z": hidden, "in_b": hidden, "in_a": hidden, "out": value_dim}
        linear_small = qkv * kernel + 2 * vh + vd  # the causal conv, A_log and dt_bias, the gated RMSNorm
        linear_rows = qkv + value_dim + 2 * vh + hidden
    dense = int(cfg.get(moe.dense_key) or 0) if moe and moe.dense_key and experts > 1 else 0
    dense_width, dense_at = shape.intermediate_size, ()
    if moe and moe.moe_step_key and experts > 1:  # Llama 4: dense layers between the MoE ones
        step = int(cfg.get(moe.moe_step_key) or 1)
        moe_layers = set(cfg.get("moe_layers") or range(step - 1, layers, step))
        dense_at = tuple(i for i in range(layers) if i not in moe_layers)
        dense = len(dense_at)
        dense_width = int(cfg.get(moe.dense_width_key) or dense_width)
    shared_width = 0  # the shared experts' width in all (0: none)
    if moe and moe.shared_width_key and experts > 1:
        shared_width = int(cfg[moe.shared_width_key])
    elif moe and moe.shared_key and experts > 1:
        shared_width = int(cfg.get(moe.shared_key) or 0) * width
    shared_mlp = _gated_mlp(hidden, shared_width) if shared_width else None
    dense_mlp = _gated_mlp(hidden, dense_width) if dense else None
    moe_rows = experts * (2 * width + hidden) + (2 * shared_width + hidden if shared_width else 0)
    # the router: a row per expert (+ its score-correction bias), and the shared expert's sigmoid gate (one row)
    router = (hidden + moe.router_bias) * experts + (hidden if moe.shared_gate else 0) if experts > 1 else 0
    return ParamCounts(
        embedding=shape.vocab_size * hidden, lm_head=0 if tied_embeddings(cfg) else shape.vocab_size * hidden,
        attn=attn, attn_columns={part: columns[part] for part in attn}, mlp_per_expert=_gated_mlp(hidden, width),
        router=router,
        norms=(layers * kind.norms * hidden + (layers - n_linear) * attn_norms + n_linear * linear_small + hidden),
        n_layers=layers, n_experts=experts, n_active=active, vocab=shape.vocab_size,
        linear_rows=((layers - n_linear) * attn_rows + n_linear * linear_rows
                     + dense * (2 * dense_width + hidden) + (layers - dense) * moe_rows),
        n_dense_layers=dense, dense_at=dense_at, dense_mlp=dense_mlp, shared_mlp=shared_mlp, n_linear_layers=n_linear,
        linear_attn=linear_attn, linear_attn_columns=linear_columns,
        n_gqa=heads if kind.attention == "mla" else heads // shape.n_kv_heads,
        mla_heads=(heads, nope, v_dim) if kind.attention == "mla" else None)


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
        "model_type": gguf_model_type(arch),
        # llama.cpp's block count includes the multi-token-prediction layers (GLM-4 MoE's NextN), which hold no KV
        # and do not run in the main model (src/llama-hparams.h: n_layer() excludes them)
        "num_hidden_layers": value(k("block_count")) - (value(k("nextn_predict_layers")) or 0),
        "hidden_size": value(k("embedding_length")),
        "intermediate_size": value(k("feed_forward_length")), "num_attention_heads": heads,
        "num_key_value_heads": value(k("attention.head_count_kv"), heads),
        "head_dim": value(k("attention.key_length")), "max_position_embeddings": value(k("context_length")),
        "vocab_size": value(k("vocab_size")) or (len(tokens.data) if tokens else None),
        "sliding_window": value(k("attention.sliding_window")),
        "num_local_experts": value(k("expert_count")), "num_experts": value(k("expert_count")),
        "num_experts_per_tok": value(k("expert_used_count")),
        "moe_intermediate_size": value(k("expert_feed_forward_length")),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
    if arch == "deepseek2":  # MLA's ranks and head dimensions, shared experts, leading dense layers
        rope, qk = value(k("rope.dimension_count")), value(k("attention.key_length_mla"))
        # llama.cpp converts V2 and V3 to one graph; V3's router has a score-correction bias per expert
        # (blk.N.exp_probs_b), V2's none
        v3 = any(".exp_probs_b" in t.name for t in reader.tensors)
        cfg.update({"model_type": "deepseek_v3" if v3 else "deepseek_v2",
                    "kv_lora_rank": value(k("attention.kv_lora_rank")),
                    "q_lora_rank": value(k("attention.q_lora_rank")),
                    "qk_rope_head_dim": rope, "qk_nope_head_dim": qk - rope if qk and rope else None,
                    "v_head_dim": value(k("attention.value_length_mla")),
                    "n_routed_experts": value(k("expert_count")), "n_shared_experts": value(k("expert_shared_count")),
                    "first_k_dense_replace": value(k("leading_dense_block_count"))})
    if arch == "glm4moe":
        cfg.update({"n_routed_experts": value(k("expert_count")), "n_shared_experts": value(k("expert_shared_count")),
                    "first_k_dense_replace": value(k("leading_dense_block_count"))})
    if arch == "qwen35moe":  # the shared expert's own width
        cfg["shared_expert_intermediate_size"] = value(k("expert_shared_feed_forward_length"))
    if arch in ("qwen35", "qwen35moe"):  # the Gated DeltaNet dimensions, as llama.cpp's converter stores them (ssm.*)
        value_heads = value(k("ssm.time_step_rank"))
        cfg.update({"linear_conv_kernel_dim": value(k("ssm.conv_kernel")),
                    "linear_key_head_dim": value(k("ssm.state_size")),
                    "linear_num_key_heads": value(k("ssm.group_count")), "linear_num_value_heads": value_heads,
                    "linear_value_head_dim": value(k("ssm.inner_size")) // value_heads if value_heads else None,
                    "full_attention_interval": value(k("full_attention_interval"))})
    if arch == "gpt-oss" and cfg["sliding_window"]:
        cfg["sliding_window_pattern"] = 2  # llama.cpp's gpt-oss graph: sliding and full layers alternate
    if arch == "gemma3" and cfg["sliding_window"]:
        cfg["sliding_window_pattern"] = 6  # llama.cpp's Gemma 3 graph: every 6th layer is global
    return {key: v for key, v in cfg.items() if v is not None}


def shape_and_counts(cfg: dict) -> tuple[ModelShape, ParamCounts]:
    return shape_from_config(cfg), param_counts(cfg)
