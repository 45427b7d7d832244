"""An Ollama Modelfile beside each exported GGUF: FROM the file, the chat template as Ollama's Go template, the stop
sequences and the model's default system line — so `ollama create NAME -f <file>.Modelfile` gives the same prompts
llmstack trained on.

Ollama templates are Go templates and a Jinja chat template cannot be translated in general, so this is written by
hand for the family llmstack's packaged and tuned models use: when the model's own template renders a probe
conversation exactly as ChatML does (`<|im_start|>role\\ncontent<|im_end|>\\n`), the Modelfile carries ChatML's Go
template; its default system line (what the Jinja template inserts when a chat has no system turn) becomes SYSTEM.
Any other template gets no TEMPLATE line and a comment saying so: Ollama then derives one from the GGUF's own
`tokenizer.chat_template`, which the export carries.
"""

from __future__ import annotations

import re
from pathlib import Path

CHATML_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                   "<|im_start|>assistant\n")
PROBE = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
         {"role": "user", "content": "U2"}]


def chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def template_facts(model: Path) -> dict:
    """Whether the model's chat template is ChatML, its default system line, and its end-of-turn token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    facts = {"chatml": False, "system": None, "stop": [t for t in {tok.eos_token} if t]}
    if not tok.chat_template:
        return facts
    try:
        rendered = tok.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
        bare = tok.apply_chat_template(PROBE[1:2], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render the probe is simply not ChatML
        return facts
    if rendered != chatml(PROBE):
        return facts
    facts["chatml"] = True
    facts["stop"] = sorted({*facts["stop"], "<|im_end|>"})
    default = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", bare, re.S)
    if default and bare == chatml([{"role": "system", "content": default.group(1)}, PROBE[1]]):
        facts["system"] = default.group(1)
    return facts


def _quoted(text: str) -> str:
    if '"""' in text:
        raise ValueError('a Modelfile block cannot hold """')
    return f'"""{text}"""'


def write_modelfile(gguf: Path, model: Path) -> Path:
    """`<gguf stem>.Modelfile` beside `gguf`; returns its path."""
    facts = template_facts(model)
    lines = [f"# Ollama: ollama create <name> -f {gguf.stem}.Modelfile", f"FROM ./{gguf.name}"]
    if facts["chatml"]:
        lines.append(f"TEMPLATE {_quoted(CHATML_TEMPLATE)}")
    else:
        lines.append("# no TEMPLATE: the chat template is not ChatML; Ollama derives one from the GGUF's own "
                     "tokenizer.chat_template")
    if facts["system"]:
        lines.append(f"SYSTEM {_quoted(facts['system'])}")
    for stop in facts["stop"]:
        lines.append(f'PARAMETER stop "{stop}"')
    path = gguf.with_suffix(".Modelfile")
    path.write_text("\n".join(lines) + "\n")
    return path


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) pairs of a Modelfile, read by Ollama's rules: one instruction a line, its name
    case-insensitive, `#` comment lines, and \"\"\"…\"\"\" arguments that may span lines (kept byte for byte)."""
    out, lines, i = [], text.splitlines(keepends=True), 0
    while i < len(lines):
        line = lines[i].lstrip()
        i += 1
        if not line.strip() or line.startswith("#"):
            continue
        instr, _, arg = line.rstrip("\n").partition(" ")
        arg = arg.lstrip()
        if arg.startswith('"""'):
            body = arg[3:]
            if '"""' in body:
                arg = body[:body.index('"""')]
            else:
                parts = [body + "\n"]
                while True:
                    if i >= len(lines):
                        raise ValueError(f'{instr}: a """ block that never ends')
                    nxt, i = lines[i], i + 1
                    if '"""' in nxt:
                        parts.append(nxt[:nxt.index('"""')])
                        break
                    parts.append(nxt)
                arg = "".join(parts)
        else:
            arg = arg.rstrip()
        out.append((instr.upper(), arg))
    return out
