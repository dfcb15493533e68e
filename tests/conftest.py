"""Shared fixtures: a tiny Llama built here (layer sizes multiples of 256), and offline hub settings."""

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a failing hub lookup would otherwise retry for ~25 s
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

# The fast loop (`pytest -m fast`, about a minute here): the unit-level modules (recipe, fit, footprint, the KLD
# base, the house rules, the architecture table, compare, GPTQ/RTN maths on tiny models, the scorecard, CPU memory)
FAST_MODULES = {"test_recipe", "test_fit", "test_footprint", "test_kld_base", "test_layers", "test_architectures",
                "test_compare", "test_gptq", "test_rtn", "test_scorecard", "test_cpu_memory"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in FAST_MODULES:
            item.add_marker(pytest.mark.fast)


def build_tiny_llama(folder: Path, vocab_size: int = 512, seed: int = 0, model_type: str = "llama",
                     dtype: str = "float16", **config_overrides) -> Path:
    """A randomly initialised Llama (hidden 256, MLP 512, 2 layers, GQA 4/2 heads, unless overridden; another
    family's layout with `model_type`) with a BPE tokenizer trained on the bundled calibration text, saved as an
    HF checkpoint in `dtype`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from quantize.sources.texts import bundled_wiki

    text = bundled_wiki("calibration").text
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text[i : i + 10000] for i in range(0, len(text), 10000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")  # what serving a chat needs
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2,
                                  **{"tie_word_embeddings": False, **shape, **config_overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    for name, buffer in model.named_buffers():  # a checkpoint's router bias (GLM-4 MoE, DeepSeek-V3): not zero
        if name.endswith("e_score_correction_bias"):
            buffer.normal_(0, 0.05)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def build_outlier_llama(folder: Path, factor: float = 30.0) -> Path:
    """The tiny Llama (float32) with a few activation outlier channels, as trained LLMs have them (SmoothQuant's
    Fig. 4): four channels of every norm's weight × `factor`, so the norms' outputs (the q/k/v and gate/up inputs)
    carry them. What W8A8's per-token activation grid and SmoothQuant are about; a random model has none."""
    from quantize.sources.models import load_model

    build_tiny_llama(folder, dtype="float32")
    model = load_model(folder, "float32")
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight"):
            p.data[[3, 70, 130, 200]] *= factor
    model.save_pretrained(folder)
    return folder


def f32_gguf_logits(model_dir: Path, gguf_path: Path, n_tokens: int = 200):
    """(token ids, llama.cpp's logits [n, vocab] with an F32 KV cache) of held-out text, tokenised by the model's
    HF tokenizer, for comparing a converted GGUF with transformers."""
    from quantize.runtimes.llamacpp import LlamaCppModel
    from quantize.sources.models import load_tokenizer
    from quantize.sources.texts import bundled_wiki

    text = bundled_wiki("eval").text[:4000]
    ids = load_tokenizer(model_dir)(text, add_special_tokens=False).input_ids[:n_tokens]
    model = LlamaCppModel(gguf_path, n_ctx=256, kv_type="F32")
    try:
        return ids, model.logits(ids)
    finally:
        model.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def write_recipe(path: Path, model: str, methods: list[dict], output: Path, **overrides) -> Path:
    """A fast recipe: few short chunks, two speed repetitions, one thread, no serve check unless `eval` asks."""
    recipe = {
        "name": output.name,
        "model": model,
        "methods": methods,
        "eval": {
            "perplexity": {"source": "bundled:wiki", "n_ctx": 128, "max_chunks": 4},
            "speed": {"prompt_tokens": 16, "gen_tokens": 4, "repetitions": 2, "threads": [1]},
        },
        "fit": {"gpus": ["RTX 4090", "H100 SXM"], "contexts": [4096], "kv_dtype": "f16"},
        "output": str(output),
    }
    recipe.update(overrides)
    recipe["eval"] = {"serve": {"enabled": False}, **recipe["eval"]}  # servers only in the tests that ask for them
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path
