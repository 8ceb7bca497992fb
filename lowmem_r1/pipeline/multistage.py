"""Multi-stage recipes: the R1 pipeline (cold-start SFT -> GRPO -> rejection sampling -> SFT -> GRPO,
or a teacher's accepted traces distilled into a student) in one TOML, run by `lowmem-r1 train`.

    name = "pipeline-demo"
    [model] / [lora] / [data] / [[rewards]] / [training] / ...   the shared base recipe
    [pipeline]
    eval = true                     # evaluate every stage (and the base) into one table at the end
    [[stages]]
    name = "cold-start"
    stage = "sft"                   # sft | grpo | sample
    training = { max_steps = 30 }   # any recipe keys: merged over the base (tables deeply, lists replaced)
    [[stages]]
    name = "grpo"                   # stage = "grpo" is the default
    from = "cold-start"             # default: the previous training stage; "base": a fresh LoRA
    [[stages]]
    name = "rejection"
    stage = "sample"                # lowmem-r1 sample from `from` (or teacher = "any model": distillation)
    sample = { k = 4, keep = 1, limit = 200 }
    [[stages]]
    name = "distill"
    stage = "sft"
    from = "base"
    data = { source = "stage:rejection" }   # the kept samples of stage `rejection`

How a stage starts from the previous one: its LoRA adapter is *continued* (loaded into a LoRA of the same
shape on the same base, model.adapter), not merged. Every stage directory stays an ordinary run directory
(base + adapter), so `merge`, `chat`, `eval --baseline` work on it unchanged and compare against the same
base; no 16-bit merged copy is written per stage; and a 4-bit (QLoRA) base is never re-quantized, which a
merge-then-reload would do (lossy). The cost: continued stages share [lora] (checked at --dry-run); a
stage that needs another LoRA starts from "base".

Layout: runs/<name>/pipeline.json (stages, times, evals), runs/<name>/<stage>/ (a run directory, or a
sample folder). A completed stage is skipped on rerun; an interrupted one is continued by --resume.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from lowmem_r1.config.recipe import Recipe, apply_override, load_recipe, recipe_from_dict
from lowmem_r1.config.stages import STAGES
from lowmem_r1.core.errors import UserError
from lowmem_r1.core.fsutil import atomic_write_json, check_writable, is_ours, mark
from lowmem_r1.generation.engine import resolve_ref
from lowmem_r1.generation.evaluate import EvalSettings, EvalTarget, evaluate_target
from lowmem_r1.generation.rejection import SampleSettings, print_result, sample
from lowmem_r1.runs.report import report as run_report
from lowmem_r1.runs.rundir import RunDir
from lowmem_r1.training import progress
from lowmem_r1.training.run import Start, recipe_diff, train

SAMPLE = "sample"  # a pipeline step of its own: `lowmem-r1 sample`, not a training stage
KINDS = (*STAGES, SAMPLE)
STAGE_KEYS = {"name", "stage", "from", "teacher", "sample"}
MARKER = "pipeline.json"
KIND = "pipeline directory"  # fsutil's output kind: --force replaces only a pipeline directory we wrote


@dataclass
class Stage:
    name: str
    kind: str
    recipe: Recipe
    """The resolved recipe (for sample: its prompts, rewards and generation settings)."""
    dir: Path
    start: str
    """"base", or the stage whose adapter a training stage continues / a sample stage samples from."""
    model: str | None = None
    """A sample stage's model (a teacher); None: the start stage's run directory or the base."""
    sample: dict = field(default_factory=dict)

    def done(self) -> bool:
        if self.kind == SAMPLE:
            return (self.dir / "sample.json").is_file()
        return RunDir(self.dir).exists() and RunDir(self.dir).info().get("status") == "completed"

    def started(self) -> bool:
        """A training stage that got as far as training (run.json written): --resume continues it."""
        return RunDir(self.dir).exists()


@dataclass
class Pipeline:
    name: str
    path: Path
    """The TOML file."""
    dir: Path
    base: dict
    stages: list[Stage]
    eval: bool = True


def is_pipeline_file(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix != ".toml" or not path.is_file():
        return False
    try:
        return "stages" in tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False


def is_pipeline_dir(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


# --------------------------------------------------------------------------------------------------
# Loading: every stage resolved and validated before anything runs


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Read a [[stages]] TOML; `--set` overrides apply to the shared base, or to one stage as
    `stages.<index>.<key>=value`. One-line errors name the stage."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e}); fix the syntax at that line") from None
    for item in overrides or []:  # `training.x=..` sets the base, `stages.1.training.x=..` one stage
        apply_override(raw, item)
    stages_raw = raw.pop("stages")
    options = raw.pop("pipeline", {})
    if not isinstance(stages_raw, list) or not stages_raw:
        raise UserError(f"{path}: [[stages]] is empty; add at least one [[stages]] table")
    unknown = set(options) - {"eval"}
    if unknown:
        raise UserError(f"{path}: pipeline.{sorted(unknown)[0]}: unknown key; [pipeline] takes: eval")
    raw.setdefault("name", path.stem)
    name = raw["name"]
    out = Path(raw.get("output", {}).get("dir") or Path("runs") / name)
    stages: list[Stage] = []
    names: list[str] = []
    for i, st in enumerate(stages_raw):
        where = f"{path}: stages[{i}]"
        if not isinstance(st, dict) or not st.get("name"):
            raise UserError(f"{where}: every stage needs a name (name = \"cold-start\")")
        sname = str(st["name"])
        where = f"{path}: stages[{i}] ({sname})"
        if sname in names or sname == "base" or "/" in sname:
            raise UserError(f"{where}: name must be unique, not 'base', without '/'")
        kind = st.get("stage", "grpo")
        if kind not in KINDS:
            raise UserError(f"{where}: stage = {kind!r}; use one of {', '.join(KINDS)}")
        trained = [s.name for s in stages if s.kind != SAMPLE]
        start = st.get("from", trained[-1] if trained else "base")
        if start != "base" and start not in names:
            raise UserError(f"{where}: from = {start!r} is not an earlier stage; earlier stages: "
                            f"{', '.join(names) or 'none'} (or \"base\")")
        if start != "base" and next(s for s in stages if s.name == start).kind == SAMPLE:
            raise UserError(f"{where}: from = {start!r} is a sample stage, which has no model; start from a "
                            f"training stage, or train on its samples with data.source = \"stage:{start}\"")
        stage_raw = _merge(copy.deepcopy(raw), {k: v for k, v in st.items() if k not in STAGE_KEYS})
        stage_raw["name"] = f"{name}.{sname}"
        stage_raw["stage"] = kind if kind in STAGES else "grpo"  # a sample stage reads a GRPO recipe's prompts
        stage_raw.setdefault("output", {})["dir"] = str(out / sname)
        data = stage_raw.setdefault("data", {})
        own = st.get("data", {}) if isinstance(st.get("data"), dict) else {}
        if "source" in own and "generator" not in own:  # the base's generator parameters belong to the base's source
            data.pop("generator", None)
        source, later = str(data.get("source", "")), None
        if source.startswith("stage:"):
            ref = source.split(":", 1)[1]
            match = next((s for s in stages if s.name == ref), None)
            if match is None or match.kind != SAMPLE:
                raise UserError(f"{where}: data.source = {source!r}: no earlier sample stage {ref!r}; sample "
                                f"stages so far: {', '.join(s.name for s in stages if s.kind == SAMPLE) or 'none'}")
            samples = str(match.dir / "samples.jsonl")
            data.pop("generator", None)
            data.pop("eval_split", None)
            # validated as soon as it exists; before that (a dry run, a first run) the rest of the stage is
            # validated with a stand-in source, and the path is set after
            data["source"] = samples if Path(samples).is_file() else "builtin:arithmetic"
            later = None if Path(samples).is_file() else samples
        if start != "base" and kind != SAMPLE:
            stage_raw.setdefault("model", {})["adapter"] = str(out / start)
        recipe = recipe_from_dict(stage_raw, source=where)
        if later:
            recipe.data.source = later
        if start != "base" and kind != SAMPLE:
            prev = next(s for s in stages if s.name == start)
            if recipe.lora != prev.recipe.lora or recipe.model.name != prev.recipe.model.name:
                raise UserError(f"{where}: [lora] or model.name differs from stage {start!r}, whose adapter it "
                                f"continues; keep them the same, or start this stage from \"base\"")
        sample = dict(st.get("sample", {}))
        if kind == SAMPLE:
            _check_sample(sample, where)
        elif "sample" in st:
            raise UserError(f"{where}: `sample` settings only apply to stage = \"sample\"")
        if "teacher" in st and kind != SAMPLE:
            raise UserError(f"{where}: `teacher` only applies to stage = \"sample\"")
        stages.append(Stage(sname, kind, recipe, out / sname, start, st.get("teacher"), sample))
        names.append(sname)
    return Pipeline(name, path, out, raw, stages, bool(options.get("eval", True)))


def _merge(base: dict, over: dict) -> dict:
    """Stage keys over the base: tables merge key by key, everything else (lists: [[rewards]]) is replaced."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def _check_sample(sample: dict, where: str) -> None:
    from dataclasses import fields

    allowed = {f.name for f in fields(SampleSettings)} - {"force"}
    bad = sorted(set(sample) - allowed)
    if bad:
        raise UserError(f"{where}: sample.{bad[0]}: unknown; sample takes {', '.join(sorted(allowed))}")


# --------------------------------------------------------------------------------------------------
# Dry run


def print_dry_run(p: Pipeline, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    table = Table(title=f"pipeline {p.path} -> {p.dir} ({len(p.stages)} stages, every one resolved and validated)")
    for col in ("#", "stage", "kind", "starts from", "data", "steps / sampling", "run directory"):
        table.add_column(col)
    for i, s in enumerate(p.stages, 1):
        r = s.recipe
        if s.kind == SAMPLE:
            start = f"samples {s.model or ('base model' if s.start == 'base' else s.start)}"
            work = ", ".join(f"{k}={v}" for k, v in s.sample.items()) or "defaults"
        else:
            start = "fresh LoRA on the base" if s.start == "base" else f"{s.start} (adapter continued)"
            work = f"{r.training.max_steps} steps, lr {r.training.learning_rate:g}"
        table.add_row(str(i), s.name, s.kind, start, r.data.source, work, str(s.dir))
    console.print(table)
    console.print(f"base model: {p.stages[0].recipe.model.name}; eval after the stages: "
                  f"{'yes (one table)' if p.eval else 'no'}; --set stages.N.key=value changes one stage")


# --------------------------------------------------------------------------------------------------
# Running


def run_pipeline(p: Pipeline, resume: bool = False, force: bool = False, console=None) -> int:
    """Run every stage not yet done; returns the exit code (130 when a stage was interrupted)."""
    console = console or progress.make_console()
    marker = p.dir / MARKER
    check_writable(p.dir)
    if p.dir.exists() and not is_ours(p.dir, KIND):
        raise UserError(f"{p.dir}: exists and is not a pipeline directory lowmem-r1 wrote; set output.dir to another "
                        f"folder")
    if force and p.dir.exists():
        shutil.rmtree(p.dir)
    state = _state(p)
    for i, s in enumerate(p.stages, 1):
        head = f"[bold]stage {i}/{len(p.stages)}[/] [cyan]{s.name}[/] ({s.kind})"
        if s.done():
            if s.kind != SAMPLE:
                diff = recipe_diff(load_recipe(RunDir(s.dir).recipe, check_rewards=False), s.recipe)
                if diff:
                    raise UserError(f"{p.path}: stage {s.name} was completed with another recipe ({diff[0]}); "
                                    f"pass --force to run the pipeline over")
            console.print(f"{head}: done, skipped")
            continue
        started, cpu = time.time(), time.process_time()  # CPU time too: wall time on a shared machine says little
        if s.kind == SAMPLE:
            console.print(f"{head}: sampling from {_sample_model(p, s)}")
            try:
                result = sample(_sample_model(p, s), s.recipe, s.dir, SampleSettings(**s.sample), console=console)
            except UserError as e:  # the fix is in this stage's `sample = {...}`, not on a command line
                raise UserError(f"{p.path}: stage {s.name}: {e} (this stage's keys: sample.min_reward, sample.k, "
                                f"sample.temperature)") from None
            print_result(result, SampleSettings(**s.sample).k, console)
            state["stages"][s.name] = {"seconds": round(time.time() - started, 1), "kept": result.kept,
                                       "generated": result.generated, "mean_pass_rate":
                                           sum(result.pass_rates) / max(1, len(result.pass_rates))}
        else:
            was_started = s.started()
            if was_started and not resume:
                raise UserError(f"{s.dir}: stage {s.name} was interrupted; continue it with lowmem-r1 train {p.path} "
                                f"--resume (or --force to run the pipeline over)")
            console.print(f"{head}: " + ("fresh LoRA on the base" if s.start == "base"
                                         else f"continuing the adapter of {s.start}"))
            start = Start.resume(s.recipe, s.dir) if was_started else Start.new(s.recipe)
            code = train(s.recipe, recipe_path=p.path, start=start, console=console)
            if code:
                console.print(f"pipeline stopped in stage {s.name}; continue with: lowmem-r1 train {p.path} --resume")
                return code
            state["stages"][s.name] = {"seconds": RunDir(s.dir).info().get("seconds")}
        state["stages"][s.name]["cpu_seconds"] = round(time.process_time() - cpu, 1)
        atomic_write_json(marker, state)
    if p.eval:
        evaluate_pipeline(p.dir, _eval_settings(), console=console, pipeline=p)
    else:
        print_table(p.dir, console)
    return 0


def _state(p: Pipeline) -> dict:
    marker = p.dir / MARKER
    state = json.loads(marker.read_text()) if marker.is_file() else {}
    state.update(name=p.name, recipe=str(p.path), stages=state.get("stages", {}),
                 order=[s.name for s in p.stages], kinds={s.name: s.kind for s in p.stages})
    p.dir.mkdir(parents=True, exist_ok=True)
    mark(p.dir, KIND)
    atomic_write_json(marker, state)
    return state


def _sample_model(p: Pipeline, s: Stage) -> str:
    if s.model:
        return s.model
    return str(p.dir / s.start) if s.start != "base" else s.recipe.model.name


# --------------------------------------------------------------------------------------------------
# One table: every stage's time and eval


def _eval_settings():
    return EvalSettings()


def evaluate_pipeline(path: Path, settings, console=None, pipeline: Pipeline | None = None) -> dict:
    """Evaluate the base and every training stage on the same held-out prompts and rewards (the first GRPO
    stage's: _eval_recipe); results go to each stage's eval/ folder and
    pipeline.json. `eval --baseline` is implied: the base model is the table's first row."""
    from rich.console import Console

    console = console or Console()
    state = json.loads((path / MARKER).read_text())
    p = pipeline or load_pipeline(state["recipe"])
    reference = _eval_recipe(p)
    quiet = Console(stderr=True, quiet=True)
    evals = state.setdefault("evals", {})
    targets = [("base", resolve_ref(reference.model.name), path / "eval-base")]
    for s in p.stages:
        if s.kind != SAMPLE and s.done():
            targets.append((s.name, resolve_ref(s.dir), s.dir / "eval"))
    started, cpu = time.time(), time.process_time()
    for label, ref, root in targets:
        console.print(f"eval: {label} ...")
        t = EvalTarget(reference, ref, root)
        one = copy.copy(settings)
        one.baseline = False
        results = evaluate_target(t, one, quiet, label)
        evals[label] = results["metrics"]
    state["eval_time"] = {"seconds": round(time.time() - started, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}
    atomic_write_json(path / MARKER, state)
    print_table(path, console)
    return state


def _eval_recipe(p: Pipeline) -> Recipe:
    """The shared eval: the first GRPO stage's prompts and rewards (else the first stage's)."""
    grpo = [s for s in p.stages if s.kind in STAGES and STAGES[s.kind].rewarded]
    r = (grpo or p.stages)[0].recipe
    raw = r.model_dump(mode="json", exclude_none=True)
    raw["model"].pop("adapter", None)
    return recipe_from_dict(raw, source=f"{p.path} (eval)")


def print_table(path: Path, console) -> None:
    from rich.table import Table

    state = json.loads((Path(path) / MARKER).read_text())
    evals, stages = state.get("evals", {}), state.get("stages", {})
    table = Table(title=f"pipeline {state['name']} ({path})")
    for col in ("stage", "kind", "time", "accuracy", "lenient", "reward", "length", "kept/total"):
        table.add_column(col, justify="left" if col in ("stage", "kind") else "right")

    def pct(m, k):
        return "-" if not m or m.get(k) is None else f"{100 * m[k]:.1f}%"

    def num(m, k):
        return "-" if not m or m.get(k) is None else f"{m[k]:.3f}"

    rows = [("base", "-")] + [(n, state.get("kinds", {}).get(n, "?")) for n in state.get("order", [])]
    for name, kind in rows:
        st, m = stages.get(name, {}), evals.get(name)
        secs = st.get("seconds")
        kept = f"{st['kept']}/{st['generated']}" if "kept" in st else ""
        table.add_row(name, kind, "-" if secs is None else f"{secs:.0f} s", pct(m, "accuracy"),
                      pct(m, "accuracy_lenient"), num(m, "reward"), num(m, "completion_length"), kept)
    console.print(table)


def report(path: Path, console=None, per_end: int = 2) -> None:
    """`lowmem-r1 report PIPELINE_DIR`: the stage table, then each training stage's own report."""
    from rich.console import Console

    console = console or Console()
    print_table(path, console)
    state = json.loads((Path(path) / MARKER).read_text())
    for name in state.get("order", []):
        stage_dir = Path(path) / name
        if state.get("kinds", {}).get(name) != SAMPLE and (stage_dir / "run.json").is_file():
            console.rule(f"stage {name}")
            run_report(stage_dir, console=console, per_end=per_end)
