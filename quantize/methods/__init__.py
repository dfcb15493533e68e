"""Methods, one module each. A method turns a base model into an artefact folder:

    build(method_config, base: BaseModel, out_dir: Path) -> dict   # what it did, for the manifest
    estimate_bytes(method_config, meta_model) -> int               # artefact size from the architecture

The registry is a plain dict from the recipe's method name to that module.
"""

from quantize.methods import int8

METHODS = {
    "int8": int8,
}
