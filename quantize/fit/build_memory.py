"""The host memory a run will need, estimated from the model's shape before any work (preflight.check_memory), so
a build that cannot fit this machine fails in seconds instead of being killed after an hour.

Peaks per step (bytes; f = 4 for float32; T = calibration samples × seq_len tokens):

    layer-wise build (RTN, GPTQ, AWQ; a GGUF importance matrix)    the engine (methods/engine.py) holds
        one decoder layer in float32                                   layer_params × f
      + its codes until the layer is written (int32 each)              layer_params × 4
      + the solver's copy of the widest linear and its codes           2 × hidden × max(inter, attention) × f
      + the calibration activations                                     T × (2·hidden + widest stage input) × f
        (the layer's input, the residual after attention, the input of the stage in hand; AWQ keeps every group's
        input at once: T × (hidden + attention width + hidden + intermediate) × f)
      + the group's Hessian: its float64 sum, the float32 Gram of a     in² × 4f, in = the widest linear input
        batch (or H), GPTQ's working copy
      + the embedding while the tokens go through it (first layer)     vocab × hidden × f
    whole-model build (INT8)                                            2 × params × f  (the model, its copy)
    evaluation                                                          params × dtype bytes
                                                                        + 4 × n_ctx × vocab × f (logits, log-softmax,
                                                                          the decoded base row, the KLD terms)
    streamed evaluation (eval.stream)                                   the largest of: the embedding or the output
        (measure/streamed.py: one tensor at a time, read in fp16           head read and in float32 (6 × vocab ×
        and converted, every chunk through one layer at a time)            hidden, the head with one chunk's logits
                                                                           as above), one layer in both (6 + 4 per
                                                                           parameter: it and the next one's read)
                                                                        + every chunk's hidden states and one
                                                                          layer's output, batch by batch and then
                                                                          concatenated (3 × chunks × n_ctx × hidden
                                                                          × f) + one batch of 8 chunks' MLP
                                                                          activations (3 × 8 × n_ctx × inter × f)

plus PROCESS_BYTES for the process itself (Python and the libraries, the tokenizer, text and batches). These are estimates, checked against
the builds' measured peak RSS (manifest.json `peak_rss_bytes`) in bench/results/gemma3_270m.md.
"""

from __future__ import annotations

from quantize.fit.shape import ModelShape

F32 = 4
# the pipeline's process before a step: the interpreter and libraries (0.38 GiB measured), the tokenizer, the text,
# the evaluation chunks and calibration batches; Gemma-3-270m's builds measured 0.4-1.0 GiB above the per-step
# terms with 0.5 GiB here (bench/results/gemma3_270m.md)
PROCESS_BYTES = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def layer_params(shape: ModelShape) -> int:
    attention = shape.hidden_size * (shape.query_heads + 2 * shape.n_kv_heads) * shape.head_dim \
        + shape.query_heads * shape.head_dim * shape.hidden_size
    return attention + 3 * shape.hidden_size * shape.intermediate_size


def layer_wise_bytes(shape: ModelShape, samples: int, seq_len: int, awq: bool = False) -> int:
    tokens = samples * seq_len
    attention_width = shape.query_heads * shape.head_dim
    widest = max(shape.hidden_size, attention_width, shape.intermediate_size)
    if awq:
        activations = tokens * (2 * shape.hidden_size + attention_width + shape.intermediate_size + shape.hidden_size)
    else:
        activations = tokens * (2 * shape.hidden_size + widest)
    first_layer = shape.vocab_size * shape.hidden_size  # the embedding, dropped once the tokens are through it
    codes = layer_params(shape)  # int32 per weight (weight_only.build_streamed's `pending`), 4 bytes like float32
    working = 2 * shape.hidden_size * max(shape.intermediate_size, attention_width)  # gptq_quantize's W and Q
    return (layer_params(shape) + codes + working + activations + 4 * widest * widest + first_layer) * F32


def eval_bytes(shape: ModelShape, params: int, dtype: str, n_ctx: int) -> int:
    return params * DTYPE_BYTES[dtype] + 4 * n_ctx * shape.vocab_size * F32


def stream_eval_bytes(shape: ModelShape, chunks: int, n_ctx: int, layer: int | None = None) -> int:
    """`layer`: the largest decoder layer's parameter count (every expert of an MoE layer), else the dense one's."""
    table = shape.vocab_size * shape.hidden_size
    logits = 4 * n_ctx * shape.vocab_size * F32
    hidden = 3 * chunks * n_ctx * shape.hidden_size * F32
    activations = 3 * min(chunks, 8) * n_ctx * shape.intermediate_size * F32
    return max(6 * table + logits, 10 * (layer or layer_params(shape)) + activations) + hidden


# litert-torch's export (torch.export, then the converter) peaks at about 3.3 GB for SmolLM2-135M (issue 35's
# measurement): about 25 bytes per parameter, held by the engine's own process
LITERT_EXPORT_BYTES_PER_PARAM = 25


def build_bytes(method, shape: ModelShape, params: int, samples: int, seq_len: int) -> int:
    """The peak of one method's build, without the process itself."""
    litert = LITERT_EXPORT_BYTES_PER_PARAM * params if getattr(method, "format", None) == "litert" else 0
    if method.name == "litert":
        return litert
    if litert:  # the method's build, then LiteRT's export of its float copy in a process of its own
        return max(litert, build_bytes(method.model_copy(update={"format": "compressed-tensors"}), shape, params,
                                       samples, seq_len))
    if getattr(method, "awq_scales", False):  # GGUF from an AWQ-scaled checkpoint: the AWQ build comes first
        return layer_wise_bytes(shape, samples, seq_len, awq=True)
    if method.layer_wise:
        return layer_wise_bytes(shape, samples if method.needs_calibration else 1, seq_len, method.name == "awq")
    if method.name == "int8":
        return 2 * params * F32
    if method.name == "gguf":  # conversion and llama.cpp's quantiser stream tensors; the importance matrix does not
        return layer_wise_bytes(shape, samples, seq_len) if method.needs_calibration else params * 2
    if method.name == "auto":  # the sensitivity probe: the model in float32, a dequantized copy of its largest
        # tensor per candidate, the slice's logits, base log-probs and one sequence's temporaries
        slice_logits = method.sensitivity_samples * seq_len * shape.vocab_size * F32
        largest = shape.vocab_size * shape.hidden_size * F32
        return max(layer_wise_bytes(shape, samples, seq_len),
                   params * F32 + len(method.candidate_types) * largest + 3 * slice_logits)
    raise AssertionError(f"no memory model for method {method.name}")
