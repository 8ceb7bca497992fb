"""What a `lowmem-r1` command does past parsing its options, where it chooses between library paths: the
CLI (lowmem_r1/cli/) parses, calls one function here, prints. This layer may import both the single-run
code (training) and the multi-stage code (pipeline/multistage.py), which is why it lives here.

    train_command     a [[stages]] pipeline or one recipe; --dry-run; --resume / --force; --nproc relaunch
    evaluate_command  every stage of a pipeline directory, or one target (run, recipe, model)
    report_command    a pipeline directory's stages, or one run directory
    plan_command      the memory estimate, and with --measure the measured peak next to it
"""

from __future__ import annotations

from pathlib import Path

from lowmem_r1.config.recipe import load_recipe
from lowmem_r1.core import distributed
from lowmem_r1.core.errors import UserError
from lowmem_r1.generation.evaluate import EvalSettings, evaluate
from lowmem_r1.models.backends import choose, cuda_available, preflight
from lowmem_r1.pipeline.multistage import (
    evaluate_pipeline,
    is_pipeline_dir,
    is_pipeline_file,
    load_pipeline,
    run_pipeline,
)
from lowmem_r1.pipeline.multistage import print_dry_run as print_stages
from lowmem_r1.pipeline.multistage import report as pipeline_report
from lowmem_r1.preflight.plan import make_plan, print_plan
from lowmem_r1.runs.report import report as run_report
from lowmem_r1.runs.rundir import RunDir
from lowmem_r1.training import launch
from lowmem_r1.training.measure import measure_recipe, print_measurement
from lowmem_r1.training.progress import print_dry_run
from lowmem_r1.training.run import Start, resume_command
from lowmem_r1.training.run import train as run_train


def train_command(recipe_path: Path, run_dir: str | None, overrides: list[str], dry_run: bool, resume: bool,
                  force: bool, nproc: int | None, argv: list[str], console=None) -> int:
    """`lowmem-r1 train`: a multi-stage recipe runs its stages in this process; a single recipe trains here,
    or (distributed.nproc > 1, not yet under a launcher) relaunches `argv` (this command's arguments) as
    nproc processes under torchrun / accelerate. --dry-run validates and prints what would run. Returns
    the exit code."""
    if run_dir is not None and not resume:
        raise UserError(f"{run_dir}: a run directory is only taken with --resume (lowmem-r1 train RECIPE --resume RUN_DIR)")
    if is_pipeline_file(recipe_path):  # [[stages]]: a multi-stage recipe (lowmem_r1/pipeline/multistage.py)
        if nproc:
            raise UserError(f"{recipe_path}: --nproc: a multi-stage recipe runs in one process; train its stages one "
                            f"by one with --nproc (runs/<name>/<stage>), or drop --nproc")
        p = load_pipeline(recipe_path, overrides)
        if dry_run:
            print_stages(p, console)
            return 0
        return run_pipeline(p, resume=resume, force=force, console=console)
    overrides = list(overrides)
    if distributed.under_launcher():  # torchrun / accelerate started this process: their world size is the one
        overrides.append(f"distributed.nproc={distributed.world().size}")
    elif nproc:
        overrides.append(f"distributed.nproc={nproc}")
    r = load_recipe(recipe_path, overrides)
    n = r.distributed.nproc
    relaunch = n > 1 and not distributed.under_launcher()
    if dry_run:
        name = preflight(r)  # what select() would refuse here, before anything is printed as valid
        launch.check(r, n, name, machine=cuda_available(), source=str(recipe_path))
        print_dry_run(r, recipe_path, console)
        for line in launch.describe(r, n, argv) if relaunch else []:
            print(line)
        return 0
    start = Start.resume(r, run_dir, force) if resume else Start.new(r, force)
    if relaunch:  # this command again, as n processes (lowmem_r1/training/launch.py)
        launch.check(r, n, choose(r.model.backend)[0], source=str(recipe_path))
        hint = resume_command(recipe_path, RunDir(start.run_dir), n)
        return launch.run(r, n, argv, start.run_dir, hint)
    return run_train(r, recipe_path=recipe_path, start=start, console=console)


def evaluate_command(target: str, settings: EvalSettings, model: str | None = None, data: str | None = None,
                     task: str | None = None, rewards: list[str] | None = None, console=None) -> dict:
    """`lowmem-r1 eval`: every stage of a multi-stage run in one table, or one run directory, recipe or
    model. Returns the results."""
    if is_pipeline_dir(target):
        return evaluate_pipeline(Path(target), settings, console)
    return evaluate(target, settings, model=model, data=data, task=task, rewards=rewards, console=console)


def report_command(run_dir: Path | None, per_end: int = 2, console=None) -> None:
    """`lowmem-r1 report`: a multi-stage run's stages, or one run directory (default: the newest in runs/)."""
    if run_dir is not None and is_pipeline_dir(run_dir):
        pipeline_report(run_dir, console, per_end=per_end)
        return
    run_report(run_dir, console, per_end=per_end)


def plan_command(recipe_path: Path, overrides: list[str], gpu_memory: float | None = None, measure: bool = False,
                 gpus: int | None = None, strategy: str | None = None, console=None) -> None:
    """`lowmem-r1 plan`: the estimate from the model's config (with the search for what fits, unless it is
    measured), and with `measure` two GRPO steps on random weights here, printed next to it."""
    r = load_recipe(recipe_path, overrides)
    plan = make_plan(r, gpu_memory, search=not measure, gpus=gpus, strategy=strategy)
    print_plan(plan, console)
    if measure:
        print_measurement(plan, measure_recipe(r), console)
