"""HF checkpoint → GGUF (F32 / F16 / BF16 / Q8_0) for the Llama family, with the tokenizer metadata llama.cpp
needs to tokenise exactly like transformers. Built on the `gguf` package (GGUFWriter, the tensor name map,
SpecialVocab, and numpy encoders whose bytes match llama.cpp's); k-quants are then made from this file by
llama.cpp's own quantiser (methods/gguf.py).

Follows llama.cpp's convert_hf_to_gguf.py for these architectures: the `llama` arch stores Q and K with their
rows permuted (llama.cpp's rotary pairs adjacent dims, transformers pairs dim i with i + head_dim/2), norms and
other 1-D tensors stay F32, a tied lm_head is not written, and the BPE pre-tokenizer is identified by hashing
the token ids of a fixed check text (CHECK_TEXT) against the table below.

Every other architecture (Gemma 3, Phi-3, and whatever else llama.cpp registers) goes through llama.cpp's own
converter (llamacpp_convert.py). This one stays for the Llama family because it writes the artefacts the project
has measured byte for byte (bench/results/house_hashes.md), and because it takes a BPE tokenizer with a plain
byte-level pre-tokenizer (GPT-2's split) that llama.cpp's converter rejects when its hash is not in its table
(the tests' trained tokenizers; a fine-tuned vocabulary).
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from quantize.common.errors import QuantizeError
from quantize.formats import llamacpp_convert
from quantize.formats.gguf_types import ftype
from quantize.sources.architectures import ARCHITECTURES
from quantize.sources.models import tied_embeddings, tokenizer_adds_bos
from quantize.sources.shards import Shards

# HF model_type → GGUF architecture, for the rows of the architecture table this writer writes (`gguf_writer`).
# Mistral (non-tekken) uses llama's graph in llama.cpp; Qwen3 adds per-head q/k RMSNorms (attn_q_norm,
# attn_k_norm), which the tensor name map names.
ARCHES = {t: a.gguf_arch for t, a in ARCHITECTURES.items() if a.gguf_writer == "quantize"}
PERMUTES_QK = {"llama"}  # GGUF arches whose Q/K rows are stored in llama.cpp's rotary order

# sha256(str(tokenizer.encode(CHECK_TEXT))) → tokenizer.ggml.pre, rows from llama.cpp's convert_hf_to_gguf.py
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen2.5
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
}
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
OUT_TYPES = ("F32", "F16", "BF16", "Q8_0")


def permute_qk(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' half-split rotary layout → llama.cpp's interleaved pairs, per head. W: [n_head·d, in]."""
    return W.reshape(n_head, 2, W.shape[0] // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's BPE pre-tokenizer: by hash, or plain GPT-2 byte-level."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # a bare ByteLevel pre-tokenizer splits with GPT-2's regex
    raise QuantizeError(f"unknown BPE pre-tokenizer (check-text hash {digest[:16]}…, pre_tokenizer "
                        f"{pre.get('type')!r}); known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}")


def add_vocab(writer, model_dir: Path, config: dict) -> None:
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not (model_dir / "tokenizer.json").is_file() or tokenizer.backend_tokenizer.model.__class__.__name__ != "BPE":
        raise QuantizeError(f"{model_dir}: GGUF conversion supports byte-level BPE tokenizers (tokenizer.json), "
                            "as Llama 3, SmolLM, Qwen2 and Mistral Nemo use")
    vocab_size = config.get("vocab_size", len(tokenizer.get_vocab()))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        if token in added:
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.setdefault("bos", tokenizer_adds_bos(tokenizer))  # llama.cpp's converter states it
    special.add_to_gguf(writer)


ROPE_TYPES = ("default", "llama3")  # llama3: Llama 3.1+'s frequency scaling, written as the rope_freqs tensor


def rope_parameters(config: dict) -> dict:
    """The config's rope settings (transformers 5's `rope_parameters`, 4's `rope_scaling`), with `rope_type`."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope["rope_type"] = rope.get("rope_type", rope.get("type")) or "default"
    return rope


def check_convertible(config: dict) -> None:
    """Fail before any work when no converter can write the model: this one for its types (and rope scalings),
    llama.cpp's own for the architectures it registers."""
    model_type = config.get("model_type")
    if model_type not in ARCHES:
        if not llamacpp_convert.supports(config):
            raise QuantizeError(f"GGUF conversion: llama.cpp's converter does not know the architecture "
                                f"{config.get('architectures')} (model type {model_type!r})")
        return
    rope_type = rope_parameters(config)["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise QuantizeError(f"GGUF conversion: rope type {rope_type!r} is not supported; accepted: "
                            f"{', '.join(ROPE_TYPES)}")


def rope_freqs(config: dict, head_dim: int) -> np.ndarray | None:
    """Llama 3.1+'s rope scaling as llama.cpp takes it: one factor per rotary frequency (`rope_freqs.weight`,
    F32 [head_dim / 2]), dividing that frequency. As llama.cpp's converter (conversion/llama.py,
    generate_extra_tensors): wavelengths shorter than original_max_position_embeddings / high_freq_factor keep
    their frequency, longer than original / low_freq_factor are divided by `factor`, and those between are
    interpolated. None for default rope."""
    rope = rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return None
    base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def add_hparams(writer, config: dict, arch: str) -> None:
    check_convertible(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = rope_parameters(config)
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])


def encode(data: np.ndarray, out_type: str):
    """(array, GGML type) to write: 1-D tensors stay F32 as llama.cpp keeps them."""
    import gguf

    T = gguf.GGMLQuantizationType
    if data.ndim == 1 or out_type == "F32":
        return data.astype(np.float32), T.F32
    if out_type == "F16":
        return data.astype(np.float16), T.F16
    kind = T.BF16 if out_type == "BF16" else T.Q8_0
    if out_type == "Q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0]:
        return data.astype(np.float16), T.F16  # rows not a multiple of 32: llama.cpp falls back too
    return gguf.quants.quantize(data.astype(np.float32), kind), kind


def tensor_names(arch: str, n_layers: int):
    """gguf's HF → GGUF tensor name map for an architecture (`.get_name(hf_name, try_suffixes=...)`)."""
    import gguf

    return gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)


def gguf_arch(path: Path) -> str:
    """general.architecture of a GGUF file."""
    import gguf

    field = gguf.GGUFReader(path).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def convert(model_dir: Path, out_file: Path, out_type: str = "F16", name: str | None = None,
            metadata: dict | None = None) -> Path:
    """Write `out_file` (via a temporary name, renamed when complete). Returns it. Model types outside ARCHES go
    through llama.cpp's own converter (llamacpp_convert)."""
    import gguf

    if out_type not in OUT_TYPES:
        raise QuantizeError(f"GGUF out type {out_type!r}; accepted: {', '.join(OUT_TYPES)}")
    config = json.loads((model_dir / "config.json").read_text())
    try:
        check_convertible(config)
    except QuantizeError as exc:
        raise QuantizeError(f"{model_dir}: {exc}") from None
    if config["model_type"] not in ARCHES:
        return llamacpp_convert.convert(model_dir, out_file, out_type, name, metadata)
    arch = ARCHES[config["model_type"]]
    n_layers = config["num_hidden_layers"]
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    partial = out_file.with_name(out_file.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    try:
        _write(writer, model_dir, config, arch, out_type, name, metadata, n_head, n_kv, n_layers)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)  # a failed conversion leaves nothing behind
        raise
    writer.close()
    partial.replace(out_file)
    return out_file


def _write(writer, model_dir: Path, config: dict, arch: str, out_type: str, name: str | None, metadata: dict | None,
           n_head: int, n_kv: int, n_layers: int) -> None:
    import gguf

    names = tensor_names(arch, n_layers)
    writer.add_name(name or model_dir.name)
    writer.add_file_type(ftype(out_type))
    add_hparams(writer, config, arch)
    add_vocab(writer, model_dir, config)
    for key, value in (metadata or {}).items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, str(value))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    factors = rope_freqs(config, head_dim)
    if factors is not None:  # first, as llama.cpp's converter writes its extra tensors
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors,
                          raw_dtype=gguf.GGMLQuantizationType.F32)
    shards = Shards(model_dir)
    tied = tied_embeddings(config)
    for hf_name in shards.names():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise QuantizeError(f"{model_dir}: no GGUF name for tensor {hf_name!r}")
        W = shards.get(hf_name).float()
        if arch in PERMUTES_QK and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            W = permute_qk(W, n_head)  # rows (and a bias's entries) move; columns do not
        elif arch in PERMUTES_QK and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            W = permute_qk(W, n_kv)
        data, kind = encode(W.numpy(), out_type)
        writer.add_tensor(gguf_name, data, raw_dtype=kind)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
