"""Writes that never leave a half-written output: write to a temporary sibling, then rename."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def refuse_existing(path: Path, force: bool, what: str = "output") -> None:
    """Keep what the user has: an existing output is replaced only with --force."""
    if path.exists() and not force:
        raise UserError(f"{path}: {what} already exists; pass --force to replace it, or choose another path")


@contextmanager
def atomic_dir(final: Path, force: bool = False):
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    refuse_existing(final, force)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
