"""The bad-input corpus: every mistake a user can make in a recipe, on the command line or on disk ends in one
message that names where the mistake is (file, key) and what is accepted, exit code 2, no traceback, and nothing
written. Run through the command line's own entry (typer's runner, in process)."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from quantize.cli import app

GOOD = {"name": "r", "method": {"name": "rtn", "bits": 4, "group_size": 64},
        "eval": {"perplexity": {"n_ctx": 64, "max_chunks": 1}, "speed": {"enabled": False}},
        "fit": {"gpus": ["RTX 4090"], "contexts": [4096]}}


def with_(path: str, value):
    """GOOD with one dotted key set (or removed when value is DELETE)."""
    data = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    target = data
    for p in parents:
        target = target.setdefault(p, {})
    if value is DELETE:
        target.pop(last, None)
    else:
        target[last] = value
    return data


DELETE = object()

# id: (recipe mapping or raw text, command, extra arguments, fragments the message must hold)
CORPUS = {
    "not a mapping": ("- a\n- b\n", "plan", [], ["a recipe is a YAML mapping", "got list"]),
    "invalid yaml": ("name: [unclosed\n", "plan", [], ["not valid YAML"]),
    "unknown top-level key": (with_("colour", "red"), "plan", [], ["colour: unknown key"]),
    "missing name": (with_("name", DELETE), "plan", [], ["name: Field required"]),
    "bad name": (with_("name", "../x"), "plan", [], ["name:", "pattern"]),
    "missing model": ("name: r\nmethod: {name: int8}\n", "plan", [], ["model: Field required"]),
    "unknown method": (with_("method", {"name": "gptqq"}), "plan", [], ["unknown method 'gptqq'", "accepted: int8"]),
    "method without name": (with_("method", {"bits": 4}), "plan", [], ["missing `name`", "accepted method names"]),
    "method and methods": (with_("methods", [{"name": "int8"}]), "plan", [], ["either `method` or `methods`"]),
    "no methods": ({**with_("method", DELETE), "methods": []}, "plan", [], ["methods:", "at least 1"]),
    "bits": (with_("method.bits", 5), "plan", [], ["method.bits: got 5", "2, 3, 4 or 8"]),
    "group size": (with_("method.group_size", 100), "plan", [], ["method.group_size: got 100", "128"]),
    "on_indivisible": (with_("method.on_indivisible", "skip"), "plan", [], ["method.on_indivisible", "'channel'"]),
    "classic bits": (with_("method", {"name": "gptq", "bits": 3, "format": "gptq"}), "plan", [],
                     ["format 'gptq' packs bits [2, 4, 8], got bits 3"]),
    "awq layout bits": (with_("method", {"name": "awq", "bits": 8, "format": "awq"}), "plan", [],
                        ["format 'awq' packs bits [4]"]),
    "gguf type": (with_("method", {"name": "gguf", "type": "Q9_K"}), "plan", [], ["method.type: got 'Q9_K'", "Q4_K_M"]),
    "gguf ternary": (with_("method", {"name": "gguf", "type": "TQ1_0"}), "plan", [],
                     ["type TQ1_0", "only for models trained ternary"]),
    "gguf 1-bit": (with_("method", {"name": "gguf", "type": "Q1_0"}), "plan", [],
                   ["type Q1_0", "only for models trained with 1-bit weights"]),
    "gguf nvfp4": (with_("method", {"name": "gguf", "type": "NVFP4"}), "plan", [],
                   ["type NVFP4", "invalid output file type 39"]),
    "kv cache type": (with_("eval.kv_cache", ["q3"]), "plan", [], ["eval.kv_cache", "'q8_0'"]),
    "gguf f16 imatrix": (with_("method", {"name": "gguf", "type": "F16", "imatrix": True}), "plan", [],
                         ["type F16 is not quantized"]),
    "int8 scheme": (with_("method", {"name": "int8", "scheme": "w4a16"}), "plan", [], ["method.scheme", "w8a16"]),
    "gptq damp": (with_("method", {"name": "gptq", "damp": 2}), "plan", [], ["method.damp", "less than 1"]),
    "gptq device": (with_("method", {"name": "gptq", "device": "gpu"}), "plan", [],
                    ["method.device: unknown device 'gpu'", "auto, cpu, cuda, cuda:N"]),
    "gptq forward dtype": (with_("method", {"name": "gptq", "forward_dtype": "float16"}), "plan", [],
                           ["method.forward_dtype", "bfloat16"]),
    "duplicate variants": ({**with_("method", DELETE), "methods": [{"name": "int8"}, {"name": "int8"}]}, "plan", [],
                           ["variant names must be unique", "int8-w8a16"]),
    "calibration samples": (with_("calibration", {"samples": 0}), "plan", [], ["calibration.samples", "greater than"]),
    "calibration seq_len": (with_("calibration", {"seq_len": 8}), "plan", [], ["calibration.seq_len"]),
    "perplexity n_ctx": (with_("eval.perplexity.n_ctx", 8), "plan", [], ["eval.perplexity.n_ctx"]),
    "max_chunks": (with_("eval.perplexity.max_chunks", 0), "plan", [], ["eval.perplexity.max_chunks"]),
    "speed threads": (with_("eval.speed", {"threads": []}), "plan", [], ["eval.speed.threads"]),
    "eval dtype": (with_("eval.dtype", "int8"), "plan", [], ["eval.dtype: got 'int8'", "float32"]),
    "unknown gpu": (with_("fit.gpus", ["RTX 9999"]), "plan", [], ["fit.gpus", "unknown GPU 'RTX 9999'", "RTX 4090"]),
    "ambiguous gpu": (with_("fit.gpus", ["A100"]), "plan", [], ["ambiguous GPU 'A100'"]),
    "kv dtype": (with_("fit.kv_dtype", "q3"), "plan", [], ["fit.kv_dtype", "unknown kv dtype 'q3'", "q8_0"]),
    "no contexts": (with_("fit.contexts", []), "plan", [], ["fit.contexts"]),
    "batch": (with_("fit.batch", 0), "plan", [], ["fit.batch"]),
    "gate kld": (with_("gates", {"max_kld": -1}), "plan", [], ["gates.max_kld"]),
    "gate same top": (with_("gates", {"min_same_top": 2}), "plan", [], ["gates.min_same_top"]),
    "gate gpu": (with_("gates", {"must_fit": [{"gpu": "RTX 9999", "context": 4096}]}), "plan", [],
                 ["gates.must_fit[0].gpu", "unknown GPU"]),
    "gate not measured": (with_("gates", {"min_tg_tps": 5}), "plan", [], ["gates.min_tg_tps needs"]),
    "model path": (with_("model", "./no/such/model"), "plan", [], ["key `model`", "no such file or directory",
                                                                   "accepted: bundled:smollm2-135m"]),
    "model dir without config": (with_("model", "EMPTY_DIR"), "plan", [], ["key `model`", "has no config.json"]),
    "missing gguf": (with_("model", "missing.gguf"), "plan", [], ["key `model`", "no such GGUF file"]),
    "unknown bundled model": (with_("model", "bundled:llama-7b"), "plan", [],
                              ["unknown bundled model 'llama-7b'", "bundled:smollm2-135m"]),
    "offline hub id": (with_("model", "someone/not-cached"), "plan", [], ["'someone/not-cached'", "HF_HUB_OFFLINE=1",
                                                                        "--set model=DIR"]),
    "text file missing": (with_("eval.perplexity.source", "nowhere.txt"), "run", [],
                          ["text source nowhere.txt: no such file", ".txt/.jsonl/.parquet"]),
    "text file type": (with_("eval.perplexity.source", "TEXT_CSV"), "run", [], ["unsupported file type '.csv'"]),
    "unknown bundled text": ({**with_("calibration", {"source": "bundled:books"}),
                              "method": {"name": "gptq", "bits": 4, "group_size": 64}}, "run", [],
                             ["unknown bundled text 'bundled:books'", "bundled:wiki"]),
    "hub text offline": (with_("eval.perplexity.source", "hf:wikitext:wikitext-2-raw-v1"), "run", [],
                         ["hub dataset 'wikitext'", "HF_HUB_OFFLINE=1 is set", "bundled:wiki"]),
    "text too short": (with_("eval.perplexity.source", "TEXT_SHORT"), "run", [], ["less than one chunk of n_ctx=64"]),
    "output exists": (with_("output", "EXISTING"), "run", [], ["already exists", "pass --force"]),
    "set malformed": (GOOD, "plan", ["--set", "eval.speed"], ["expected KEY=VALUE"]),
    "set unknown key": (GOOD, "plan", ["--set", "eval.sped.enabled=false"], ["eval.sped: unknown key"]),
    "set not a mapping": (GOOD, "plan", ["--set", "name.x=1"], ["`name` is a value, not a mapping"]),
    "gate malformed": (GOOD, "run", ["--gate", "max_kld=lots"], ["gates.max_kld", "valid number"]),
    "missing recipe file": (None, "plan", [], ["no such recipe file", "bundled recipes: gemma3-270m, llama3-int4"]),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_bad_input_is_one_clear_message_and_exit_2(case, tiny_model, tmp_path, monkeypatch):
    recipe, command, extra, fragments = CORPUS[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY_DIR").mkdir()
    (tmp_path / "TEXT_CSV.csv").write_text("a,b\n")
    (tmp_path / "TEXT_SHORT.txt").write_text("Too short.")
    (tmp_path / "EXISTING").mkdir()
    if isinstance(recipe, dict):
        recipe = json.loads(json.dumps(recipe).replace('"TEXT_CSV"', '"TEXT_CSV.csv"')
                            .replace('"TEXT_SHORT"', '"TEXT_SHORT.txt"'))
        recipe.setdefault("model", str(tiny_model))
        recipe.setdefault("output", str(tmp_path / "out"))
        recipe = yaml.safe_dump(recipe)
    if recipe is not None:
        (tmp_path / "recipe.yaml").write_text(recipe)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, [command, "recipe.yaml", *extra])
    output = result.output
    message = output[output.find("error: "):]  # `run` prints its first steps before it stops
    print(f"{case}: {message.strip()}")
    assert result.exit_code == 2, (case, result.exit_code, output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in output
    assert message.startswith("error: recipe.yaml") and len(message.splitlines()) < 15
    for fragment in fragments:
        assert fragment in message, (case, fragment, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


# the review's command-line cases (issue 33 §5): (arguments, fragments the message must hold); ARGS is the folder
COMMANDS = {
    "fit on a config.json without model_type": (["fit", "NO_TYPE/config.json"],
                                                ["NO_TYPE/config.json", "no `model_type` key", "known model types"]),
    "fit with a negative context": (["fit", "LLAMA", "--ctx", "-5"], ["--ctx -5", "at least 1"]),
    "eval of a path that does not exist": (["eval", "NOWHERE"], ["NOWHERE: no such file or directory"]),
    "a binary recipe": (["plan", "BINARY.yaml"], ["BINARY.yaml: not UTF-8 text", "expected a YAML recipe"]),
    "a config.json that is not JSON": (["fit", "BAD_JSON"], ["BAD_JSON/config.json: not valid JSON (line 1, column 2",
                                                            "expected a Hugging Face config.json"]),
    "a model whose config.json is not JSON": (["plan", "BAD_MODEL.yaml"], ["key `model`", "not valid JSON"]),
    "a calibration text that is not UTF-8": (["run", "LATIN1.yaml"], ["LATIN1.txt: not UTF-8 text", "iconv"]),
    # review §5: a truncated model.safetensors and a corrupt GGUF, in every command that takes them
    "fit on a truncated safetensors": (["fit", "TRUNC"], ["TRUNC/model.safetensors: truncated: its tensors need"]),
    "eval of a truncated safetensors": (["eval", "TRUNC"], ["TRUNC/model.safetensors: truncated"]),
    "run of a truncated safetensors": (["run", "TRUNC.yaml"], ["key `model`", "TRUNC/model.safetensors: truncated"]),
    "fit on a corrupt GGUF": (["fit", "CORRUPT.gguf"], ["CORRUPT.gguf: not a readable GGUF file"]),
    "eval of a corrupt GGUF": (["eval", "CORRUPT.gguf"], ["CORRUPT.gguf: not a readable GGUF file"]),
    "a corrupt GGUF as the model": (["plan", "CORRUPT.yaml"], ["key `model`", "CORRUPT.gguf: not a readable GGUF"]),
    # review §2: a --gate error names the --gate the user typed, not `--set gates.…`
    "a --gate without a value": (["run", "TINY.yaml", "--gate", "nonsense"], ["--gate 'nonsense'", "e.g. --gate"]),
    "a --gate with a bad value": (["run", "TINY.yaml", "--gate", "max_kld=abc"],
                                  ["with --gate max_kld=abc", "gates.max_kld"]),
}


@pytest.mark.parametrize("case", list(COMMANDS))
def test_bad_command_line_is_one_clear_message_and_exit_2(case, tiny_model, tmp_path, monkeypatch):
    from pathlib import Path

    args, fragments = COMMANDS[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NO_TYPE").mkdir()
    (tmp_path / "NO_TYPE" / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2}))
    (tmp_path / "BINARY.yaml").write_bytes(bytes(range(128, 256)) * 2)
    (tmp_path / "BAD_JSON").mkdir()
    (tmp_path / "BAD_JSON" / "config.json").write_text("{not json")
    (tmp_path / "BAD_MODEL.yaml").write_text(yaml.safe_dump({**GOOD, "model": "BAD_JSON"}))
    (tmp_path / "LATIN1.txt").write_bytes("café au lait, crème brûlée. ".encode("latin-1") * 400)
    (tmp_path / "LATIN1.yaml").write_text(yaml.safe_dump({
        **GOOD, "model": str(tiny_model), "method": {"name": "gptq", "bits": 4, "group_size": 64},
        "calibration": {"source": "LATIN1.txt", "samples": 2, "seq_len": 32}}))
    import shutil

    shutil.copytree(tiny_model, tmp_path / "TRUNC")
    weights = tmp_path / "TRUNC" / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)  # an interrupted download
    (tmp_path / "TRUNC.yaml").write_text(yaml.safe_dump({**GOOD, "model": "TRUNC"}))
    (tmp_path / "CORRUPT.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(7))
    (tmp_path / "CORRUPT.yaml").write_text(yaml.safe_dump({**GOOD, "model": "CORRUPT.gguf"}))
    (tmp_path / "TINY.yaml").write_text(yaml.safe_dump({**GOOD, "model": str(tiny_model)}))
    before = sorted(p.name for p in tmp_path.iterdir())
    llama = Path(__file__).parent / "data" / "configs" / "llama-3-8b.json"
    args = [str(llama) if a == "LLAMA" else a for a in args]
    result = CliRunner().invoke(app, args)
    message = result.output[result.output.find("error: "):]
    print(f"{case}: {message.strip()}")
    assert result.exit_code == 2 and "Traceback" not in result.output, (case, result.output, result.exception)
    for fragment in fragments:
        assert fragment in message, (case, fragment, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_the_gguf_check_reads_the_layout_gguf_py_reads_and_refuses_a_cut_file(tmp_path):
    """check_gguf parses the header itself (GGUFReader builds an object per vocabulary entry: ~14 s for Gemma 3):
    the bundled SmolLM2 GGUF's tensor table equals gguf-py's, and the file cut inside its last tensor is refused."""
    import gguf

    from quantize.common.errors import QuantizeError
    from quantize.common.files import check_gguf, gguf_tensor_extents
    from quantize.sources.models import bundled_gguf

    path = bundled_gguf("smollm2-135m")
    ours = gguf_tensor_extents(path)
    theirs = {t.name: (int(t.tensor_type), int(t.data_offset), int(t.n_bytes)) for t in gguf.GGUFReader(path).tensors}
    assert ours == theirs and len(ours) > 100
    cut = tmp_path / "cut.gguf"
    with open(path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(path.stat().st_size - 1000))
    with pytest.raises(QuantizeError, match=r"cut.gguf: not a readable GGUF file \(ValueError: tensor .* past the file"):
        check_gguf(cut)
