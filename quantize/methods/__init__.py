"""Methods, one module each. A method turns a base model into an artefact folder:

    build(method_config, base, out_dir, calib, calib_info) -> dict  # calib: token ids [samples, seq_len]
                                                        # or None; calib_info: where they came from
    estimate_bytes(method_config, meta_model) -> int     # artefact size from the architecture

The registry is a plain dict from the recipe's method name to that module.
"""

from quantize.methods import awq, gguf, gptq, int8, round

METHODS = {
    "int8": int8,
    "rtn": round,
    "gptq": gptq,
    "awq": awq,
    "gguf": gguf,
}
