"""The last mile to Ollama and LM Studio: the Modelfile's TEMPLATE rendered by Go's own text/template (the engine
Ollama renders with) equals transformers' rendering of the model's real Jinja chat template; the GGUF carries the
`general.*` metadata LM Studio shows, through llama.cpp's quantiser."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, write_recipe
from quantize import pipeline
from quantize.formats import ollama
from quantize.recipe import load_recipe

GO = shutil.which("go")
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [{"role": "system", "content": "You answer in one word."},
               {"role": "user", "content": "What is the capital of France?"}],
    "three turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Name a colour."}],
}
# real chat templates from llama.cpp's models/templates (its sdist), by family; SmolLM2's own from the bundled model
TEMPLATES = {
    "Qwen-Qwen2.5-7B-Instruct.jinja": "chatml",
    "Qwen-Qwen3-0.6B.jinja": "chatml",
    "meta-llama-Llama-3.1-8B-Instruct.jinja": "llama3.1",
    "meta-llama-Llama-3.3-70B-Instruct.jinja": "llama3.1",
    "microsoft-Phi-3.5-mini-instruct.jinja": "phi3",
    "google-gemma-2-2b-it.jinja": "gemma",
}
NO_SYSTEM_ROLE = {"google-gemma-2-2b-it.jinja"}  # its template raises on a system message


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    if GO is None:
        pytest.skip("Go is not installed (apt-get install golang-go): the TEMPLATE check needs text/template")
    folder = tmp_path_factory.mktemp("go")
    shutil.copy(REPO / "tests" / "data" / "ollama_template.go", folder / "main.go")
    env = {"HOME": str(folder), "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "gopath"),
           "PATH": str(Path(GO).parent), "GO111MODULE": "off"}
    subprocess.run([GO, "build", "-o", str(folder / "render"), str(folder / "main.go")], check=True, env=env)

    def render(template: str, system: str | None, messages: list[dict]) -> str:
        payload = json.dumps({"template": template, "system": system or "", "messages": messages})
        return subprocess.run([str(folder / "render")], input=payload, capture_output=True, text=True,
                              check=True).stdout
    return render


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from quantize.sources.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("bundled:smollm2-135m").path)


def jinja(tokenizer, template: str | None, messages: list[dict]) -> str:
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    if "bos_token" in (template or tokenizer.chat_template):  # llama.cpp and Ollama add BOS as a token instead
        text = text.removeprefix(tokenizer.bos_token)
    return text


def check_family(render, tokenizer, template: str | None, expected_family: str, skip: set[str] = frozenset()):
    row = ollama.family(template or tokenizer.chat_template)
    assert row is not None and row.name == expected_family
    system = ollama.default_system(tokenizer, row, template)  # the Modelfile's SYSTEM
    for name, messages in CONVERSATIONS.items():
        if name in skip:
            continue
        expected = jinja(tokenizer, template, messages)
        got = render(row.template, system, messages)
        assert got == expected, f"{expected_family}, {name}:\nGo:    {got!r}\nJinja: {expected!r}"
    return system


def test_smollm2_modelfile_template_renders_like_its_jinja(go_render, smollm2_tokenizer):
    system = check_family(go_render, smollm2_tokenizer, None, "chatml")
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_modelfile_template_renders_like_the_real_jinja(go_render, smollm2_tokenizer, name):
    from quantize.formats.llamacpp_convert import converter

    path = converter().parent / "models" / "templates" / name
    skip = {"system"} if name in NO_SYSTEM_ROLE else set()
    system = check_family(go_render, smollm2_tokenizer, path.read_text(), TEMPLATES[name], skip)
    print(f"{name}: {TEMPLATES[name]}, default system {system!r}")


def test_a_template_no_family_matches_gets_no_template(smollm2_tokenizer, tmp_path):
    assert ollama.family("{% for m in messages %}{{ m['content'] }}{% endfor %}") is None


def test_gguf_carries_lm_studio_metadata_and_the_modelfile_its_template(tiny_model, tmp_path):
    """Our converter (Q8_0 straight) and llama.cpp's quantiser (Q4_K_M from the F16) both keep the general.* keys;
    the licence comes from the model card's front matter."""
    import gguf

    model = tmp_path / "tiny-licensed"
    shutil.copytree(tiny_model, model)
    (model / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a tiny model\n")
    out = tmp_path / "run"
    methods = [{"name": "gguf", "type": "Q8_0", "num_ctx": 512}, {"name": "gguf", "type": "Q4_K_M", "imatrix": False}]
    pipeline.run(load_recipe(write_recipe(tmp_path / "r.yaml", str(model), methods, out,
                                          eval={"perplexity": {"n_ctx": 128, "max_chunks": 1},
                                                "speed": {"enabled": False}})))
    for variant in ("gguf-q8_0", "gguf-q4_k_m"):
        fields = gguf.GGUFReader(out / variant / "model.gguf").fields
        value = lambda key: fields[key].contents()  # noqa: E731
        assert value("general.name") == "tiny-licensed" and value("general.license") == "apache-2.0"
        assert value("general.size_label") == "1.4M" and value("general.quantized_by") == "quantize"
        assert value("general.base_model.count") == 1 and value("general.base_model.0.name") == "tiny-licensed"
        assert value("tokenizer.chat_template").startswith("{% for m in messages %}")
    modelfile = (out / "gguf-q8_0" / "Modelfile").read_text()
    assert modelfile.splitlines()[0] == "FROM ./model.gguf" and "PARAMETER num_ctx 512" in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile  # the tiny tokenizer's EOS; its template is no known family
    assert "PARAMETER num_ctx 1024" in (out / "gguf-q4_k_m" / "Modelfile").read_text()  # capped at its context
