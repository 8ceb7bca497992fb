"""Writes that never lose what the user had.

Outputs are written to a temporary sibling and renamed into place. `--force` replaces only an output of
the same kind that this toolkit wrote - recognised by the marker file it puts in every output folder
(or, for outputs from before markers existed, by the files that kind always holds) - and never one of
the command's inputs. Anything else is refused with one line. OS errors while writing (a file where a
folder should be, a read-only or virtual filesystem) become one line naming the path.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from lowmem_r1.core.errors import UserError

MARKER = ".lowmem-r1"
"""Written into every output folder; holds the kind of output (`merged model`, `run directory`, ...)."""


def _first_jsonl_row(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            row = json.loads(f.readline())
        return row if isinstance(row, dict) else {}
    except (OSError, ValueError):
        return {}


# How to recognise each kind of output written before the marker existed: the files it always holds
# (folders), or a test of its content (files).
LEGACY: dict[str, tuple[str, ...] | Callable[[Path], bool]] = {
    "run directory": ("run.json",),  # what every reader of a run looks for (RunDir.exists)
    "merged model": ("config.json", "merge_info.json"),
    "eval results folder": ("results.json", "generations.jsonl"),
    "report": ("summary.json",),
    "adapter": ("adapter_config.json",),
    "countdown data": lambda p: {"nums", "target"} <= set(_first_jsonl_row(p)),
}


def is_ours(path: Path, kind: str) -> bool:
    """`path` is an output of this `kind` written by lowmem-r1 (or an empty folder: nothing to lose)."""
    path = Path(path)
    legacy = LEGACY.get(kind)
    if callable(legacy) or path.is_file():  # a file output, or a file where a folder goes
        return callable(legacy) and path.is_file() and not path.is_symlink() and legacy(path)
    if not path.is_dir() or path.is_symlink():
        return False
    marker = path / MARKER
    if marker.is_file():
        return marker.read_text(encoding="utf-8", errors="replace").strip() == kind
    if not any(path.iterdir()):
        return True
    return isinstance(legacy, tuple) and all((path / name).exists() for name in legacy)


def check_not_input(out: Path, inputs: Iterable[Path | str | None], kind: str = "output") -> None:
    """An input is never an output: `out` may not be, contain, or lie inside any of `inputs`."""
    target = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None or not Path(inp).exists():
            continue
        src = Path(inp).expanduser().resolve()
        if target == src or src.is_relative_to(target) or target.is_relative_to(src):
            how = "is" if target == src else "holds" if src.is_relative_to(target) else "lies inside"
            raise UserError(f"{out}: the {kind} path {how} this command's input {inp}; writing there would replace "
                            f"what it reads. Choose another output path (--out)")


def refuse_existing(path: Path, force: bool, what: str = "output", inputs: Iterable = ()) -> None:
    """Keep what the user has: an existing output is replaced only with --force, and only when it is an
    output of the same kind (`what`) that lowmem-r1 wrote; an input is never replaced."""
    path = Path(path)
    check_not_input(path, inputs, what)
    check_writable(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not is_ours(path, what):
        found = "a file" if path.is_file() else "a folder" if path.is_dir() else "something"
        raise UserError(f"{path}: exists and is {found} that lowmem-r1 did not write as a {what}; --force only "
                        f"replaces an output of the same kind written by lowmem-r1. Choose another path")
    if not force:
        raise UserError(f"{path}: {what} already exists; pass --force to replace it, or choose another path")


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output whose nearest existing folder is a file, on a read-only or
    virtual filesystem (/proc, /sys), or not writable by us."""
    path = Path(path).expanduser()
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{path}: {parent} is a file, not a folder; choose another output path")
    st = os.statvfs(parent)
    why = ("a read-only filesystem" if st.f_flag & os.ST_RDONLY else
           "a virtual filesystem (like /proc)" if st.f_blocks == 0 else
           "a folder you cannot write to" if not os.access(parent, os.W_OK) else None)
    if why:
        raise UserError(f"{path}: {parent} is on {why}; choose a writable location (another --out / output.dir)")


def mark(folder: Path, kind: str) -> None:
    """Mark `folder` as an output of `kind` written by lowmem-r1."""
    (Path(folder) / MARKER).write_text(kind + "\n", encoding="utf-8")


@contextmanager
def os_errors(path: Path, doing: str = "write"):
    """One line naming the path for an OS error (a file in the way, a read-only or full disk, a virtual
    filesystem) instead of a traceback."""
    try:
        yield
    except OSError as e:
        where = e.filename if e.filename and ".tmp-" not in str(e.filename) else path
        raise UserError(f"{where}: cannot {doing} ({e.strerror or e}); choose a writable location "
                        f"(another --out / output.dir)") from None


@contextmanager
def atomic_dir(final: Path, force: bool = False, kind: str = "output", inputs: Iterable = ()):
    """Yield a temporary folder beside `final`; on success it is marked as a `kind` output and replaces
    `final` in one rename (see refuse_existing for what --force may replace)."""
    final = Path(final)
    refuse_existing(final, force, kind, inputs)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with os_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        yield tmp
        with os_errors(final):
            mark(tmp, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with os_errors(final):
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with os_errors(path):
        if path.is_dir():
            raise UserError(f"{path}: is a folder, not a file; choose a file path")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def free_bytes(path: Path) -> int:
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_free_space(path: Path, needed: int, what: str) -> None:
    free = free_bytes(path)
    if free < needed:
        raise UserError(
            f"{path}: not enough free disk for {what}: need {needed / 1e9:.2f} GB, "
            f"have {free / 1e9:.2f} GB; free some space or choose another output path"
        )


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a .safetensors file (truncated, corrupt header), read from its header alone;
    None when it is whole."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "truncated (shorter than its header)"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return "truncated or not a safetensors file (header runs past the end)"
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "corrupt header (not a safetensors file?)"
    if 8 + n + max(ends, default=0) > size:
        return f"truncated ({size} bytes, its header says {8 + n + max(ends, default=0)})"
    return None


def check_safetensors(folder_or_file: Path) -> None:
    """Refuse a truncated or corrupt .safetensors file with one line naming it."""
    p = Path(folder_or_file)
    for f in sorted(p.glob("*.safetensors")) if p.is_dir() else [p]:
        problem = safetensors_problem(f)
        if problem:
            raise UserError(f"{f}: {problem}; re-download or re-create it (a copy or download was cut short?)")
