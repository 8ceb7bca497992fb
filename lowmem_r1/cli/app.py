"""The `lowmem-r1` command line: parse arguments, call the library, print. No logic lives here.

Heavy libraries (torch, trl, unsloth, vllm) are imported inside the library functions, so `--help`
and recipe validation are instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lowmem_r1.config.recipe import load_recipe
from lowmem_r1.core import allocator, distributed
from lowmem_r1.core.errors import UserError, printable
from lowmem_r1.data import TASKS
from lowmem_r1.data.generators import write_countdown
from lowmem_r1.data.preview import preview
from lowmem_r1.export.command import merge as run_merge
from lowmem_r1.generation.chat import ChatOptions
from lowmem_r1.generation.chat import chat as run_chat
from lowmem_r1.generation.engine import Sampling
from lowmem_r1.generation.evaluate import EvalSettings, evaluate
from lowmem_r1.generation.rejection import SampleSettings, print_result
from lowmem_r1.generation.rejection import sample as run_sample
from lowmem_r1.generation.serve import (
    SERVER_GPU_MEMORY_UTILIZATION,
    ServeSettings,
    parse_gpus,
)
from lowmem_r1.generation.serve import (
    serve as run_serve,
)
from lowmem_r1.models.backends import choose, cuda_available, preflight
from lowmem_r1.pipeline.multistage import (
    evaluate_pipeline,
    is_pipeline_dir,
    is_pipeline_file,
    load_pipeline,
    run_pipeline,
)
from lowmem_r1.pipeline.multistage import (
    print_dry_run as print_stages,
)
from lowmem_r1.pipeline.multistage import (
    report as pipeline_report,
)
from lowmem_r1.preflight.doctor import doctor as run_doctor
from lowmem_r1.preflight.plan import make_plan, print_plan
from lowmem_r1.preflight.rewards_check import (
    check_gold,
    parse_columns,
    read_completion,
    reward_table,
    score_completion,
)
from lowmem_r1.runs.report import report as run_report
from lowmem_r1.runs.rundir import RunDir
from lowmem_r1.training import launch
from lowmem_r1.training.measure import measure_recipe, print_measurement
from lowmem_r1.training.progress import print_dry_run
from lowmem_r1.training.run import Start, resume_command
from lowmem_r1.training.run import train as run_train

app = typer.Typer(
    name="lowmem-r1",
    help="Teach a small open model to reason with GRPO (DeepSeek-R1-Zero style) on one GPU, or on a CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: generate tasks, preview prompts.", no_args_is_help=True)
rewards_app = typer.Typer(help="The reward library: list, score, check.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(rewards_app, name="rewards")

_DEBUG = False

SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe key: section.key=value (repeatable).")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")) -> None:
    global _DEBUG
    _DEBUG = debug


@app.command()
def train(
    recipe: Path = typer.Argument(..., help="Recipe TOML file (see recipes/)."),
    run_dir: Optional[str] = typer.Argument(None, help="With --resume: the run directory (default: the recipe's)."),
    set_: Optional[List[str]] = SetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate, print the resolved recipe and exit."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its last complete checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start a new run over an existing run directory."),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", min=1, help="Processes (GPUs) on this node: runs this command under torchrun (DDP) or "
        "accelerate (distributed.strategy). Default: distributed.nproc."),
) -> None:
    """Train a recipe (GRPO, or stage = "sft"), or every stage of a [[stages]] pipeline; writes run directories."""
    if run_dir is not None and not resume:
        raise UserError(f"{run_dir}: a run directory is only taken with --resume (lowmem-r1 train RECIPE --resume RUN_DIR)")
    if is_pipeline_file(recipe):  # [[stages]]: a multi-stage recipe (lowmem_r1/pipeline/multistage.py)
        if nproc:
            raise UserError(f"{recipe}: --nproc: a multi-stage recipe runs in one process; train its stages one by "
                            f"one with --nproc (runs/<name>/<stage>), or drop --nproc")
        p = load_pipeline(recipe, set_ or [])
        if dry_run:
            print_stages(p)
            return
        raise typer.Exit(run_pipeline(p, resume=resume, force=force))
    overrides = list(set_ or [])
    if distributed.under_launcher():  # torchrun / accelerate started this process: their world size is the one
        overrides.append(f"distributed.nproc={distributed.world().size}")
    elif nproc:
        overrides.append(f"distributed.nproc={nproc}")
    r = load_recipe(recipe, overrides)
    n = r.distributed.nproc
    relaunch = n > 1 and not distributed.under_launcher()
    if dry_run:
        name = preflight(r)  # what select() would refuse here, before anything is printed as valid
        launch.check(r, n, name, machine=cuda_available(), source=str(recipe))
        print_dry_run(r, recipe)
        for line in launch.describe(r, n, sys.argv[1:]) if relaunch else []:
            print(line)
        return
    start = Start.resume(r, run_dir, force) if resume else Start.new(r, force)
    if relaunch:  # this command again, as n processes (lowmem_r1/training/launch.py)
        launch.check(r, n, choose(r.model.backend)[0], source=str(recipe))
        hint = resume_command(recipe, RunDir(start.run_dir), n)
        raise typer.Exit(launch.run(r, n, sys.argv[1:], start.run_dir, hint))
    code = run_train(r, recipe_path=recipe, start=start)
    raise typer.Exit(code)


@app.command()
def serve(
    recipe: Path = typer.Argument(..., help="Recipe TOML file, or a run directory (its recipe, for --resume)."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPUs for the server, e.g. 0 or 0,1 "
                                       "(CUDA_VISIBLE_DEVICES; default: all this process sees)."),
    tp: Optional[int] = typer.Option(None, "--tp", min=1, help="Tensor-parallel GPUs (default: "
                                     "generation.vllm_tensor_parallel_size)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to listen on (default: "
                                       "generation.vllm_server_host; 0.0.0.0 for every interface)."),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535,
                                       help="Port (default: generation.vllm_server_port)."),
    gpu_memory_utilization: float = typer.Option(
        SERVER_GPU_MEMORY_UTILIZATION, "--gpu-memory-utilization",
        help="Share of each server GPU for vLLM's weights + KV cache (TRL's vllm-serve default)."),
    set_: Optional[List[str]] = SetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Check, print the server's command and exit."),
) -> None:
    """Start TRL's vLLM server (trl vllm-serve) for the recipe's model on GPUs of its own, for
    generation.vllm_mode = "server": training then generates there and pushes its weights to it."""
    settings = ServeSettings(gpus=parse_gpus(gpus), tp=tp, host=host, port=port,
                             gpu_memory_utilization=gpu_memory_utilization)
    raise typer.Exit(run_serve(recipe, settings, set_ or [], dry_run=dry_run))


# --- data (DATA) -------------------------------------------------------------------------------------


@data_app.command("countdown")
def data_countdown(
    n: int = typer.Option(5000, "--n", help="Number of puzzles."),
    out: Path = typer.Option(..., "--out", help="Output .jsonl file (rows: nums, target, solution)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same file)."),
    min_numbers: int = typer.Option(3, "--min-numbers", help="Fewest numbers per puzzle."),
    max_numbers: int = typer.Option(4, "--max-numbers", help="Most numbers per puzzle."),
    max_number: int = typer.Option(99, "--max-number", help="Largest number drawn (from 1)."),
    max_target: int = typer.Option(100, "--max-target", help="Largest target."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
) -> None:
    """Generate solvable Countdown puzzles (use as data.source with task = "countdown")."""
    count = write_countdown(out, n=n, seed=seed, force=force, min_numbers=min_numbers, max_numbers=max_numbers,
                            max_number=max_number, max_target=max_target)
    print(f"wrote {count} puzzles to {out}")


@data_app.command("preview")
def data_preview(
    recipe: Path = typer.Argument(..., help="Recipe TOML file."),
    n: int = typer.Option(3, "-n", help="How many prompts to show."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Show prompts exactly as the model will see them, their reward columns and token lengths."""
    print(preview(load_recipe(recipe, set_ or []), n=n))


# --- rewards (REWARDS) -------------------------------------------------------------------------------


@rewards_app.command("list")
def rewards_list() -> None:
    """Every builtin reward: parameters (defaults), dataset columns, full marks, what it scores."""
    from rich.console import Console

    Console().print(reward_table())


@rewards_app.command("score")
def rewards_score(
    recipe: Path = typer.Argument(..., help="Recipe TOML file (its rewards, weights and dataset)."),
    text: Optional[str] = typer.Argument(None, help="The completion to score (\\n for newlines), or use --file."),
    file: Optional[str] = typer.Option(None, "--file", "-f", help="Read the completion from a file ('-': stdin)."),
    row: int = typer.Option(0, "--row", help="Dataset row whose prompt and columns to score against."),
    column: Optional[List[str]] = typer.Option(None, "--column", "-c", help="Override a column: name=value."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Score one completion with the recipe's rewards: each reward, its weight, the weighted total."""
    from rich.console import Console

    r = load_recipe(recipe, set_ or [])
    report = score_completion(r, read_completion(text, file), row_index=row, columns=parse_columns(column))
    Console().print(report.render())


@rewards_app.command("check")
def rewards_check(
    recipe: Path = typer.Argument(..., help="Recipe TOML file."),
    limit: int = typer.Option(200, "--limit", help="How many dataset rows to check."),
    min_share: float = typer.Option(0.9, "--min-share", help="Fail when fewer gold answers get full marks."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Score the dataset's gold answers (in the recipe's answer format): correct answers must get full marks."""
    from rich.console import Console

    report = check_gold(load_recipe(recipe, set_ or []), limit=limit, min_share=min_share)
    Console().print(report.render())
    for line in report.explain():
        print(line)
    if not report.ok:
        print(f"FAIL: {', '.join(c.name for c in report.failures)}: gold answers do not get full marks; fix the "
              f"reward parameters or the prompt's answer format before training")
        raise typer.Exit(1)
    print("ok: every reward with full marks gives them to the gold answers")


# --- plan / doctor (GPU) ----------------------------------------------------------------------------


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="Recipe TOML file."),
    gpu_memory: Optional[float] = typer.Option(
        None, "--gpu-memory", help="Card memory in GiB (default: the detected GPU, else 24)."
    ),
    set_: Optional[List[str]] = SetOpt,
    measure: bool = typer.Option(
        False, "--measure", help="Also run two GRPO steps on random weights here and print the measured peak."
    ),
    gpus: Optional[int] = typer.Option(
        None, "--gpus", help="Training processes (GPUs): memory per GPU (default: distributed.nproc); a vLLM "
        "server's GPUs come on top."),
    strategy: Optional[str] = typer.Option(
        None, "--strategy", help="ddp | zero2 | zero3 | fsdp2: what is sharded over --gpus (default: "
        "distributed.strategy)."),
) -> None:
    """Estimate peak GPU memory from the model's config (no weights downloaded): breakdown, verdict, and
    the largest num_generations / max_completion_length that fit; --measure measures it on this machine.
    With --gpus/--strategy per GPU of a sharded run; with vllm_mode = "server" the server's GPUs too."""
    r = load_recipe(recipe, set_ or [])
    plan = make_plan(r, gpu_memory, search=not measure, gpus=gpus, strategy=strategy)
    print_plan(plan)
    if measure:
        print_measurement(plan, measure_recipe(r))


@app.command()
def doctor(
    recipe: Optional[Path] = typer.Argument(None, help="Also check that this recipe can run here."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Check Python, torch, the GPU, library versions, backend choice and disk; exit 1 if something is red."""
    raise typer.Exit(run_doctor(str(recipe) if recipe else None, set_ or []))


# --- merge / GGUF export ----------------------------------------------------------------------------


@app.command()
def merge(
    target: Optional[str] = typer.Argument(
        None, help="Run directory or adapter folder (default: the newest run in runs/)."
    ),
    base: Optional[str] = typer.Option(None, "--base", help="Base model (default: the one the run recorded)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN_DIR/merged)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16 | fp16 | fp32, or bfloat16 | float16 | float32 (default: the base's dtype)."),
    gguf: Optional[List[str]] = typer.Option(
        None, "--gguf", help="Also write GGUF files: f16,bf16,f32,q8_0,q4_0,q4_1,q5_0,q5_1 (pure Python); "
        "q2_k,q3_k_m,q4_k_s,q4_k_m,q5_k_s,q5_k_m,q6_k need llama-quantize on PATH. Comma-separated or repeated."
    ),
    ollama: bool = typer.Option(False, "--ollama", help="Write an Ollama Modelfile next to the GGUF."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Merge a LoRA adapter into its 16-bit base (verified against peft), optionally export GGUF + Modelfile."""
    result = run_merge(target, base=base, out=out, dtype=dtype, gguf=gguf, ollama=ollama, force=force)
    print("\n".join(result.next_steps()))


# --- chat / eval / report ---------------------------------------------------------------------------

EngineOpt = typer.Option("auto", "--engine", help="auto | hf | unsloth | vllm (auto: vLLM/Unsloth on a GPU).")


@app.command()
def chat(
    model: Optional[str] = typer.Argument(
        None, help="Run directory, merged folder, .gguf file, hub id or builtin alias (default: the newest in runs/)."
    ),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer once and exit: the answer alone on stdout."),
    compare: Optional[str] = typer.Option(
        None, "--compare", help="Ask a second model too, side by side; `base` = the run's base model.",
    ),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (default: the run's trained one)."),
    think: bool = typer.Option(True, "--think/--no-think", help="Show the <think>/<reasoning> part (dimmed)."),
    temperature: float = typer.Option(0.6, "--temperature", "-t", min=0, help="0 = greedy."),
    top_p: float = typer.Option(0.95, "--top-p", min=0, max=1),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1),
    seed: Optional[int] = typer.Option(None, "--seed"),
    engine: str = EngineOpt,
) -> None:
    """Talk to a model: tokens stream as generated, reasoning dimmed and apart. /reset /system /think /exit."""
    opts = ChatOptions(Sampling(temperature, top_p, max_new_tokens, seed), system=system, think=think, engine=engine)
    raise typer.Exit(run_chat(model, opts, prompt=prompt, compare=compare))


@app.command("eval")
def eval_(
    target: str = typer.Argument(..., help="Run directory, recipe .toml, or a model (with --data and --task)."),
    baseline: bool = typer.Option(False, "--baseline", help="Also score the base model; print the difference."),
    model: Optional[str] = typer.Option(None, "--model", help="Model to score on a recipe's eval split."),
    data: Optional[str] = typer.Option(None, "--data", help="Eval file (jsonl/json/parquet/csv) or hub dataset."),
    task: Optional[str] = typer.Option(None, "--task", help=" | ".join(TASKS) + "."),
    reward: Optional[List[str]] = typer.Option(None, "--reward", help="Score these rewards instead (repeatable)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Prompts to score (default: eval.size)."),
    samples: int = typer.Option(1, "--samples", "-k", min=1, help="Samples per prompt: pass@k and maj@k."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0, help="Default: greedy (k=1)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Completions per batch."),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Results folder (default: RUN_DIR/eval/<time>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out folder."),
    engine: str = EngineOpt,
) -> None:
    """Score a model on held-out prompts: strict and lenient accuracy, each reward, length (+ base model)."""
    settings = EvalSettings(samples=samples, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            temperature=temperature, seed=seed, baseline=baseline, engine=engine, out=out,
                            force=force)
    if is_pipeline_dir(target):  # every stage of a multi-stage run, one table
        evaluate_pipeline(Path(target), settings)
    else:
        evaluate(target, settings, model=model, data=data, task=task, rewards=reward or None)


@app.command()
def sample(
    model: str = typer.Argument(..., help="Model to sample from: run directory, merged folder, hub id or builtin alias."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe whose prompts (data, prompt) and rewards are used."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (samples.jsonl, pass_rates.jsonl, ...)."),
    k: int = typer.Option(4, "-k", min=1, help="Completions generated per prompt."),
    keep: int = typer.Option(1, "--keep", min=1, help="At most this many kept (deduplicated) completions per prompt."),
    min_reward: Optional[float] = typer.Option(
        None, "--min-reward", help="Keep completions whose weighted reward total reaches this (default: full marks on "
        "the correctness reward)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Prompts to sample (default: all)."),
    split: str = typer.Option("train", "--split", help="train | eval: which of the recipe's splits."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.01),
    top_p: float = typer.Option(0.95, "--top-p", min=0, max=1),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Completions per generation batch."),
    seed: int = typer.Option(0, "--seed"),
    grpo_prompts: bool = typer.Option(False, "--grpo-prompts", help="Also write grpo_prompts.jsonl: the prompts "
                                      "some but not all samples solved (groups that give GRPO a learning signal)."),
    force: bool = typer.Option(False, "--force", help="Start over in an --out folder sampled with other settings."),
    set_: Optional[List[str]] = SetOpt,
    engine: str = EngineOpt,
) -> None:
    """Rejection sampling / distillation data: k completions per prompt, scored by the recipe's rewards; keeps
    those that pass as SFT-ready JSONL. Resumable: a rerun skips prompts already sampled."""
    from rich.console import Console

    settings = SampleSettings(k=k, keep=keep, min_reward=min_reward, limit=limit, split=split, temperature=temperature,
                              top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                              engine=engine, grpo_prompts=grpo_prompts, force=force)
    result = run_sample(model, load_recipe(recipe, set_ or []), out, settings)
    print_result(result, k, Console())


@app.command()
def report(
    run_dir: Optional[Path] = typer.Argument(None, help="Run directory (default: the newest in runs/)."),
    samples: int = typer.Option(2, "--samples", min=0, help="Sample completions shown from the start and the end."),
) -> None:
    """Plot a run's curves to RUN_DIR/report/*.png and summarize it (works while training runs)."""
    if run_dir is not None and is_pipeline_dir(run_dir):
        pipeline_report(run_dir, per_end=samples)
        return
    run_report(run_dir, per_end=samples)


THIRD_PARTY = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "huggingface_hub", "unsloth",
               "vllm", "bitsandbytes", "fsspec", "filelock")


def quiet_third_party() -> None:
    """The toolkit's output is its own: libraries' warnings and log lines are off (--debug turns them
    back on), and their progress bars too when the output is not a terminal (a pipe, a log file)."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")  # it logs a bad file at ERROR; we say it in one line
    if not sys.stderr.isatty():
        for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
            os.environ.setdefault(name, "1")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.CRITICAL if name == "datasets" else logging.ERROR)
        warnings.filterwarnings("ignore", module=rf"{name}(\.|$)")


def main() -> None:
    if "--debug" not in sys.argv[1:]:
        quiet_third_party()
    try:
        allocator.reexec(sys.argv[1:])
        code = app(standalone_mode=False)  # click returns a typer.Exit's code here instead of raising it
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as e:
        if _DEBUG:
            raise
        print(f"error{_rank()}: {printable(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # the environment, not a bug: a file in the way, a read-only or full disk
        if _DEBUG:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {printable(where)}{printable(e.strerror or e)}; check the path and its permissions, or choose another one",
              file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # a usage error from typer's click layer
            e.show()
            sys.exit(2)
        if _DEBUG:
            raise
        print(f"error{_rank()}: {type(e).__name__}: {printable(e)} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


def _rank() -> str:
    """Which process said it, when there are several (torchrun, accelerate launch)."""
    w = distributed.world()
    return f" (rank {w.rank})" if w.size > 1 else ""


if __name__ == "__main__":
    main()
