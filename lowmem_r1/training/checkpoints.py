"""Checkpoints that are renamed into place: a kill at any moment leaves the previous one whole."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lowmem_r1.core.faults import maybe_fault
from lowmem_r1.runs.rundir import RunDir


def staged_trainer(base):
    """A TRL trainer class whose checkpoints are written to a staging folder and renamed into place, so a
    kill at any moment leaves the previous checkpoint whole, and whose rotation never deletes the newest
    complete checkpoint. GRPO and SFT runs share it."""

    class Staged(base):
        def _save_checkpoint(self, model, trial):
            # Several processes: each writes its part (its RNG state; its shards under ZeRO/FSDP) into the
            # staging folder, and the main one renames it into place once all have written.
            root = Path(self.args.output_dir)
            staging = root / ".staging"
            name = f"checkpoint-{self.state.global_step}"
            main = self.args.process_index == 0
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            limit = self.args.save_total_limit
            self.args.output_dir, self.args.save_total_limit = str(staging), None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir, self.args.save_total_limit = str(root), limit
            self.accelerator.wait_for_everyone()
            if main:
                self._publish(root, staging, name, limit)
            self.accelerator.wait_for_everyone()

        def _load_optimizer_and_scheduler(self, checkpoint):
            """Several CPU processes: transformers loads the optimizer onto args.device, which accelerate makes
            `cpu:0` there and torch.load cannot map to ("don't know how to restore data location"). Load
            both onto the CPU, as transformers does for one process."""
            if not (checkpoint and self.args.world_size > 1 and self.args.device.type == "cpu"):
                return super()._load_optimizer_and_scheduler(checkpoint)
            import torch

            load = lambda name: torch.load(Path(checkpoint) / name, map_location="cpu", weights_only=True)  # noqa: E731
            self.optimizer.load_state_dict(load("optimizer.pt"))
            self.lr_scheduler.load_state_dict(load("scheduler.pt"))

        def _publish(self, root: Path, staging: Path, name: str, limit) -> None:
            _fsync_tree(staging / name)
            maybe_fault("save", self.state.global_step)
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            if limit:
                complete = RunDir(root.parent).checkpoint_dirs()  # root is the run's checkpoints/
                for old in complete[: max(0, len(complete) - limit)]:
                    shutil.rmtree(old, ignore_errors=True)

    Staged.__name__ = Staged.__qualname__ = f"Lowmem{base.__name__}"
    return Staged


def _fsync_tree(path: Path) -> None:
    for p in Path(path).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
