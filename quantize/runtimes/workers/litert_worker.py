"""LiteRT worker, run with the managed LiteRT environment's interpreter (runtimes/engines.py), never imported by
quantize. It reads one request (JSON) and does one action:

  export    a Hugging Face folder → a float `model.tflite` (litert-torch's export_hf: `prefill_<P>` and `decode`
            signatures, the KV cache threaded by the caller, `cache_length` cells); quantized in the same process
            and bundled as a .litertlm when the request says how (as for quantize)
  quantize  a float `model.tflite` → a quantized one with ai-edge-quantizer, either with one of its own recipes
            (`recipe`: e.g. dynamic_wi4b32_afp32, its round-to-nearest; `linears_only`: on the FULLY_CONNECTED
            ops but the logits head) or with our integer codes (`codes`: a
            safetensors file of `<name>.codes` int8 [out, in] and `<name>.scale` float32 [out, in / block]): every
            FULLY_CONNECTED whose float weight equals codes × scale bit for bit gets exactly those codes and scales
            (ai-edge-quantizer's blockwise INT4 or channelwise INT8 layout), every other one stays float; the written
            file is then read back and each quantized weight dequantized and compared with ours
  generate  a .litertlm bundle → a greedy chat answer from LiteRT-LM's engine (the run's smoke test: LiteRT has
            no OpenAI-compatible server)
  score     a .tflite + token ids [chunks, n] → each chunk's log-probabilities [n, vocab] (chunk_<i>.npy), through
            the `decode` signature, one token per call, teacher-forced: the signature the runtime samples from

The exporter imports `tensorflow.lite.python.schema_py_generated` although TensorFlow is not a dependency;
ai-edge-litert ships the same module, and the stand-in `tensorflow` packages need a module spec or torch dynamo's
trace rules fail on them.
"""

import hashlib
import importlib.machinery
import json
import sys
import time
import types
from pathlib import Path

import numpy as np


def tensorflow_stand_in():
    import ai_edge_litert.schema_py_generated as schema

    for name in ("tensorflow", "tensorflow.lite", "tensorflow.lite.python"):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            module.__path__ = []
            sys.modules[name] = module
    sys.modules.setdefault("tensorflow.lite.python.schema_py_generated", schema)


def export(request: dict) -> dict:
    """litert-torch's export of the float folder; with `codes` or `recipe`, quantized in the same process (the
    exporter's own quantization step, given our recipe as a JSON file) and bundled as a .litertlm (LiteRT-LM's
    file: the quantized model, the tokenizer, the chat template) next to model_quantized.tflite."""
    tensorflow_stand_in()
    from litert_torch.generative.export_hf import export as export_hf

    start, answer, out = time.time(), {}, Path(request["out"])
    out.mkdir(parents=True, exist_ok=True)
    recipe_file = "none"
    if request.get("codes") or request.get("recipe"):
        recipe, answer, finish = recipe_for(request)
        recipe_file = str(out / "recipe.json")
        Path(recipe_file).write_text(json.dumps(recipe))
    export_hf.export(model=request["model"], output_dir=str(out), prefill_lengths=[request["prefill_length"]],
                     cache_length=request["cache_length"], quantization_recipe=recipe_file,
                     bundle_litert_lm=recipe_file != "none", keep_temporary_files=True)
    answer["seconds"] = round(time.time() - start, 1)
    if recipe_file == "none":
        return answer
    bundles = sorted(out.glob("*.litertlm"))
    answer["bundle"] = str(bundles[0]) if bundles else None
    return {**answer, **finish(str(out / "model_quantized.tflite"))}


def digest(values: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()


def read_codes(path: str) -> dict[str, dict]:
    """{digest of codes × scale in float32: {name, codes, scale, block}} for every linear of the codes file."""
    from safetensors.numpy import load_file

    tensors = load_file(path)
    table = {}
    for key in tensors:
        if not key.endswith(".codes"):
            continue
        name = key[: -len(".codes")]
        codes, scale = tensors[key].astype(np.int8), tensors[f"{name}.scale"].astype(np.float32)
        block = codes.shape[1] // scale.shape[1]
        dense = codes.astype(np.float32) * np.repeat(scale, block, axis=1)
        table[digest(dense)] = {"name": name, "codes": codes, "scale": scale, "block": block}
    return table


def codes_algorithm(table: dict, used: set):
    """ai-edge-quantizer's `dequantized_weight_recovery` for FULLY_CONNECTED, re-registered in this process: its
    min/max parameters with the scales and quantized data replaced by ours wherever the float weight is one of ours
    (its own recovery guesses each block's scale from the smallest gap between values, which fails on blocks that
    do not use two adjacent codes); every other weight stays float. Its algorithm names are a closed enum, so ours
    takes that name rather than a new one."""
    import dataclasses

    from ai_edge_quantizer import algorithm_manager as am
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithms.uniform_quantize import common_quantize, naive_min_max_quantize as naive
    from ai_edge_quantizer.algorithms.utils import common_utils

    def params(op_info, tensor_config, tensor_content=None, tensor_qsv=None):
        stock = naive.get_tensor_quant_params(op_info, tensor_config, tensor_content, tensor_qsv)
        if tensor_content is None:
            return stock
        ours = table[digest(tensor_content)]
        used.add(ours["name"])
        assert stock.quantized_data.shape == ours["codes"].shape, (stock.quantized_data.shape, ours["codes"].shape)
        scale = ours["scale"].reshape(np.shape(stock.scale))
        return dataclasses.replace(stock, scale=scale, zero_point=np.zeros(np.shape(stock.scale), np.int32),
                                   quantized_data=ours["codes"].astype(stock.quantized_data.dtype))

    def materialize(op_info, graph_info, tensor_name_to_qsv, tensor_quant_params_cache):
        weight = graph_info.subgraph_tensors[op_info.op.inputs[1]]
        data = graph_info.buffers[weight.buffer].data
        content = np.frombuffer(bytes(data), np.float32) if data is not None and len(data) else None
        if content is not None and digest(content) in table:
            return common_quantize.materialize_fc_conv(params, op_info, graph_info, tensor_name_to_qsv,
                                                       tensor_quant_params_cache)
        ignore = [i for i in (1, 2) if i < len(op_info.op.inputs)]  # not ours: the weight (and bias) stay float
        return common_utils.materialize_standard_op(op_info, graph_info, tensor_name_to_qsv, params,
                                                    tensor_quant_params_cache, inputs_to_ignore=ignore)

    key = am.AlgorithmName.DEQUANTIZED_WEIGHT_RECOVERY
    am.register_quantized_op(key, qtyping.TFLOperationName.FULLY_CONNECTED, init_qsv_func=naive.init_qsvs,
                             calibration_func=naive.min_max_calibrate, materialize_func=materialize)
    return key


def recipe_for(request: dict):
    """(ai-edge-quantizer recipe, facts, finish): a named recipe of its own (`recipe`, on every op it names or on
    the linears but the logits head), or ours (`codes`: the re-registered recovery algorithm on FULLY_CONNECTED,
    dynamic range or, `weight_only`, dequantized in the graph). `finish(path)` reads the written file back."""
    from ai_edge_quantizer import recipe as recipes

    if request.get("recipe"):
        recipe = getattr(recipes, request["recipe"])()
        if request.get("linears_only"):  # the linears ours quantize: no embedding table, no logits head
            recipe = [{**entry, "operation": "FULLY_CONNECTED"} for entry in recipe]
            recipe.append({"regex": "logits", "operation": "FULLY_CONNECTED", "algorithm_key": "no_quantize"})
        return recipe, {}, memory
    table, used = read_codes(request["codes"]), set()
    blocks = {"CHANNELWISE" if entry["scale"].shape[1] == 1 else f"BLOCKWISE_{entry['block']}"
              for entry in table.values()}
    assert len(blocks) == 1, f"one granularity per file, got {sorted(blocks)}"
    granularity, weight_only = blocks.pop(), bool(request.get("weight_only"))
    key = codes_algorithm(table, used)
    recipe = [{"regex": ".*", "operation": "FULLY_CONNECTED", "algorithm_key": key,
               "op_config": {"weight_tensor_config": {"num_bits": int(request["bits"]), "symmetric": True,
                                                      "granularity": granularity, "dtype": "INT"},
                             # dynamic range (int8 activations at run time), or the weights dequantized in the
                             # graph and a float matmul
                             "compute_precision": "FLOAT" if weight_only else "INTEGER",
                             "explicit_dequantize": weight_only, "skip_checks": False, "min_weight_elements": 0}}]

    def finish(path: str) -> dict:
        missing = sorted(entry["name"] for entry in table.values() if entry["name"] not in used)
        return {"replaced": len(used), "missing": missing, "check": check(path, table), **memory(path)}

    return recipe, {"granularity": granularity}, finish


def quantize(request: dict) -> dict:
    """A float .tflite quantized again (seconds, not an export): `recipe` or `codes` as for export."""
    from ai_edge_quantizer import quantizer

    start = time.time()
    recipe, answer, finish = recipe_for(request)
    q = quantizer.Quantizer(request["model"])
    q.load_quantization_recipe(recipe)
    q.quantize().export_model(request["out"], overwrite=True)
    return {**answer, "seconds": round(time.time() - start, 1), **finish(request["out"])}


def memory(path: str) -> dict:
    """The file's constant tensors' bytes by tensor type (each buffer once) and the KV cache the decode signature
    threads (its kv_cache_* inputs): what the model holds in memory on the device besides activations."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(path)
    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    by_type, seen = {}, set()
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            data = model.buffers[tensor.buffer].data if tensor.buffer else None
            if data is None or len(data) == 0 or tensor.buffer in seen:
                continue
            seen.add(tensor.buffer)
            kind = names.get(tensor.type, str(tensor.type))
            by_type[kind] = by_type.get(kind, 0) + len(data)
    details = Interpreter(model_path=path).get_signature_runner("decode").get_input_details()
    kv = sum(int(np.prod(v["shape"])) * np.dtype(v["dtype"]).itemsize for k, v in details.items()
             if k.startswith("kv_cache"))
    return {"bytes_by_type": by_type, "kv_cache_bytes": kv}


def check(path: str, table: dict) -> dict:
    """Every quantized FULLY_CONNECTED weight of the written file, dequantized (codes × scale as the file holds them)
    and looked up among ours: how many equal one of ours bit for bit, how many do not."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(path)
    fc, dequantize = schema.BuiltinOperator.FULLY_CONNECTED, schema.BuiltinOperator.DEQUANTIZE
    opcode = lambda op: max(model.operatorCodes[op.opcodeIndex].builtinCode,  # noqa: E731
                            model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)
    equal, differ, seen = 0, [], set()
    for graph in model.subgraphs:
        # weight-only files: the FULLY_CONNECTED reads a DEQUANTIZE's float output; its input holds the codes
        dequantized = {op.outputs[0]: op.inputs[0] for op in graph.operators if opcode(op) == dequantize}
        for op in graph.operators:
            if opcode(op) != fc:
                continue
            tensor = graph.tensors[dequantized.get(op.inputs[1], op.inputs[1])]
            if tensor.type not in (schema.TensorType.INT4, schema.TensorType.INT8) or tensor.buffer in seen:
                continue
            seen.add(tensor.buffer)
            raw = np.frombuffer(bytes(model.buffers[tensor.buffer].data), np.uint8)
            rows, cols = (int(d) for d in tensor.shape)
            if tensor.type == schema.TensorType.INT4:  # two codes per byte, the first in the low nibble
                nibbles = np.stack([raw & 0xF, raw >> 4], axis=1).reshape(-1)[: rows * cols].astype(np.int8)
                codes = np.where(nibbles > 7, nibbles - 16, nibbles).reshape(rows, cols)
            else:
                codes = raw.view(np.int8).reshape(rows, cols)
            details = tensor.quantization.details
            if details is not None and hasattr(details, "blockSize"):  # BlockwiseQuantization: fp16 scales tensor
                scales_tensor = graph.tensors[details.scales]
                scale = np.frombuffer(bytes(model.buffers[scales_tensor.buffer].data), np.float16).astype(np.float32)
                scale = np.repeat(scale.reshape(rows, -1), int(details.blockSize), axis=1)
            else:
                scale = np.asarray(tensor.quantization.scale, np.float32).reshape(rows, 1)
            if digest(codes.astype(np.float32) * scale) in table:
                equal += 1
            else:
                differ.append(tensor.name.decode()[-80:] if isinstance(tensor.name, bytes) else str(tensor.name))
    return {"equal": equal, "differ": differ}


def score(request: dict) -> dict:
    """Teacher-forced decode over each chunk from an empty cache. The signature runner's call resizes and
    re-allocates every tensor on each call (42 ms a token for SmolLM2); after one call allocates them, the
    interpreter's own tensor views are written and read in place (17 ms, the same logits bit for bit): ai-edge-litert
    2.3.0's SignatureRunner keeps its wrapper, subgraph and tensor indices in these attributes."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=request["model"], num_threads=int(request.get("threads", 2)))
    decode = interpreter.get_signature_runner("decode")
    details = decode.get_input_details()
    cache = int(details["mask"]["shape"][-1])
    ids = np.load(request["ids"])
    assert ids.shape[1] <= cache, f"chunks of {ids.shape[1]} tokens need a cache of as many cells; it has {cache}"
    decode(**{k: np.zeros(v["shape"], v["dtype"]) for k, v in details.items()})  # allocates the tensors once
    wrapper, graph = decode._interpreter_wrapper, decode._subgraph_index
    inputs, outputs = decode._inputs, dict(decode._outputs)
    view = lambda index: wrapper.tensor(wrapper, index, graph)  # noqa: E731  a numpy view, valid until invoke
    kv_names = [k for k in details if k.startswith("kv_cache")]
    out = Path(request["out"])
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for i, chunk in enumerate(ids):
        for k in kv_names:
            view(inputs[k])[...] = 0
        mask = np.full((1, 1, 1, cache), np.finfo(np.float32).min, np.float32)
        rows = None
        for t, token in enumerate(chunk):
            mask[..., t] = 0.0  # position t attends to positions 0 … t
            view(inputs["tokens"])[...] = token
            view(inputs["input_pos"])[...] = t
            view(inputs["mask"])[...] = mask
            wrapper.Invoke(graph)
            for k in kv_names:  # the updated cache becomes the next call's cache
                np.copyto(view(inputs[k]), view(outputs[k]))
            logits = view(outputs["logits"]).reshape(-1).astype(np.float64)
            if rows is None:
                rows = np.empty((len(chunk), logits.shape[0]), np.float32)
            top = logits.max()
            rows[t] = logits - (top + np.log(np.exp(logits - top).sum()))
        np.save(out / f"chunk_{i}.npy", rows)
    seconds = time.time() - start
    return {"seconds": round(seconds, 1), "tokens": int(ids.size), "ms_per_token": round(1000 * seconds / ids.size, 2),
            "cache_length": cache, "threads": int(request.get("threads", 2))}


def generate(request: dict) -> dict:
    """A greedy chat answer from the .litertlm bundle on LiteRT-LM's CPU engine. The prompt is rendered with the
    model's own Hugging Face chat template (as every other engine of the serve check applies it) and fed to a
    LiteRT-LM session without its template: LiteRT-LM's template engine hands a message's content over as a list of
    parts, on which templates that concatenate `message['content']` (SmolLM2's) fail ("tried to use + operator on
    unsupported types string and sequence")."""
    import tempfile

    import litert_lm
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(request["tokenizer"])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": request["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    with tempfile.TemporaryDirectory() as cache:  # the engine writes its caches there; it must exist
        start = time.time()
        engine = litert_lm.Engine(request["model"], backend=litert_lm.Backend.CPU(), cache_dir=cache)
        loaded = time.time()
        session = engine.create_session(apply_prompt_template=False, sampler_config=litert_lm.SamplerConfig(top_k=1),
                                        max_output_tokens=int(request["max_tokens"]))
        session.run_prefill([prompt])
        text = "".join(session.run_decode().texts)
        done = time.time()
        session.close()
        engine.close()
    return {"answer": text, "load_s": round(loaded - start, 2), "answer_s": round(done - loaded, 2)}


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    answer = {"export": export, "quantize": quantize, "score": score, "generate": generate}[request["action"]](request)
    Path(request["answer"]).write_text(json.dumps(answer))


if __name__ == "__main__":
    main()
