"""The Ollama Modelfile beside a GGUF: its chat template in Ollama's Go-template syntax, the default system prompt the
model's own template injects, its stop tokens and the context length.

Ollama renders TEMPLATE with Go's text/template over `.Messages` (role, content; consecutive messages of one role
merged) and `.System` (the system messages' text); a Modelfile SYSTEM is sent as the first message when a request
has none. A Jinja chat template cannot be translated in general, so the families below are rows of data: a marker
that identifies the family in the Jinja text, the Go template that renders a plain conversation (system, user and
assistant turns; no tools) as the Jinja one does, and the family's end-of-turn stop. tests/test_ollama.py renders
each row with Go's text/template against the real templates (llama.cpp's models/templates, SmolLM2's own) and
compares with transformers' Jinja rendering. A template no row recognises gets no TEMPLATE: Ollama then matches
the GGUF's tokenizer.chat_template against its own template library.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChatFamily:
    name: str
    markers: tuple[str, ...]  # all in the Jinja text
    template: str  # Go text/template
    stops: tuple[str, ...]
    default_system: str | None = None  # regex on the Jinja rendering of one user turn: the injected system prompt


LLAMA3_TURNS = ('{{- range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                '{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n')
FAMILIES = (
    ChatFamily("chatml", ("<|im_start|>", "<|im_end|>"),
               '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
               '<|im_start|>assistant\n', ("<|im_end|>",), r"^<\|im_start\|>system\n(.*?)<\|im_end\|>"),
    # Llama 3.1 / 3.3: a system turn always, with the knowledge-cutoff and date lines before the system prompt
    ChatFamily("llama3.1", ("<|start_header_id|>", "Cutting Knowledge Date"),
               '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n'
               'Today Date: 26 Jul 2024\n\n{{ .System }}<|eot_id|>' + LLAMA3_TURNS, ("<|eot_id|>", "<|eom_id|>")),
    ChatFamily("llama3", ("<|start_header_id|>",),
               '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
               '{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n', ("<|eot_id|>",)),
    # Gemma: no system role; the system text opens the first user turn; the assistant is "model"
    ChatFamily("gemma", ("<start_of_turn>",),
               '{{- $first := true }}{{- range .Messages }}{{ if ne .Role "system" }}<start_of_turn>'
               '{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
               '{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}{{ $first = false }}{{ .Content }}'
               '<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n', ("<end_of_turn>",)),
    ChatFamily("phi3", ("<|user|>", "<|end|>"),
               '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n',
               ("<|end|>",)),
)


def family(chat_template: str) -> ChatFamily | None:
    return next((f for f in FAMILIES if all(m in chat_template for m in f.markers)), None)


def default_system(tokenizer, row: ChatFamily, chat_template: str | None = None) -> str | None:
    """The system prompt the model's template (or `chat_template`) adds when a conversation has none (SmolLM2,
    Qwen2.5), read from its own rendering of one user turn."""
    if row.default_system is None:
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template=chat_template,
                                         tokenize=False, add_generation_prompt=True)
    if "bos_token" in (chat_template or tokenizer.chat_template) and tokenizer.bos_token:
        text = text.removeprefix(tokenizer.bos_token)  # what the template prints first, llama.cpp adds as a token
    found = re.search(row.default_system, text, re.S)
    return found.group(1) if found else None


def stop_tokens(tokenizer, model_dir: Path, row: ChatFamily | None) -> list[str]:
    """The family's end-of-turn tokens, then every end-of-sequence token of the model (generation_config.json's
    eos_token_id may list several: Llama 3's <|eot_id|>, <|end_of_text|>, <|eom_id|>)."""
    stops = list(row.stops if row else ())
    ids = []
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    names = [tokenizer.convert_ids_to_tokens(int(i)) for i in ids] + [tokenizer.eos_token]
    for name in names:
        if name and name not in stops:
            stops.append(name)
    return stops


def go_string(text: str) -> str:
    """A Modelfile triple-quoted value."""
    assert '"""' not in text, "a Modelfile value cannot hold three double quotes"
    return f'"""{text}"""'


def modelfile(tokenizer, model_dir: Path, gguf_name: str, num_ctx: int) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    row = family(template)
    lines = [f"FROM ./{gguf_name}"]
    if row:
        lines.append(f"TEMPLATE {go_string(row.template)}")
        system = default_system(tokenizer, row)
        if system:
            lines.append(f"SYSTEM {go_string(system)}")
    else:
        lines.append("# chat template: no family recognised; Ollama matches the GGUF's tokenizer.chat_template")
    lines += [f'PARAMETER stop "{s}"' for s in stop_tokens(tokenizer, model_dir, row)]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"
