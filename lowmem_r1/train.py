"""recipe -> GRPOConfig + GRPOTrainer -> run directory.

Read top to bottom: prepare the run directory (new, forced or resumed), pick the backend (before
anything imports trl: Unsloth must patch it first), load model + data + rewards, build TRL's config and
trainer, train with checkpoints that are renamed into place, save the adapter, summarise.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .errors import UserError
from .faults import maybe_fault
from .fsutil import atomic_dir, atomic_write_json, atomic_write_text, check_free_space
from .recipe import Recipe, load_recipe, recipe_to_toml
from .callbacks import Interrupt, MetricsLog
from .reward_guard import RewardFailure, RewardRecorder, guard_rewards
from .rundir import RunDir, checkpoint_step, disk_needed

# Recipe keys that may change between a run and its resumption without changing what is trained.
RESUME_SAFE_KEYS = {"logging", "output", "eval", "description"}


def train(recipe: Recipe, recipe_path: Path | None = None, resume: str | None = None, force: bool = False,
          console=None) -> int:
    """Run GRPO as the recipe says. Returns the process exit code (0 done, 130 interrupted)."""
    from . import progress

    console = console or progress.make_console()
    from . import backends

    # First: a refused GPU setting must not leave a run directory behind; and unsloth, when chosen, is
    # imported here (select calls backend.prepare()), before anything imports trl/transformers/peft.
    backend = backends.select(recipe)
    run, checkpoint = prepare_run_dir(recipe, resume, force)
    started = time.time()
    console.print(f"[bold]lowmem-r1[/] run [cyan]{run.path}[/] - backend [cyan]{backend.name}[/] ({backend.why})")
    _warn_if_not_fit(recipe, console)

    from transformers import set_seed

    set_seed(recipe.training.seed)  # LoRA's A matrices are drawn at random: same seed, same run
    model, tokenizer = backend.load(recipe)
    from .data import load_splits

    splits = load_splits(recipe, tokenizer)
    if splits.dropped:
        console.print(
            f"[yellow]data:[/] dropped {splits.dropped} prompt(s) longer than data.max_prompt_length = "
            f"{recipe.data.max_prompt_length} tokens"
        )
    if len(splits.train) == 0:
        raise UserError("data: no training rows left after filtering; raise data.max_prompt_length or check data.source")
    _preflight_disk(run, recipe, model)

    recorder = RewardRecorder(run.completions, recipe, start_step=checkpoint_step(checkpoint))
    reward_funcs, weights = guard_rewards(recipe, recorder)

    from trl import GRPOConfig

    from .compat import patch_trl_for_cpu

    patch_trl_for_cpu()

    config = GRPOConfig(**{**grpo_kwargs(recipe, run, weights), **backend.grpo_overrides(recipe)})
    interrupt = Interrupt()
    display = progress.TrainingDisplay(recipe, run, console, start_step=checkpoint_step(checkpoint))
    display.recorder = recorder
    trainer = trainer_class()(
        model=model,
        processing_class=tokenizer,
        reward_funcs=reward_funcs,
        args=config,
        train_dataset=splits.train,
        callbacks=[MetricsLog(run.metrics), display, interrupt],
    )
    _quiet_default_printers(trainer)
    _write_info(run, recipe, backend.name, status="running", step=checkpoint_step(checkpoint))

    with interrupt.installed(console), display:
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except RewardFailure as failure:
            saved = save_checkpoint_now(trainer)
            _write_info(run, recipe, backend.name, status="failed", step=trainer.state.global_step)
            raise UserError(
                f"{failure}\n  run stopped at step {trainer.state.global_step}; checkpoint: {saved}\n"
                f"  fix the reward (or set on_error = \"skip\" on it), then: lowmem-r1 train {recipe_path or 'RECIPE'} "
                f"--resume {run.path}"
            ) from None
        except Exception as error:
            if not _is_out_of_memory(error):
                raise
            saved = _try(lambda: save_checkpoint_now(trainer))
            _write_info(run, recipe, backend.name, status="failed", step=trainer.state.global_step)
            raise UserError(out_of_memory_advice(recipe, trainer.state.global_step, saved, run, recipe_path)) from None
        except KeyboardInterrupt:
            _write_info(run, recipe, backend.name, status="interrupted", step=trainer.state.global_step)
            last = run.checkpoint_dirs()
            console.print(
                f"\n[yellow]stopped now.[/] last complete checkpoint: {last[-1] if last else 'none'}\n"
                f"resume with: lowmem-r1 train {recipe_path or 'RECIPE'} --resume {run.path}"
            )
            return 130

    save_adapter(trainer, tokenizer, run)
    step = trainer.state.global_step
    if interrupt.requested:
        _write_info(run, recipe, backend.name, status="interrupted", step=step)
        console.print(
            f"\n[yellow]interrupted[/] at step {step}: checkpoint and adapter saved.\n"
            f"resume with: lowmem-r1 train {recipe_path or 'RECIPE'} --resume {run.path}"
        )
        return 130
    _write_info(run, recipe, backend.name, status="completed", step=step, seconds=round(time.time() - started, 1))
    progress.print_summary(run, console)
    return 0


# --------------------------------------------------------------------------------------------------
# The run directory: new, forced over an old one, or resumed


def prepare_run_dir(recipe: Recipe, resume: str | None, force: bool) -> tuple[RunDir, Path | None]:
    """A new run refuses to overwrite an old one without --force; --resume finds the last checkpoint."""
    if resume is not None:
        run = RunDir(Path(resume) if resume else recipe.run_dir())
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
        return run, checkpoint

    run = RunDir(recipe.run_dir())
    # A start that failed before training (bad data path, say) leaves only recipe.toml: reuse it.
    leftovers = {"recipe.toml", "checkpoints"}
    if run.path.exists() and any(p.name not in leftovers or run.checkpoint_dirs() for p in run.path.iterdir()):
        if not force:
            raise UserError(
                f"{run.path}: already holds a run; pass --resume to continue it, --force to start a new run "
                f"over it, or set output.dir to another folder"
            )
        shutil.rmtree(run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.recipe, recipe_to_toml(recipe))
    return run, None


def recipe_diff(saved: Recipe, new: Recipe) -> list[str]:
    """Training-relevant keys that differ, as `key: old -> new`."""
    a, b = _flatten(saved.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    out = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in RESUME_SAFE_KEYS or key == "name":
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
    """Drop log rows after the checkpoint we resume from, so every step appears exactly once."""
    for path in (run.metrics, run.completions):
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if int(row.get("step", 0)) <= step:
                kept.append(line)
        atomic_write_text(path, "".join(x + "\n" for x in kept))


def _clear_staging(run: RunDir) -> None:
    shutil.rmtree(run.checkpoints / ".staging", ignore_errors=True)


def _write_info(run: RunDir, recipe: Recipe, backend: str, status: str, step: int = 0, **extra) -> None:
    from .models import resolve_model

    info = run.info() if run.exists() else {}
    info.update(
        model_name=recipe.model.name,
        base_model=info.get("base_model") or resolve_model(recipe.model.name),
        backend=backend,
        load_in_4bit=recipe.model.load_in_4bit,
        status=status,
        global_step=step,
        max_steps=recipe.training.max_steps,
    )
    info.update(extra)
    atomic_write_json(run.info_file, info)


def _preflight_disk(run: RunDir, recipe: Recipe, model) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    needed, keep = disk_needed(trainable, recipe.training)
    check_free_space(run.path, needed, f"{keep} checkpoint(s) and the adapter")


def _warn_if_not_fit(recipe: Recipe, console) -> None:
    from .plan import warn_if_not_fit

    message = warn_if_not_fit(recipe)
    if message:
        console.print(f"[yellow]plan:[/] {message}")


# --------------------------------------------------------------------------------------------------
# TRL configuration


def grpo_kwargs(recipe: Recipe, run: RunDir, reward_weights: list[float]) -> dict:
    """The recipe's training and generation sections, as GRPOConfig keyword arguments."""
    t, g, log = recipe.training, recipe.generation, recipe.logging
    return dict(
        output_dir=str(run.checkpoints),
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_generations=t.num_generations,
        beta=t.beta,
        loss_type=t.loss_type,
        scale_rewards=t.scale_rewards,
        epsilon=t.epsilon,
        num_iterations=t.num_iterations,
        mask_truncated_completions=t.mask_truncated_completions,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of max_steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        gradient_checkpointing=t.gradient_checkpointing,
        seed=t.seed,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        repetition_penalty=g.repetition_penalty,
        reward_weights=reward_weights,
        logging_steps=log.logging_steps,
        report_to=list(log.report_to) or "none",
        disable_tqdm=True,
        log_completions=False,
    )


def trainer_class():
    """TRL's GRPOTrainer (Unsloth's patched one when unsloth was imported first) whose checkpoints are
    written to a staging folder and renamed into place, so a kill at any moment leaves the previous
    checkpoint whole, and whose rotation never deletes the newest complete checkpoint."""
    from trl import GRPOTrainer

    class LowmemGRPOTrainer(GRPOTrainer):
        def _save_checkpoint(self, model, trial):
            root = Path(self.args.output_dir)
            staging = root / ".staging"
            name = f"checkpoint-{self.state.global_step}"
            shutil.rmtree(staging, ignore_errors=True)
            limit = self.args.save_total_limit
            self.args.output_dir, self.args.save_total_limit = str(staging), None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir, self.args.save_total_limit = str(root), limit
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

    return LowmemGRPOTrainer


def _fsync_tree(path: Path) -> None:
    for p in Path(path).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "CUDA out of memory" in str(error)


def _try(fn):
    try:
        return fn()
    except Exception:
        return None


def out_of_memory_advice(recipe: Recipe, step: int, saved, run: RunDir, recipe_path) -> str:
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
        from .plan import make_plan

        plan = make_plan(recipe)
        lines.append(
            f"  plan: estimated peak {plan.gib(plan.total)} GiB on {plan.gib(plan.card)} GiB; largest that fits: "
            f"num_generations {plan.max_generations or 'none'}, max_completion_length {plan.max_completion or 'none'}"
        )
    except Exception:
        pass
    lines.append(f"  then: lowmem-r1 train {recipe_path or 'RECIPE'} --resume {run.path} --force --set ...")
    return "\n".join(lines)


def _quiet_default_printers(trainer) -> None:
    """Our display replaces the Trainer's tqdm bar and raw log-dict printer."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def save_checkpoint_now(trainer) -> Path:
    trainer._save_checkpoint(trainer.model, None)
    return Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"


def save_adapter(trainer, tokenizer, run: RunDir) -> None:
    with atomic_dir(run.adapter, force=True) as tmp:
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
