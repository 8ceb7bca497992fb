"""The run directory: everything one training run leaves behind, and what `merge`, `chat`, `eval` and
`report` read. One place knows the layout.

    runs/<name>/
      recipe.toml          the resolved recipe (overrides applied)
      run.json             base model, backend, status, steps
      metrics.jsonl        one line per logged step, with "step"
      completions.jsonl    prompt, completion, each reward, step
      checkpoints/checkpoint-<step>/   Trainer checkpoints (adapter, optimizer, scheduler, RNG, state)
      adapter/             the final LoRA adapter + tokenizer
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def recipe(self) -> Path:
        return self.path / "recipe.toml"

    @property
    def info_file(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def completions(self) -> Path:
        return self.path / "completions.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    def info(self) -> dict:
        """run.json: {"base_model", "model_name", "backend", "load_in_4bit", "status", "global_step",
        "max_steps", ...}."""
        try:
            return json.loads(self.info_file.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.path}: not a lowmem-r1 run directory (no run.json)") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{self.info_file}: unreadable ({e}); the run directory is damaged") from None

    def base_model(self) -> str:
        """The model the adapter was trained on: the folder recorded at training time, else (moved, or
        the builtin cache cleared) the name the recipe gave, to be resolved again."""
        info = self.info()
        recorded = info.get("base_model")
        name = recorded if recorded and Path(recorded).exists() else info.get("model_name") or recorded
        if not name:
            raise UserError(f"{self.info_file}: no base_model recorded; the run directory is damaged "
                            "(merge takes --base MODEL)")
        return name

    def exists(self) -> bool:
        return self.info_file.is_file()

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first (a checkpoint is complete once renamed into place)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        return sorted(found, key=checkpoint_step)

    def latest_adapter(self) -> Path:
        """The final adapter, or else the newest checkpoint's (for a run that is still going)."""
        if (self.adapter / "adapter_config.json").is_file():
            return self.adapter
        for ckpt in reversed(self.checkpoint_dirs()):
            if (ckpt / "adapter_config.json").is_file():
                return ckpt
        raise UserError(f"{self.path}: no adapter yet (no adapter/ and no checkpoint); train first or wait")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    if not Path(path).is_file():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def disk_needed(trainable: int, training) -> tuple[int, int]:
    """(bytes, checkpoints kept) a run needs on disk: each checkpoint holds the adapter and AdamW's two
    moments (about 3 x 4 bytes per trainable parameter), the final adapter 4 bytes, logs ~50 MB. One more
    checkpoint than save_total_limit exists while the newest is being written."""
    keep = (training.save_total_limit or max(1, training.max_steps // training.save_steps)) + 1
    return int(trainable * 12 * keep + trainable * 4 + 50_000_000), keep


def checkpoint_step(checkpoint: Path | None) -> int:
    """The global step of checkpoints/checkpoint-<step> (0 for no checkpoint)."""
    return int(checkpoint.name.split("-")[-1]) if checkpoint else 0


def newest_run(root: Path = Path("runs")) -> Path:
    runs = [RunDir(p) for p in Path(root).glob("*") if RunDir(p).exists()] if Path(root).is_dir() else []
    if not runs:
        raise UserError(f"no run found in {root}/; train one first (lowmem-r1 train recipes/demo.toml) or name it")
    return max(runs, key=lambda r: r.info_file.stat().st_mtime).path
