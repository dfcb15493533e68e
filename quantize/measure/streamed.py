"""Evaluation of a checkpoint bigger than memory: its layers streamed from the safetensors shards, one at a time,
over all evaluation chunks at once (the calibration engine's loop, methods/engine.stream_layers).

    ids [chunks, n_ctx] ─embedding─▶ h ─layer 0─▶ h ─layer 1─▶ … ─▶ h ─final norm, lm_head (per chunk)─▶ logits

Peak memory ≈ one decoder layer in float32 + the hidden states of every chunk (chunks × n_ctx × hidden float32)
+ the embedding and the output head while they are used + one chunk's logits (n_ctx × vocab float32), instead of
the whole model. The logits are the model's own (same modules, same rotary tables, float32); the tests compare
them with transformers on the whole model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from quantize.common.errors import QuantizeError
from quantize.formats.compressed_tensors import DequantizedShards
from quantize.methods.engine import check_model, materialize, release, skeleton, stream_layers
from quantize.runtimes.load import detect
from quantize.sources.models import tied_embeddings
from quantize.sources.shards import Shards

LOADER = "quantize's layer-by-layer stream from the shards (float32)"
STREAMABLE = ("dense", "compressed-tensors")  # formats whose tensors the stream can read


def check_stream(config: dict, where: str) -> None:
    """The stream runs the layer-wise engine (its causal attention, windowed where the model's layers are): refuse a
    model type it does not know."""
    try:
        check_model(config)
    except QuantizeError as exc:
        raise QuantizeError(f"{where}: eval.stream: {exc}; use `eval.stream: false`") from None


class StreamedModel:
    """A dense HF checkpoint or a compressed-tensors artefact evaluated layer by layer in float32; `chunk_logits`
    gives every chunk's logits."""

    streamed = True

    def __init__(self, path: Path):
        self.path = Path(path)
        # a compressed-tensors artefact's linears are dequantized as they are read (DequantizedShards)
        packed = detect(self.path) == "compressed-tensors"
        self.shards = DequantizedShards(self.path) if packed else Shards(self.path)
        self.meta = skeleton(self.path)
        self.config = self.meta.config
        self.vocab_size = self.config.vocab_size

    @torch.inference_mode()
    def chunk_logits(self, ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(chunk index, logits [n_ctx, vocab] float32) for ids [chunks, n_ctx], after one streamed pass."""
        config = self.config.to_dict()
        final = {}

        def keep(i, layer, acts):
            final["acts"] = acts  # its hidden states become each layer's output in turn

        for _ in stream_layers(self.path, ids, keep, shards=self.shards):
            pass
        hidden = final["acts"].hidden
        norm = self.meta.model.norm
        materialize(norm, "model.norm.", self.shards)
        head_name = "model.embed_tokens.weight" if tied_embeddings(config) else "lm_head.weight"
        weight = self.shards.get(head_name).float()
        cap = getattr(self.config, "final_logit_softcapping", None)  # Gemma 2's tanh soft-capping
        try:
            for i in range(hidden.shape[0]):
                logits = norm(hidden[i]) @ weight.T
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                yield i, logits
        finally:
            release(norm)
