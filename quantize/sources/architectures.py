"""One row per model family: everything quantize knows of an architecture, read by the layer-wise engine
(methods/engine.py), the fit (fit/shape.py), plan and preflight, and the writers. Adding a family is adding a row;
a new kind of layer adds one function where it is computed.

A row holds:
- the decoder layer as the engine streams it (`Layer`: GPTQ's true-sequential groups, AWQ's mappings, the norm
  convention, whether the llama stages apply), or None with the reason the layer-wise methods refuse it;
- the attention (`gqa` or `mla`), the RMSNorms per layer and per-head q/k norms, which the fit counts;
- the sparse MoE block (`Moe`: where its experts and shared experts live in the checkpoint, the config keys of the
  expert count, width, shared experts and leading dense layers), or None for a dense model;
- transformers' config defaults that config.json files omit, llama.cpp's architecture name, and which HF → GGUF
  converter writes it (`quantize`: formats/gguf_convert.py, byte for byte as measured; else llama.cpp's own).

Names of linears are relative to the decoder layer (`model.layers.{i}.`). A group or AWQ row may name linears that
a given configuration lacks (DeepSeek's q_proj without q_lora_rank, q_a/q_b_proj with it): the engine keeps the
names the layer has (`present`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantize.common.errors import QuantizeError

AwqRow = tuple[str, tuple[str, ...], str]  # (op that feeds the linears, the linears, the block that judges a scale)


@dataclass(frozen=True)
class Layer:
    """The decoder layer as the layer-wise engine streams it.

    groups: the linears quantized together, in order (GPTQ "true sequential": each group sees inputs that already
        went through the quantized groups before it); the linears of a group read one input.
    awq: AWQ's mappings; a row whose op is a linear applies where its outputs are the linears' inputs (v → o is
        skipped under grouped-query attention) or, for a fused gate_up, to its last rows (the up half).
    staged: the llama layer, which engine.staged_layer runs in one pass per layer; other layouts run the decoder
        layer itself once per group with a hook on the group's input (engine.hooked_layer).
    norm_offset: the RMSNorm computes x̂·(norm_offset + weight) (Gemma: 1), which AWQ's fold must respect."""

    groups: tuple[tuple[str, ...], ...]
    awq: tuple[AwqRow, ...]
    staged: bool = False
    norm_offset: float = 0.0


@dataclass(frozen=True)
class Moe:
    """A sparse MoE block: `block`, its name in the decoder layer as the checkpoint stores it (Mixtral:
    block_sparse_moe, which transformers 5 calls `mlp`); each expert's gate, up and down linears
    (`{block}.experts.{e}.{name}`); the router `{block}.gate`; `shared`, the always-used shared expert MLP's name in
    the layer (gate_proj/up_proj/down_proj under it), if any. The config keys: routed expert count, expert width,
    shared expert count, and the leading layers that keep a dense MLP (DeepSeek's first_k_dense_replace)."""

    block: str
    linears: tuple[str, str, str]
    count_key: str
    width_key: str
    shared: str | None = None
    shared_key: str | None = None
    dense_key: str | None = None
    router_bias: bool = False  # the router's score-correction bias per expert (e_score_correction_bias)
    # the shared expert's width where the config gives it (Qwen3.5-MoE: shared_expert_intermediate_size, one shared
    # expert); else shared_key experts of the routed width
    shared_width_key: str | None = None
    shared_gate: bool = False  # a sigmoid gate on the shared expert's output (`{block}.shared_expert_gate`, 1 row)
    # interleaved dense and MoE layers (Llama 4): the config's `moe_layers` list, else every `moe_step_key`-th layer
    # has experts and the others a dense MLP of width `dense_width_key`
    moe_step_key: str | None = None
    dense_width_key: str | None = None


@dataclass(frozen=True)
class Architecture:
    model_type: str
    # "gqa" (q, k, v, o; K and V cached), "mla" (latent attention: the latent and rope key cached) or "hybrid"
    # (linear-attention layers keeping a fixed-size state beside full-attention layers with a KV cache; layer_types)
    attention: str
    norms: int  # RMSNorms of hidden width per decoder layer
    layer: Layer | None  # None: the layer-wise engine cannot stream it (`layer_refusal` says why)
    gguf_arch: str  # llama.cpp's architecture name (GGUF general.architecture)
    gguf_writer: str = "llama.cpp"  # "quantize": formats/gguf_convert.py writes it; else llama.cpp's converter
    qk_norm: bool = False  # per-head q/k RMSNorms
    attention_sinks: bool = False  # a learned softmax sink logit per query head and layer (gpt-oss)
    moe: Moe | None = None
    defaults: dict = field(default_factory=dict)  # transformers' config defaults that config.json files omit
    layer_refusal: str = ""
    # per artefact format, the linears its loader re-quantizes itself on load (so the artefact keeps them in float)
    keep_float: dict = field(default_factory=dict)
    # config.json keys llama.cpp's converter reads that transformers ≥ 5 no longer saves (its model hard-codes them):
    # given to the converter where the file lacks them
    converter_keys: dict = field(default_factory=dict)
    mlx_model_type: str | None = None  # mlx-lm's model module for the family, where its name differs
    # the name prefix of the multi-token-prediction tensors published checkpoints carry (transformers drops them):
    # llama.cpp's converter requires them unless told --no-mtp, which it is where a checkpoint has none
    mtp_tensors: str | None = None
    # llama.cpp keeps a sliding-window cache for the family's windowed layers (its graph sets swa_type: gemma2,
    # gemma3). Elsewhere a config's sliding_window is not used and every layer caches the whole context: llama.cpp
    # runs Mistral on its llama graph, and src/models/phi3.cpp switches Phi-3's window off ("Phi SWA is currently
    # disabled"); llama, qwen2/3 have none. vLLM applies config.json's window (fit/context_memory.kv_cells)
    llama_cpp_window: bool = False
    # the config key of the attention window: a sliding window, or Llama 4's chunks (attention_chunk_size), which
    # llama.cpp caches the same way (src/llama-kv-cache-iswa.cpp); layer_types name such layers sliding_attention or
    # chunked_attention
    window_key: str = "sliding_window"
    note: str = ""


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA_GROUPS = (_ATTN, ("self_attn.o_proj",), _MLP, ("mlp.down_proj",))
_LLAMA_AWQ = (("input_layernorm", _ATTN, "self_attn"), ("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
              ("post_attention_layernorm", _MLP, "mlp"), ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"))
LLAMA = Layer(groups=_LLAMA_GROUPS, awq=_LLAMA_AWQ, staged=True)
# a llama attention with a non-llama MLP (a sparse MoE block): the decoder layer runs hooked, the rows as llama's
LLAMA_HOOKED = Layer(groups=_LLAMA_GROUPS, awq=_LLAMA_AWQ)
# Gemma 2/3: sandwich norms (post-attention and post-feed-forward norms on the branch outputs, the MLP fed by
# pre_feedforward_layernorm), the embedding scaled by sqrt(hidden) (inside its module), RMSNorm weights stored as
# offsets from 1
GEMMA = Layer(groups=_LLAMA_GROUPS, awq=(_LLAMA_AWQ[0], _LLAMA_AWQ[1], ("pre_feedforward_layernorm", _MLP, "mlp"),
                                         _LLAMA_AWQ[3]), norm_offset=1.0)
# Phi-3: q/k/v fused in qkv_proj and gate/up in gate_up_proj (the fused tensors are what vLLM and llama.cpp load);
# AWQ as AutoAWQ: norm → qkv, norm → gate_up, the up half of gate_up → down (no v → o: v is fused)
PHI3 = Layer(groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
             awq=(("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
                  ("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
                  ("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj")))
# Multi-head latent attention (DeepSeek-V2/V3): the hidden state feeds the query (q_a_proj, or q_proj without
# q_lora_rank) and the compressed KV with the shared rope key (kv_a_proj_with_mqa); q_b_proj reads the normed query
# latent, kv_b_proj the normed KV latent. AWQ as llm-compressor's DeepSeek mappings: each norm → the linears it feeds
_MLA_IN = ("self_attn.q_a_proj", "self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")
MLA = Layer(groups=(_MLA_IN, ("self_attn.q_b_proj",), ("self_attn.kv_b_proj",), ("self_attn.o_proj",),
                    _MLP, ("mlp.down_proj",)),
            awq=(("input_layernorm", _MLA_IN, "self_attn"),
                 ("self_attn.q_a_layernorm", ("self_attn.q_b_proj",), "self_attn.q_b_proj"),
                 ("self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), "self_attn.kv_b_proj"),
                 ("post_attention_layernorm", _MLP, "mlp"), ("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj")))

# Qwen3.5 (hybrid): three Gated DeltaNet linear-attention layers to one full-attention layer (layer_types). A linear
# layer reads the normed hidden state through in_proj_qkv (then a causal conv), in_proj_z (the output gate), in_proj_b
# and in_proj_a (per-head decay and step), and writes through out_proj after a gated RMSNorm; a full layer is
# Qwen3's attention with a sigmoid output gate in q_proj's second half. Each layer holds one or the other, so each
# group and AWQ row names both (`present` keeps the layer's); RMSNorms are (1 + w), as Gemma's
_LINEAR_IN = ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b", "linear_attn.in_proj_a")
HYBRID = Layer(groups=(_ATTN + _LINEAR_IN, ("self_attn.o_proj", "linear_attn.out_proj"), _MLP, ("mlp.down_proj",)),
               awq=(_LLAMA_AWQ[0], ("input_layernorm", _LINEAR_IN, "linear_attn"), *_LLAMA_AWQ[1:]), norm_offset=1.0)

_GEMMA3_DEFAULTS = {"vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                    "max_position_embeddings": 131072, "sliding_window": 4096, "sliding_window_pattern": 6}
_QWEN_MOE = Moe("mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts", "moe_intermediate_size")
_DEEPSEEK_MOE = Moe("mlp", ("gate_proj", "up_proj", "down_proj"), "n_routed_experts", "moe_intermediate_size",
                    shared="mlp.shared_experts", shared_key="n_shared_experts", dense_key="first_k_dense_replace",
                    router_bias=True)
_DEEPSEEK_V2_MOE = Moe("mlp", ("gate_proj", "up_proj", "down_proj"), "n_routed_experts", "moe_intermediate_size",
                       shared="mlp.shared_experts", shared_key="n_shared_experts", dense_key="first_k_dense_replace")
# Qwen3.5-MoE: one shared expert of its own width behind a sigmoid gate, a softmax top-k router
_QWEN35_MOE = Moe("mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts", "moe_intermediate_size",
                  shared="mlp.shared_expert", shared_width_key="shared_expert_intermediate_size", shared_gate=True)
# Llama 4 (Scout 17B-16E, Maverick 17B-128E): one shared expert of the routed width beside top-k routed experts whose
# input (not output) the router's sigmoid score scales; dense layers (width intermediate_size_mlp) between MoE ones
_LLAMA4_MOE = Moe("feed_forward", ("gate_proj", "up_proj", "down_proj"), "num_local_experts", "intermediate_size",
                  shared="feed_forward.shared_expert", shared_width_key="intermediate_size",
                  moe_step_key="interleave_moe_layer_step", dense_width_key="intermediate_size_mlp")
# llama.cpp's graph: 8192-token chunks, every 4th layer full (src/models/llama4.cpp)
_LLAMA4_DEFAULTS = {"attention_chunk_size": 8192, "sliding_window_pattern": 4}
_LLAMA4_REFUSAL = ("its experts take the router's score on their input and are one [experts, hidden, 2·width] tensor; "
                   "the engine has no expert module for them yet")
_NOT_STREAMED = "the layer-wise engine has no row for its decoder layer yet"

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in [
    Architecture("llama", "gqa", 2, LLAMA, "llama", gguf_writer="quantize"),
    Architecture("mistral", "gqa", 2, LLAMA, "llama", gguf_writer="quantize", note="llama.cpp runs Mistral on its llama graph"),
    Architecture("qwen2", "gqa", 2, LLAMA, "qwen2", gguf_writer="quantize", note="q/k/v biases"),
    Architecture("qwen3", "gqa", 2, LLAMA, "qwen3", gguf_writer="quantize", qk_norm=True,
                 note="per-head q/k norms inside the attention, between q/k_proj and the rotary embedding"),
    # NoPE layers in a Llama body: every fourth layer's attention skips the rotary embedding (no_rope_layers)
    Architecture("smollm3", "gqa", 2, LLAMA, "smollm3", note="NoPE every 4th layer"),
    Architecture("phi3", "gqa", 2, PHI3, "phi3", note="fused qkv_proj and gate_up_proj"),
    # Gemma 2: attention and final logit soft-capping, computed under eager attention (sources/models.meta_model)
    Architecture("gemma2", "gqa", 4, GEMMA, "gemma2", defaults={"sliding_window_pattern": 2}, llama_cpp_window=True,
                 note="sandwich norms, soft-capping, sliding/global layers"),
    Architecture("gemma3_text", "gqa", 4, GEMMA, "gemma3", qk_norm=True, defaults=_GEMMA3_DEFAULTS, llama_cpp_window=True,
                 note="sandwich norms, 5 sliding : 1 global layers with their own rotary tables"),
    Architecture("gemma3", "gqa", 4, None, "gemma3", qk_norm=True, defaults=_GEMMA3_DEFAULTS, llama_cpp_window=True,
                 layer_refusal="the multimodal Gemma 3 checkpoint (its text model is `gemma3_text`)"),
    # sparse mixtures of experts: attention as llama, a sparse MoE block instead of the MLP (Qwen3-MoE's
    # `mlp_only_layers` keep a dense MLP); transformers 5 holds the experts as 3-D tensors, the engine as linears
    Architecture("mixtral", "gqa", 2, LLAMA_HOOKED, "llama",
                 moe=Moe("block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts", "intermediate_size")),
    Architecture("qwen3_moe", "gqa", 2, LLAMA_HOOKED, "qwen3moe", qk_norm=True, moe=_QWEN_MOE),
    # GLM-4.5/4.6/4.7 (glm4_moe): llama attention (partial rotary, q/k/v biases, optional q/k norms), leading dense
    # layers, then a sigmoid router with a score-correction bias over grouped experts plus one shared expert
    Architecture("glm4_moe", "gqa", 2, LLAMA_HOOKED, "glm4moe", moe=_DEEPSEEK_MOE,
                 defaults={"first_k_dense_replace": 1, "n_shared_experts": 1}),
    # mlx-lm's qwen3_5 takes a text-only config (its weights under language_model.; conv1d and (1 + w) norms
    # converted from the HF layout by its sanitize)
    Architecture("qwen3_5_text", "hybrid", 2, HYBRID, "qwen35", qk_norm=True, mlx_model_type="qwen3_5", mtp_tensors="mtp.",
                 note="Gated DeltaNet linear attention 3 : 1 full attention (gated), a fixed-size recurrent state"),
    Architecture("qwen3_5", "hybrid", 2, None, "qwen35", qk_norm=True,
                 layer_refusal="the multimodal Qwen3.5 checkpoint, or an MLX artefact of qwen3_5_text (mlx-lm's "
                               "name); the layer-wise methods take the text model (`qwen3_5_text`)"),
    # Qwen3.5-MoE (35B-A3B, 122B-A10B, 397B-A17B): Qwen3.5's hybrid layers with a sparse MoE block in every layer
    Architecture("qwen3_5_moe_text", "hybrid", 2, HYBRID, "qwen35moe", qk_norm=True, moe=_QWEN35_MOE,
                 mlx_model_type="qwen3_5_moe", mtp_tensors="mtp.",
                 note="Qwen3.5's hybrid layers; routed experts plus a gated shared expert in every layer"),
    Architecture("qwen3_5_moe", "hybrid", 2, None, "qwen35moe", qk_norm=True, moe=_QWEN35_MOE,
                 layer_refusal="the multimodal Qwen3.5-MoE checkpoint, or an MLX artefact of qwen3_5_moe_text "
                               "(mlx-lm's name); the layer-wise methods take the text model (`qwen3_5_moe_text`)"),
    # gpt-oss (20b, 120b): llama attention with q/k/v/o biases and a learned softmax sink per head, sliding (128) and
    # full layers alternating, a top-k softmax router with a bias over experts whose gate/up are one tensor
    # [experts, hidden, 2·width] with interleaved columns, biases and a clamped SwiGLU (MXFP4 in the published
    # checkpoint). llama.cpp's gpt-oss graph keeps the sliding-window cache
    Architecture("gpt_oss", "gqa", 2, None, "gpt-oss", llama_cpp_window=True, attention_sinks=True,
                 moe=Moe("mlp", ("gate_proj", "up_proj", "down_proj"), "num_local_experts", "intermediate_size",
                         router_bias=True),
                 layer_refusal="its experts (one [experts, hidden, 2·width] tensor with interleaved gate/up columns, "
                               "biases and a clamped SwiGLU) have no expert module in the engine yet; GGUF without "
                               "an importance matrix goes through llama.cpp's converter",
                 note="attention sinks, sliding 128 / full alternating, biased experts"),
    # Llama 4: chunked attention (8192-token chunks) on three layers of four, full attention without rotary
    # embedding (NoPE) on the fourth; llama.cpp caches the chunked layers like sliding ones (pattern 4). llama.cpp's
    # converter registers only the multimodal checkpoint (Llama4ForConditionalGeneration)
    Architecture("llama4_text", "gqa", 2, None, "llama4", moe=_LLAMA4_MOE, llama_cpp_window=True,
                 window_key="attention_chunk_size", defaults=_LLAMA4_DEFAULTS,
                 layer_refusal=_LLAMA4_REFUSAL, note="chunked attention 3 : 1 NoPE full; routed + shared expert"),
    Architecture("llama4", "gqa", 2, None, "llama4", moe=_LLAMA4_MOE, llama_cpp_window=True,
                 window_key="attention_chunk_size", defaults=_LLAMA4_DEFAULTS,
                 layer_refusal="the multimodal Llama 4 checkpoint; " + _LLAMA4_REFUSAL),
    # DeepSeek-V2 / V2-Lite (16B, the size people run locally): V3's MLA (V2-Lite has no query latent: q_proj), a
    # dense first layer, then routed experts and shared experts under a softmax router without V3's score-correction
    # bias
    Architecture("deepseek_v2", "mla", 2, MLA, "deepseek2", moe=_DEEPSEEK_V2_MOE,
                 keep_float={"mlx": ("self_attn.kv_b_proj",)}, note="MLA; softmax router, shared experts"),
    # DeepSeek-V3 (and Kimi K2's layout): MLA, leading dense layers, shared expert, sigmoid grouped router
    # mlx-lm's loader splits kv_b_proj per head into embed_q (its K part, transposed) and unembed_out, and
    # re-quantizes both from the dequantized weights: a quantized kv_b_proj would be rounded twice, so MLX keeps it
    Architecture("deepseek_v3", "mla", 2, MLA, "deepseek2", moe=_DEEPSEEK_MOE,
                 keep_float={"mlx": ("self_attn.kv_b_proj",)}, note="llama.cpp converts V3 to its deepseek2 graph",
                 # without scoring_func llama.cpp's deepseek2 routes with a softmax (its DeepSeek-V2 default)
                 converter_keys={"scoring_func": "sigmoid"}),
]}


def architecture(config: dict, where: str = "config.json") -> Architecture:
    """The row of a config's model type; refused, naming the type and every known one, when there is none."""
    model_type = config.get("model_type")
    if model_type is None:
        raise QuantizeError(f"{where}: no `model_type` key, so the architecture is unknown; known model types: "
                            f"{', '.join(ARCHITECTURES)}")
    if model_type not in ARCHITECTURES:
        raise QuantizeError(f"{where}: model type {model_type!r} has no row in quantize's architecture table "
                            f"(quantize/sources/architectures.py), so its layers, KV cache and parameter counts "
                            f"would be guesses; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def streamed_layer(config: dict, where: str = "config.json") -> Layer:
    """The decoder layer the engine streams for this config's model type, or a refusal naming what is missing."""
    arch = architecture(config, where)
    if arch.layer is None:
        streamed = [t for t, a in ARCHITECTURES.items() if a.layer is not None]
        raise QuantizeError(f"{where}: model type {arch.model_type!r}: {arch.layer_refusal}; layer-wise methods "
                            f"(rtn, gptq, awq, the budgeted mix, GGUF's importance matrix) stream "
                            f"{', '.join(streamed)}")
    return arch.layer


def gguf_model_type(arch: str) -> str:
    """The HF model type of a llama.cpp architecture name (the first row that converts to it)."""
    return next((t for t, a in ARCHITECTURES.items() if a.gguf_arch == arch), arch)


def checkpoint_experts(model_type: str) -> Moe | None:
    arch = ARCHITECTURES.get(model_type)
    return arch.moe if arch is not None else None
