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

from lowmem_r1.core.errors import UserError
from lowmem_r1.core.fsutil import check_safetensors, safetensors_problem

# What a checkpoint must hold to resume from (Trainer._save_checkpoint writes them), besides every process's
# RNG state: rng_state.pth from one process, rng_state_<rank>.pth from each of several.
CHECKPOINT_FILES = ("trainer_state.json", "adapter_config.json", "adapter_model.safetensors", "optimizer.pt",
                    "scheduler.pt")


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

    def checkpoint_dirs(self, complete: bool = True) -> list[Path]:
        """Checkpoints, oldest first; by default only complete ones (see checkpoint_problem)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        found = [p for p in found if not complete or checkpoint_problem(p) is None]
        return sorted(found, key=checkpoint_step)

    def skipped_checkpoints(self) -> list[tuple[Path, str]]:
        """Incomplete checkpoints newer than the newest complete one, with what each lacks."""
        complete = self.checkpoint_dirs()
        newest = checkpoint_step(complete[-1]) if complete else 0
        return [(p, checkpoint_problem(p)) for p in self.checkpoint_dirs(complete=False)
                if checkpoint_step(p) > newest]

    def latest_adapter(self) -> Path:
        """The final adapter, or else the newest checkpoint's (for a run that is still going)."""
        if (self.adapter / "adapter_config.json").is_file():
            check_safetensors(self.adapter)
            return self.adapter
        for ckpt in reversed(self.checkpoint_dirs()):
            return ckpt
        raise UserError(f"{self.path}: no adapter yet (no adapter/ and no checkpoint); train first or wait")


@dataclass(frozen=True)
class Trained:
    """A LoRA adapter to load or merge and the base it was trained on (a name, resolved by the caller;
    "" when an adapter folder does not record it)."""

    adapter: Path
    base: str
    run_dir: Path | None = None
    backend: str = "hf"
    load_in_4bit: bool = False


def find_trained(target: str | Path) -> Trained | None:
    """The one resolver of trained weights that `merge`, `chat` and `eval` share: a run directory (its
    final adapter, else its newest complete checkpoint) or an adapter folder; None for anything else
    (a model folder, a hub id)."""
    path = Path(target).expanduser()
    run = RunDir(path)
    if path.is_dir() and run.exists():
        info = run.info()
        return Trained(run.latest_adapter(), run.base_model(), path, info.get("backend", "hf"),
                       bool(info.get("load_in_4bit")))
    config = path / "adapter_config.json"
    if path.is_dir() and config.is_file():
        check_safetensors(path)
        try:
            base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
        except (ValueError, AttributeError):
            raise UserError(f"{config}: unreadable; the adapter folder is damaged") from None
        return Trained(path, base)
    return None


def jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of a JSONL file. A line a kill tore mid-write - cut JSON, or cut inside a UTF-8
    character - is skipped, wherever it is, so `--resume` and `report` read what a crash left."""
    rows = []
    if not Path(path).is_file():
        return rows
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8").strip()
                row = json.loads(line) if line else None
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(row, dict):
                rows.append((line, row))
    return rows


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; torn lines (a run killed mid-write) are skipped."""
    return [row for _, row in jsonl_rows(path)]


def disk_needed(trainable: int, training) -> tuple[int, int]:
    """(bytes, checkpoints kept) a run needs on disk: each checkpoint holds the adapter and AdamW's two
    moments (about 3 x 4 bytes per trainable parameter), the final adapter 4 bytes, logs ~50 MB. One more
    checkpoint than save_total_limit exists while the newest is being written."""
    keep = (training.save_total_limit or max(1, training.max_steps // training.save_steps)) + 1
    return int(trainable * 12 * keep + trainable * 4 + 50_000_000), keep


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing, a process's RNG state missing, a truncated
    adapter), or None."""
    for name in CHECKPOINT_FILES:
        if not (checkpoint / name).is_file():
            return f"no {name}"
    ranks = sorted(_rng_ranks(checkpoint))
    if not ranks and not (checkpoint / "rng_state.pth").is_file():
        return "no rng_state.pth"
    if ranks and ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        return f"no rng_state_{missing[0]}.pth (process {missing[0]}'s RNG state)"
    return safetensors_problem(checkpoint / "adapter_model.safetensors")


def checkpoint_world_size(checkpoint: Path) -> int:
    """How many processes wrote the checkpoint: one RNG state file each (transformers' Trainer)."""
    return len(_rng_ranks(checkpoint)) or 1


def _rng_ranks(checkpoint: Path) -> list[int]:
    names = (p.name for p in Path(checkpoint).glob("rng_state_*.pth"))
    return [int(n[len("rng_state_"):-4]) for n in names if n[len("rng_state_"):-4].isdigit()]


def checkpoint_step(checkpoint: Path | None) -> int:
    """The global step of checkpoints/checkpoint-<step> (0 for no checkpoint)."""
    return int(checkpoint.name.split("-")[-1]) if checkpoint else 0


def newest_run(root: Path = Path("runs")) -> Path:
    runs = [RunDir(p) for p in Path(root).glob("*") if RunDir(p).exists()] if Path(root).is_dir() else []
    if not runs:
        raise UserError(f"no run found in {root}/; train one first (lowmem-r1 train recipes/demo.toml) or name it")
    return max(runs, key=lambda r: r.info_file.stat().st_mtime).path




