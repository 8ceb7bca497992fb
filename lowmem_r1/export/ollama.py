"""An Ollama Modelfile for an exported GGUF: the chat template in Ollama's Go template syntax, the
default system prompt, and the stop tokens.

Ollama does not run Jinja. A wrong template or a missing stop token is the classic reason an exported
model "rambles" (it never sees its end-of-turn token as the end), so the template is translated from the
model's own chat template for the families it recognises (ChatML: SmolLM2, Qwen; Llama 3 headers), and
the stop tokens are every end token the tokenizer and generation config name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lowmem_r1.core.errors import UserError
from lowmem_r1.core.fsutil import atomic_write_text

CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
LLAMA3 = """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
FAMILIES = {  # marker in the Jinja template -> (Ollama template, its end-of-turn tokens)
    "<|im_start|>": (CHATML, ["<|im_end|>", "<|im_start|>"]),
    "<|start_header_id|>": (LLAMA3, ["<|eot_id|>", "<|start_header_id|>"]),
}


def _quote(s: str) -> str:
    return '"""' + s.replace('"""', '\\"\\"\\"') + '"""'


def default_system_prompt(tok, family: str) -> str | None:
    """The system prompt the Jinja template inserts when the user gives none (SmolLM2 has one)."""
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False)
    except Exception:
        return None
    if family == "<|im_start|>" and text.startswith("<|im_start|>system\n"):
        return text[len("<|im_start|>system\n"):].split("<|im_end|>", 1)[0]
    if family == "<|start_header_id|>":
        head = "<|start_header_id|>system<|end_header_id|>\n\n"
        if head in text:
            return text.split(head, 1)[1].split("<|eot_id|>", 1)[0]
    return None


def stop_tokens(model_dir: Path, tok, family_stops: list[str]) -> list[str]:
    ids = []
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    stops = [tok.convert_ids_to_tokens(int(i)) for i in ids]
    vocab = tok.get_vocab()
    stops += [s for s in family_stops if s in vocab]
    return list(dict.fromkeys(s for s in stops if s))


def modelfile_text(model_dir: Path, gguf_name: str) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    jinja = tok.chat_template or ""
    family = next((m for m in FAMILIES if m in jinja), None)
    if family is None:
        raise UserError(f"{model_dir}: the chat template is neither ChatML nor Llama 3 style; --ollama cannot "
                        "translate it. Write the Modelfile's TEMPLATE by hand (see ollama.com docs) or drop --ollama")
    template, family_stops = FAMILIES[family]
    lines = [f"FROM ./{gguf_name}", "", f"TEMPLATE {_quote(template)}"]
    system = default_system_prompt(tok, family)
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    for s in stop_tokens(model_dir, tok, family_stops):
        lines.append(f'PARAMETER stop "{s}"')
    return "\n".join(lines) + "\n"


def write_modelfile(model_dir: Path, gguf_name: str) -> Path:
    """Modelfile next to the GGUF (same folder)."""
    path = Path(model_dir) / "Modelfile"
    atomic_write_text(path, modelfile_text(Path(model_dir), gguf_name))
    return path


def model_name(out: Path) -> str:
    """A name for `ollama create`: the run's name for RUN_DIR/merged, else the folder's, in the
    characters Ollama accepts (lower-case letters, digits, . _ -)."""
    out = Path(out).resolve()
    folder = out.parent.name if out.name == "merged" else out.name
    return re.sub(r"[^a-z0-9._-]+", "-", folder.lower()).strip("-._") or "my-model"
