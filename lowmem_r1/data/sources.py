"""Where rows come from: a generator, local files, or the Hugging Face hub - all as a `datasets.Dataset`.

Local files and hub ids go through the same `datasets.load_dataset`, so a file a user saved from the hub
behaves exactly like the hub dataset.
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

from lowmem_r1.core.errors import UserError
from lowmem_r1.data.generators import generate

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_source(data, split: str):
    """The raw rows of `data.source` for one split name (a generator ignores the split)."""
    import datasets

    datasets.disable_progress_bars()
    source = data.source
    if source.startswith("builtin:"):
        return datasets.Dataset.from_list(generate(source, dict(data.generator), data.seed))
    if data.generator:
        raise UserError("data.generator: only builtin:arithmetic and builtin:countdown take generator parameters; "
                        "remove [data.generator] or use a builtin source")
    path = Path(source).expanduser()
    if path.is_file():
        if split != data.split:
            raise UserError(f"data.eval_split: {split!r}: data.source is a single file, which has one split; point "
                            f"data.eval_split at a second file, or hold out rows with data.eval_size")
        return load_file(path)
    if path.is_dir():
        return _load(str(path), None, split, f"data.source {source}")
    if _looks_local(source):
        raise UserError(f"data.source: {source} not found; pass an existing file or folder "
                        f"({', '.join(FILE_BUILDERS)}), a hub id like openai/gsm8k, or builtin:countdown")
    return _load(source, data.config, split, f"data.source {source}")


def check_local(data) -> None:
    """Instant checks of data.source / data.eval_split (recipe validation, --dry-run): a local path that
    does not exist or has a type we cannot read fails here, not after the model loaded."""
    for key, source in (("data.source", data.source), ("data.eval_split", data.eval_split)):
        if source is None or source.startswith("builtin:") or (key == "data.eval_split" and not _looks_local(source)):
            continue
        path = Path(source).expanduser()
        if path.is_file() and path.suffix.lower() not in FILE_BUILDERS:
            raise UserError(f"{key}: {path}: unsupported file type {path.suffix!r}; use one of {', '.join(FILE_BUILDERS)}")
        if not path.exists() and _looks_local(source) and (key == "data.source" or Path(source).suffix):
            raise UserError(f"{key}: {source} not found; pass an existing file or folder "
                            f"({', '.join(FILE_BUILDERS)}), a hub id like openai/gsm8k, or builtin:countdown")


def peek_rows(source: str, where: str, limit: int | None = None) -> list[dict] | None:
    """The rows (the first `limit` of a JSON Lines file) of a local JSON Lines / JSON file, read without
    `datasets` (what --dry-run can check instantly); None for every other source (builtin, hub, parquet,
    csv: checked when loaded)."""
    path = Path(source).expanduser()
    if source.startswith("builtin:") or not path.is_file() or path.suffix.lower() not in (".jsonl", ".json"):
        return None
    line = 0
    try:
        if path.suffix.lower() == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for line, text in islice(((n, x) for n, x in enumerate(f, 1) if x.strip()), limit):
                    rows.append(json.loads(text))
        else:
            rows = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        at = f" line {line}" if line else ""
        raise UserError(f"{where}: data.source {path}{at}: not valid JSON ({e}); fix or replace the file") from None
    if isinstance(rows, dict):
        rows = next((v for v in rows.values() if isinstance(v, list)), [rows])
    if not rows or not isinstance(rows[0], dict):
        raise UserError(f"{where}: data.source {path}: no rows (expected one JSON object per line)")
    return rows


def load_file(path: str | Path):
    """One local file (jsonl, json, parquet, csv): all its rows."""
    path = Path(path).expanduser()
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"data.source: {path}: unsupported file type {path.suffix!r}; use one of "
                        f"{', '.join(FILE_BUILDERS)}")
    return _load(builder, None, "train", f"data file {path}", data_files=str(path))


def _looks_local(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or source.count("/") != 1
            or Path(source).suffix.lower() in FILE_BUILDERS)


def _load(name: str, config: str | None, split: str, what: str, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, **kwargs)
    except ValueError as e:
        if "split" in str(e).lower():
            raise UserError(f"{what}: no split {split!r} ({e}); set data.split / data.eval_split to one it has") \
                from None
        raise UserError(f"{what}: cannot load it ({e}); check data.source and data.config") from None
    except Exception as e:  # network, missing hub id, malformed file: all fixable by the user
        if "data_files" in kwargs or Path(name).exists():  # a local file or folder: not the network's fault
            while e.__cause__ is not None or e.__context__ is not None:  # the parser's own words
                e = e.__cause__ or e.__context__
            raise UserError(f"{what}: cannot read it ({' '.join(str(e).split())[:200]}); fix or replace the file "
                            f"(one JSON object per line for .jsonl)") from None
        raise UserError(
            f"{what}: cannot load it ({type(e).__name__}: {' '.join(str(e).split())[:300]}); check the id, config and your network "
            f"(offline? download it once or point data.source at a local file)"
        ) from None
