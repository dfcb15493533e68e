"""How many bytes a model's weights take in a given format, from its shape alone (no weights read), and the
shape of a model from wherever it is described: a config.json (local, or a hub id's when online) or a GGUF
header. `quantize fit` uses this for models the user has not downloaded or built yet.

Parameter counts are exact for the Llama / Mistral / Qwen2 / Mixtral / Gemma 3 layout (attention q, k, v, o;
gated MLP per expert; router; RMSNorms); weight bytes per format follow the format's block layout:

    fp16 / bf16   2 bytes per parameter
    int8          W8A16 per channel: 1 byte per linear weight + an fp16 scale per output row; rest fp16
    int4          W4A16 group 128 symmetric (compressed-tensors, GPTQ/AWQ sym): 4 + 16/128 bits per linear
                  weight; embeddings and lm_head fp16
    q8_0          llama.cpp Q8_0: 34 bytes per 32 weights for every 2-D tensor, norms F32
    q4_k_m        llama.cpp's Q4_K_M mix (llama-quant.cpp): Q4_K (4.5 bits) everywhere, Q6_K (6.5625 bits) for
                  output.weight and for attn_v / ffn_down in the layers `use_more_bits` picks, with llama.cpp's
                  fallbacks for rows not a multiple of 256 (q4_k_m_tensors); norms and MoE router F32
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantize.errors import QuantizeError
from quantize.fit import ModelShape, shape_from_config

WEIGHT_FORMATS = ("fp16", "bf16", "int8", "int4", "q8_0", "q4_k_m")


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
    tied = cfg.get("tie_word_embeddings", True)
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


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp (llama-quant.cpp): the first and last eighth of the layers and every third one between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def weight_bytes(counts: ParamCounts, fmt: str) -> int:
    """Bytes of all weights in `fmt` (see the module docstring for each format's layout)."""
    if fmt not in WEIGHT_FORMATS:
        raise QuantizeError(f"unknown weight format {fmt!r}; accepted: {', '.join(WEIGHT_FORMATS)}")
    c = counts
    mlp = c.n_experts * sum(c.mlp_per_expert.values())
    linears = c.n_layers * (sum(c.attn.values()) + mlp)  # quantized linears in the decoder layers
    edges = c.embedding + c.lm_head
    small = c.norms + c.n_layers * c.router
    if fmt in ("fp16", "bf16"):
        return 2 * c.total
    if fmt == "int8":  # + an fp16 scale per output row of every linear
        return linears + 2 * c.n_layers * c.rows_per_layer + 2 * (edges + small)
    if fmt == "int4":
        return int(linears * (4 + 16 / 128) / 8) + 2 * (edges + small)
    if fmt == "q8_0":  # every 2-D tensor Q8_0 but the MoE router, which llama.cpp keeps F32
        return int((linears + edges) * BITS["Q8_0"] / 8) + 4 * (c.norms + c.n_layers * c.router)
    return int(sum(n * BITS[kind] for n, kind in q4_k_m_tensors(c)) / 8) + 4 * (c.norms + c.n_layers * c.router)


# bits per weight of GGML block types: bytes per block × 8 / weights per block (gguf-py GGML_QUANT_SIZES)
BITS = {"Q4_K": 144 * 8 / 256, "Q5_K": 176 * 8 / 256, "Q6_K": 210 * 8 / 256, "Q8_0": 34 * 8 / 32,
        "Q5_0": 22 * 8 / 32, "Q5_1": 24 * 8 / 32}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp, when a row is not a multiple of 256


def q4_k_m_tensors(c: ParamCounts):
    """(parameters, GGML type) of every quantized tensor under llama.cpp's Q4_K_M mix (llama-quant.cpp):
    Q4_K, with Q6_K for attn_v and ffn_down in the layers use_more_bits picks and for the output (a tied
    embedding takes the output's type), Q5_K attn_output with 8 experts; rows (input columns) not a multiple of
    256 take the fallback type."""
    hidden = c.embedding // c.vocab
    q_out = c.attn["q"] // hidden
    inter = c.mlp_per_expert["down"] // hidden

    def typed(n, cols, kind):
        return n, (FALLBACK[kind] if cols % 256 else kind)

    for i in range(c.n_layers):
        more = use_more_bits(i, c.n_layers)
        yield typed(c.attn["q"] + c.attn["k"], hidden, "Q4_K")
        yield typed(c.attn["v"], hidden, "Q6_K" if more else "Q4_K")
        yield typed(c.attn["o"], q_out, "Q5_K" if c.n_experts == 8 else "Q4_K")
        yield typed(c.n_experts * (c.mlp_per_expert["gate"] + c.mlp_per_expert["up"]), hidden, "Q4_K")
        yield typed(c.n_experts * c.mlp_per_expert["down"], inter, "Q6_K" if more else "Q4_K")
    if c.lm_head:
        yield typed(c.embedding, hidden, "Q4_K")
        yield typed(c.lm_head, hidden, "Q6_K")
    else:
        yield typed(c.embedding, hidden, "Q6_K")


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


def describe_model(spec: str, fmt: str | None) -> dict:
    """Shape, parameter counts and weight bytes of MODEL for `quantize fit`, without loading weights:
    a GGUF (header: measured tensor bytes), a local HF directory or config.json (measured safetensors bytes if
    present and no format asked), or a hub id (config.json only, needs a network)."""
    import json

    from quantize import fit

    path = Path(spec).expanduser()
    measured = None
    if path.suffix == ".gguf" and path.is_file():
        cfg = shape_config_from_gguf(path)
        measured, source = sum(fit.weight_bytes_gguf(path).values()), "GGUF tensor infos"
    elif path.is_file() and path.name.endswith(".json"):
        cfg, source = json.loads(path.read_text()), "config.json"
    elif path.is_dir() and (path / "config.json").is_file():
        cfg, source = json.loads((path / "config.json").read_text()), "config.json"
        if any(path.glob("*.safetensors")):
            measured = sum(fit.weight_bytes_safetensors(path).values())
    elif spec.count("/") == 1 and not path.exists():
        cfg, source = _hub_config(spec), f"hub config.json of {spec}"
    else:
        raise QuantizeError(f"model {spec}: not a .gguf file, a config.json, an HF directory or a hub id")
    shape, counts = shape_and_counts(cfg)
    if fmt is not None:
        weights, how = weight_bytes(counts, fmt), f"estimated for {fmt} from the parameter counts"
    elif measured is not None:
        weights, how = measured, f"measured from {'the GGUF' if path.suffix == '.gguf' else 'safetensors headers'}"
    else:
        weights, how = weight_bytes(counts, "fp16"), "estimated for fp16 (no weights here; pass --weights)"
    active_fraction = counts.active / counts.total
    return {"shape": shape, "counts": counts, "weights_bytes": weights, "weights_how": how, "source": source,
            "active_weight_bytes": int(weights * active_fraction)}


def _hub_config(repo_id: str) -> dict:
    import json
    import os

    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: one message for the user
        offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise QuantizeError(f"model {repo_id}: could not fetch config.json from the hub{offline}: "
                            f"{type(exc).__name__}. Give a local config.json, HF directory or .gguf") from None
