"""recipe -> GRPOConfig + GRPOTrainer -> run directory.

Read top to bottom: prepare the run directory (new, forced or resumed), pick the backend (before
anything imports trl: Unsloth must patch it first), load model + data + rewards, build TRL's config and
trainer, train with checkpoints that are renamed into place, save the adapter, summarise.
"""

from __future__ import annotations

import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lowmem_r1.config.recipe import Recipe, load_recipe, recipe_to_toml
from lowmem_r1.core import distributed
from lowmem_r1.core.errors import UserError
from lowmem_r1.core.fsutil import (
    MARKER,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_free_space,
    check_not_input,
    is_ours,
    mark,
    os_errors,
)
from lowmem_r1.generation.serve import uses_server, wait_for_server
from lowmem_r1.models import vllm_cpu
from lowmem_r1.models.backends.select import select as select_backend
from lowmem_r1.models.names import resolve_model
from lowmem_r1.preflight.plan import make_plan, warn_if_not_fit
from lowmem_r1.rewards.guard import RewardFailure
from lowmem_r1.runs.rundir import RunDir, checkpoint_step, checkpoint_world_size, disk_needed, jsonl_rows
from lowmem_r1.training import launch, progress
from lowmem_r1.training.callbacks import Interrupt, MetricsLog
from lowmem_r1.training.grpo.compat import patch_trl_for_cpu
from lowmem_r1.training.stages import TRAINERS

# Recipe keys that may change between a run and its resumption without changing what is trained.
RESUME_SAFE_KEYS = {"logging", "output", "eval", "description"}


@dataclass(frozen=True)
class Start:
    """How a run starts, said explicitly: `new` in `run_dir` (with `force`, over an old run of ours), or
    `resume` the run in `run_dir` from its newest complete checkpoint (with `force`, under a changed
    recipe)."""

    mode: Literal["new", "resume"]
    run_dir: Path
    force: bool = False

    @classmethod
    def new(cls, recipe: Recipe, force: bool = False) -> Start:
        return cls("new", recipe.run_dir(), force)

    @classmethod
    def resume(cls, recipe: Recipe, run_dir: str | Path | None = None, force: bool = False) -> Start:
        return cls("resume", Path(run_dir) if run_dir else recipe.run_dir(), force)


def train(recipe: Recipe, recipe_path: Path | None = None, start: Start | None = None, console=None,
          callbacks: tuple = ()) -> int:
    """Run the recipe's stage (GRPO, or SFT: lowmem_r1/training/sft.py). Returns the process exit code (0 done, 130
    interrupted). `callbacks`: extra trainer callbacks (benchmarks measure held-out accuracy while training)."""
    world = distributed.world()  # several processes (torchrun, accelerate launch): only the main one writes or draws
    console = console or progress.make_console(quiet=not world.main)
    if uses_server(recipe):  # before anything else: no server is the first thing to say (generation/serve.py)
        info = wait_for_server(recipe, say=lambda text: console.print(f"[yellow]vLLM server:[/] {text}"))
        console.print(f"vLLM server at {info.url}: {info.model} on {info.world_size} GPU(s)")
    # First: a refused GPU setting must not leave a run directory behind; and unsloth, when chosen, is
    # imported here (select calls backend.prepare()), before anything imports trl/transformers/peft.
    backend = select_backend(recipe)
    launch.check(recipe, world.size, backend.name)
    start = start or Start.new(recipe)
    distributed.init_process_group()
    run, checkpoint = prepare_run_dir_once(recipe, start, console)
    console.print(f"[bold]lowmem-r1[/] run [cyan]{run.path}[/] - backend [cyan]{backend.name}[/] ({backend.why})")
    for skipped, why in run.skipped_checkpoints() if start.mode == "resume" else []:
        console.print(f"[yellow]resume:[/] {skipped.name} is incomplete ({why}); resuming from "
                      f"{checkpoint.name if checkpoint else 'the start'}")
    _warn_if_not_fit(recipe, console)
    trainer, tokenizer, interrupt, display = build_trainer(recipe, backend, run, checkpoint, console, callbacks)

    try:
        with RunStatus(run, recipe, backend.name, resume_command(recipe_path, run, world.size), console, trainer) as status:
            with interrupt.installed(console), display:
                trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            save_adapter(trainer, tokenizer, run)
            if interrupt.requested:
                status.interrupted("checkpoint and adapter saved")
            else:
                status.completed()
    finally:
        vllm_cpu.release(trainer)  # a colocated CPU engine: memory and port back before the next stage
    if status.code == 0:
        progress.print_summary(run, console)
    return status.code


def build_trainer(recipe: Recipe, backend, run: RunDir, checkpoint: Path | None, console, extra_callbacks=()):
    """Model (a fresh LoRA, or model.adapter continued), then the stage's trainer (training/stages.py)
    -> (trainer, tokenizer, Ctrl-C handler, live display)."""
    vllm_cpu.configure()  # before anything imports vllm; nothing on a GPU or without vllm
    from transformers import set_seed

    set_seed(recipe.training.seed)  # LoRA's A matrices are drawn at random: same seed, same run
    model, tokenizer = backend.load(recipe)
    if recipe.model.adapter:
        continue_adapter(model, recipe.model.adapter, recipe)
        console.print(f"continuing the LoRA adapter {recipe.model.adapter}")
    patch_trl_for_cpu()
    interrupt = Interrupt()
    display = progress.TrainingDisplay(recipe, run, console, start_step=checkpoint_step(checkpoint))
    callbacks = [MetricsLog(run.metrics), display, interrupt, *extra_callbacks]
    trainer = TRAINERS[recipe.stage].build(recipe, run, backend, model, tokenizer, callbacks, console, checkpoint,
                                           display)
    _preflight_disk(run, recipe, model)
    _quiet_default_printers(trainer)
    return trainer, tokenizer, interrupt, display


def continue_adapter(model, adapter: str, recipe: Recipe) -> None:
    """Load a saved LoRA adapter's weights into the freshly built LoRA of the same shape (a pipeline stage
    continuing the previous one). Works for both backends: each returns a peft model of the recipe's [lora]."""
    import json

    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    path = adapter_folder(adapter)
    config = json.loads((path / "adapter_config.json").read_text())
    want = recipe.lora
    targets = want.target_modules if isinstance(want.target_modules, str) else sorted(want.target_modules)
    have = config.get("target_modules")
    have = have if isinstance(have, str) else sorted(have or [])
    if config.get("r") != want.r or (targets != "all-linear" and have != targets):
        raise UserError(
            f"model.adapter {adapter}: its LoRA (r={config.get('r')}, target_modules={have}) differs from [lora] "
            f"(r={want.r}, target_modules={targets}); use the same [lora] to continue it"
        )
    result = set_peft_model_state_dict(model, load_peft_weights(str(path)))
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"model.adapter {adapter}: weights that do not fit this model ({result.unexpected_keys[:2]}...)")


def adapter_folder(adapter: str) -> Path:
    """An adapter folder, or a run directory's final adapter."""
    path = Path(adapter)
    if (path / "run.json").is_file():
        path = RunDir(path).latest_adapter()
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"model.adapter {adapter}: no LoRA adapter there (no adapter_config.json); name an adapter "
                        f"folder or a finished run directory")
    return path


# --------------------------------------------------------------------------------------------------
# run.json's status for the life of a run


class Terminated(BaseException):
    """SIGTERM arrived during training (a BaseException, like KeyboardInterrupt, so that no `except
    Exception` on the way - a reward guard, a library - mistakes it for an error of its own)."""


def resume_command(recipe_path, run: RunDir, nproc: int = 1) -> str:
    more = f" --nproc {nproc}" if nproc > 1 else ""
    return f"lowmem-r1 train {recipe_path or 'RECIPE'} --resume {run.path}{more}"


class RunStatus:
    """`running` in run.json while inside; on the way out `completed`, `interrupted` (Ctrl-C: exit 130)
    or `failed` (a reward failure, out of memory, SIGTERM or any other error) with the resume command
    - never left `running`. Failures leave a checkpoint when they can and end as one-line UserErrors."""

    def __init__(self, run: RunDir, recipe: Recipe, backend: str, resume: str, console, trainer):
        self.run, self.recipe, self.backend, self.resume = run, recipe, backend, resume
        self.console, self.trainer = console, trainer
        self.main = distributed.world().main  # the others neither write run.json nor repeat its message
        self.code = 0
        self.started = time.time()
        self._previous_term = None

    @property
    def step(self) -> int:
        return self.trainer.state.global_step

    def write(self, status: str, **extra) -> None:
        if self.main:
            _write_info(self.run, self.recipe, self.backend, status=status, step=self.step, **extra)

    def __enter__(self) -> RunStatus:
        self.write("running", resume=self.resume)
        self._previous_term = signal.signal(signal.SIGTERM, self._on_term)
        return self

    @staticmethod
    def _on_term(signum, frame):
        raise Terminated()

    def interrupted(self, what: str) -> None:
        self.write("interrupted")
        self.console.print(f"\n[yellow]interrupted[/] at step {self.step}: {what}.\nresume with: {self.resume}")
        self.code = 130

    def completed(self) -> None:
        self.write("completed", seconds=round(time.time() - self.started, 1))

    def __exit__(self, kind, error, tb) -> bool:
        several = distributed.world().size > 1
        # After a failure with several processes, torchrun sends SIGTERM to the survivors: let this one finish
        # saying what happened and how to resume (it exits right after; torchrun's SIGKILL follows in 30 s).
        signal.signal(signal.SIGTERM, signal.SIG_IGN if several and error is not None
                      else self._previous_term or signal.SIG_DFL)
        if error is None:
            return False
        if not self.main:  # the main process reports the stop; this one ends with a code of its own
            if isinstance(error, (KeyboardInterrupt, Terminated)):
                raise SystemExit(130 if isinstance(error, KeyboardInterrupt) else 143) from None
            return False
        if several and _peer_gone(error):
            self.write("failed", error="another training process stopped")
            raise UserError(f"{self.run.path}: another training process stopped at step {self.step} (its error is "
                            f"above); run.json marked failed; resume from the last complete checkpoint with: "
                            f"{self.resume}", exit_code=143) from None
        if isinstance(error, KeyboardInterrupt):  # Ctrl-C twice: stop now, keep the last checkpoint
            last = self.run.checkpoint_dirs()
            self.interrupted(f"stopped now; last complete checkpoint: {last[-1] if last else 'none'}")
            return True
        if isinstance(error, RewardFailure):
            saved = save_checkpoint_now(self.trainer)
            reason = (f"{error}\n  run stopped at step {self.step}; checkpoint: {saved}\n"
                      f"  fix the reward (or set on_error = \"skip\" on it), then: {self.resume}")
        elif isinstance(error, Exception) and _is_out_of_memory(error):
            saved = _try(lambda: save_checkpoint_now(self.trainer))
            reason = out_of_memory_advice(self.recipe, self.step, saved, self.run, self.resume)
        elif isinstance(error, Terminated):
            self.write("failed", error="terminated (SIGTERM)")
            raise UserError(f"{self.run.path}: terminated (SIGTERM) at step {self.step}; run.json marked failed; "
                            f"resume from the last complete checkpoint with: {self.resume}", exit_code=143) from None
        else:
            self.write("failed", error=f"{type(error).__name__}: {error}"[:500])
            if isinstance(error, UserError):
                raise UserError(f"{error}\n  run marked failed at step {self.step}; after fixing: {self.resume}",
                                exit_code=error.exit_code) from None
            return False  # a bug: the traceback (--debug) is the useful report; run.json already says failed
        self.write("failed", error=str(error).splitlines()[0][:500])
        raise UserError(reason) from None


# --------------------------------------------------------------------------------------------------
# The run directory: new, forced over an old one, or resumed


def prepare_run_dir_once(recipe: Recipe, start: Start, console) -> tuple[RunDir, Path | None]:
    """The main process prepares the run directory (new, forced or resumed) while the others wait, then
    every process resumes from the same checkpoint. A refusal is said once, by the main process."""
    world = distributed.world()
    outcome, refused = None, None
    if world.main:
        try:
            run, checkpoint = prepare_run_dir(recipe, start)
            outcome = str(checkpoint or "")
        except UserError as e:
            refused = e
    if world.size > 1:
        outcome = distributed.broadcast(outcome)  # every process waits here for the main one
    if refused is not None:
        raise refused
    if outcome is None:
        raise SystemExit(2)
    checkpoint = Path(outcome) if outcome else None
    if checkpoint and world.main and checkpoint_world_size(checkpoint) != world.size:
        console.print(f"[yellow]resume:[/] {world_size_change(recipe, checkpoint, world.size)}")
    return RunDir(start.run_dir), checkpoint


def world_size_change(recipe: Recipe, checkpoint: Path, now: int) -> str:
    """What resuming with another number of processes does (transformers restores each process's RNG
    state only when its rank's file is there; the per-device batch stays, so the global batch changes)."""
    t = recipe.training
    per = t.per_device_train_batch_size * t.gradient_accumulation_steps
    was = checkpoint_world_size(checkpoint)
    return (f"{checkpoint.name} was written by {was} process(es), this run has {now}: training continues from step "
            f"{checkpoint_step(checkpoint)} with {per * now} completions per step instead of {per * was} and fresh "
            f"random streams where no saved one fits, so it will not match an uninterrupted run (--nproc {was} "
            f"resumes it exactly)")


def prepare_run_dir(recipe: Recipe, start: Start) -> tuple[RunDir, Path | None]:
    """A new run refuses to replace anything but an old run of ours, and that only with --force;
    --resume finds the newest complete checkpoint."""
    run = RunDir(start.run_dir)
    with os_errors(run.path, "create the run directory"):
        if start.mode == "resume":
            return run, _prepare_resume(run, recipe, start.force)
        check_not_input(run.path, _local_inputs(recipe), "run directory")
        # A start that failed before training (bad data path, say) leaves only recipe.toml: reuse it.
        leftovers = {"recipe.toml", "checkpoints", MARKER}
        if run.path.exists() and any(p.name not in leftovers or run.checkpoint_dirs() for p in run.path.iterdir()):
            if not is_ours(run.path, "run directory"):
                raise UserError(f"{run.path}: holds files that are not a lowmem-r1 run; set output.dir to a new "
                                f"folder (or move those files away)")
            if not start.force:
                raise UserError(
                    f"{run.path}: already holds a run; pass --resume to continue it, --force to start a new run "
                    f"over it, or set output.dir to another folder"
                )
            shutil.rmtree(run.path)
        run.path.mkdir(parents=True, exist_ok=True)
        mark(run.path, "run directory")
        atomic_write_text(run.recipe, recipe_to_toml(recipe))
    return run, None


def _prepare_resume(run: RunDir, recipe: Recipe, force: bool) -> Path | None:
    if not run.exists():
        raise UserError(f"{run.path}: no run to resume there; start it without --resume, or name the run dir")
    saved = load_recipe(run.recipe, check_rewards=False)
    diff = recipe_diff(saved, recipe)
    if diff and not force:
        raise UserError(
            f"{run.path}: the recipe differs from the run's saved recipe in {'; '.join(diff)}; "
            f"resume with the same settings, or pass --force to resume anyway"
        )
    _clear_staging(run)
    checkpoints = run.checkpoint_dirs()
    checkpoint = checkpoints[-1] if checkpoints else None
    truncate_logs(run, checkpoint_step(checkpoint))
    atomic_write_text(run.recipe, recipe_to_toml(recipe))
    return checkpoint


def _local_inputs(recipe: Recipe) -> list[str]:
    """What a run reads from local disk: its run directory must not be, hold, or lie inside these."""
    return [recipe.model.name, recipe.data.source, recipe.data.eval_split]


def recipe_diff(saved: Recipe, new: Recipe) -> list[str]:
    """Training-relevant keys that differ, as `key: old -> new`."""
    a, b = _flatten(saved.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    out = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in RESUME_SAFE_KEYS or key in ("name", "distributed.nproc"):
            continue
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def _flatten(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(x, dict) for x in d):
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


def truncate_logs(run: RunDir, step: int) -> None:
    """Drop log rows after the checkpoint we resume from (and lines torn by a kill), so every step
    appears exactly once."""
    for path in (run.metrics, run.completions):
        if path.is_file():
            kept = [line for line, row in jsonl_rows(path) if _step(row) <= step]
            atomic_write_text(path, "".join(x + "\n" for x in kept))


def _step(row: dict) -> int:
    try:
        return int(row.get("step", 0))
    except (TypeError, ValueError):
        return 0


def _clear_staging(run: RunDir) -> None:
    shutil.rmtree(run.checkpoints / ".staging", ignore_errors=True)


def _write_info(run: RunDir, recipe: Recipe, backend: str, status: str, step: int = 0, **extra) -> None:
    info = run.info() if run.exists() else {}
    info.update(
        model_name=recipe.model.name,
        base_model=info.get("base_model") or resolve_model(recipe.model.name),
        backend=backend,
        load_in_4bit=recipe.model.load_in_4bit,
        status=status,
        stage=recipe.stage,
        global_step=step,
        max_steps=recipe.training.max_steps,
        world_size=distributed.world().size,
    )
    info.update(extra)
    atomic_write_json(run.info_file, info)


def _preflight_disk(run: RunDir, recipe: Recipe, model) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    needed, keep = disk_needed(trainable, recipe.training)
    check_free_space(run.path, needed, f"{keep} checkpoint(s) and the adapter")


def _warn_if_not_fit(recipe: Recipe, console) -> None:
    message = warn_if_not_fit(recipe)
    if message:
        console.print(f"[yellow]plan:[/] {message}")


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "CUDA out of memory" in str(error)


def _try(fn):
    try:
        return fn()
    except Exception:
        return None


def out_of_memory_advice(recipe: Recipe, step: int, saved, run: RunDir, resume: str) -> str:
    """What to lower, with the plan's figures when it can make them (GPU OOM)."""
    t, g, m = recipe.training, recipe.generation, recipe.model
    lines = [
        f"out of GPU memory at step {step + 1}; checkpoint saved: {saved or 'none (the last complete one stays)'}",
        "  lower, biggest effect first:",
        f"    training.num_generations = {t.num_generations} (and per_device_train_batch_size = "
        f"{t.per_device_train_batch_size} with it)",
        f"    generation.max_completion_length = {g.max_completion_length}",
        f"    model.gpu_memory_utilization = {m.gpu_memory_utilization} (vLLM's share, unsloth) / "
        f"generation.vllm_gpu_memory_utilization = {g.vllm_gpu_memory_utilization}",
        f"    lora.r = {recipe.lora.r}; or set model.load_in_4bit = true, training.gradient_checkpointing = true",
    ]
    try:
        plan = make_plan(recipe)
        lines.append(
            f"  plan: estimated peak {plan.gib(plan.total)} GiB on {plan.gib(plan.card)} GiB; largest that fits: "
            f"num_generations {plan.max_generations or 'none'}, max_completion_length {plan.max_completion or 'none'}"
        )
    except Exception:
        pass
    lines.append(f"  then: {resume} --force --set ...")
    return "\n".join(lines)


def _quiet_default_printers(trainer) -> None:
    """Our display replaces the Trainer's tqdm bar and raw log-dict printer."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def save_checkpoint_now(trainer) -> Path | None:
    """A checkpoint now, on a failure of this process: with several processes the others are not saving with
    it (a checkpoint is a collective), so the last complete one stays."""
    if distributed.world().size > 1:
        return None
    trainer._save_checkpoint(trainer.model, None)
    return Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"


def save_adapter(trainer, tokenizer, run: RunDir) -> None:
    """The final adapter, written by the main process. Several processes: every one takes part in the
    Trainer's save_model (ZeRO-3 / FSDP gather the sharded weights there), which writes on the main one."""
    world = distributed.world()
    if world.size == 1:
        with atomic_dir(run.adapter, force=True, kind="adapter") as tmp:
            trainer.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return
    if not world.main:
        trainer.save_model(distributed.broadcast(None))
        distributed.barrier()
        return
    with atomic_dir(run.adapter, force=True, kind="adapter") as tmp:
        trainer.save_model(str(distributed.broadcast(str(tmp))))
        tokenizer.save_pretrained(tmp)
        distributed.barrier()


def _peer_gone(error: BaseException) -> bool:
    """A collective failed because another process of the job died (gloo/NCCL lost the connection)."""
    import torch.distributed as dist

    lost = ("Connection closed by peer", "Connection reset by peer", "gloo/transport")
    return isinstance(error, getattr(dist, "DistError", ())) or any(s in str(error) for s in lost)
