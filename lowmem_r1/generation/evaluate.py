"""`lowmem-r1 eval`: did training help? Accuracy and rewards on held-out prompts, before and after.

Two accuracies, because a small model often learns the answer before the format:
- strict: the recipe's correctness reward (a reward that reads the gold column and has full marks, e.g.
  answer_match) gives full marks, i.e. the answer is right in the format the run was trained on;
- lenient: the last number, the last \\boxed{} value or the extracted answer anywhere in the completion
  equals the gold answer.
Prompts are built exactly as in training (same data pipeline, same chat template), decoding is greedy
unless --samples k asks for pass@k and majority vote.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lowmem_r1.config.recipe import load_recipe, recipe_from_dict
from lowmem_r1.core.errors import UserError
from lowmem_r1.core.fsutil import atomic_dir, refuse_existing
from lowmem_r1.data import TASKS, get_task, load_splits
from lowmem_r1.generation.engine import (
    Completion,
    Decoding,
    Generator,
    ModelRef,
    load_generator,
    load_tokenizer,
    resolve_ref,
)
from lowmem_r1.models.names import is_hub_id
from lowmem_r1.rewards.extract import answers_equal, extract_answer, normalize_text, parse_number
from lowmem_r1.rewards.recipe_rewards import RecipeRewards, RewardError


@dataclass
class EvalSettings:
    samples: int = 1
    limit: int | None = None
    batch_size: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int = 0
    baseline: bool = False
    engine: str = "auto"
    out: Path | None = None
    force: bool = False


@dataclass
class EvalTarget:
    """What is evaluated, on which recipe (data pipeline + rewards), and where results go."""

    recipe: Any
    ref: ModelRef
    out_root: Path
    rows_from: str = "eval"  # "eval": the recipe's held-out split; "train": a --data file, all of it


@dataclass
class Scored:
    metrics: dict[str, float | None]
    records: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# What to evaluate


def resolve_target(target: str, model: str | None = None, data: str | None = None, task: str | None = None,
                   rewards: list[str] | None = None) -> EvalTarget:
    """A run directory, a recipe (its trained run if there is one, else its base model) or a model with
    --data and --task."""
    path = Path(target)
    if path.is_dir() and (path / "run.json").is_file():
        recipe = load_recipe(path / "recipe.toml") if (path / "recipe.toml").is_file() else None
        ref = resolve_ref(model or path)
        out_root = path / "eval"
        if recipe is None and not (data and task):
            raise UserError(f"{path}: no recipe.toml; pass --data FILE --task TASK to say what to evaluate on")
    elif path.suffix == ".toml":
        recipe = load_recipe(path)
        trained = recipe.run_dir()
        if model:
            ref = resolve_ref(model)
        elif (trained / "run.json").is_file():
            ref = resolve_ref(trained)
        else:
            ref = resolve_ref(recipe.model.name)
        is_trained = ref.run_dir is not None and ref.run_dir.resolve() == trained.resolve()
        out_root = trained / "eval" if is_trained else Path("runs") / "eval"
    else:
        if not path.exists() and not is_hub_id(target) and not target.startswith("builtin:"):
            raise UserError(f"eval {target}: no such run directory, recipe or model; pass the RUN_DIR that "
                            f"`lowmem-r1 train` wrote, a recipe .toml, or a model with --data and --task")
        if not (data and task):
            raise UserError(
                f"eval {target}: a model needs --data FILE --task TASK (or pass a run directory or a recipe)"
            )
        recipe, ref, out_root = None, resolve_ref(model or target), Path("runs") / "eval"
    if data or task or recipe is None:
        if not (data and task):
            raise UserError("eval: --data and --task go together; pass both")
        raw = recipe.model_dump(mode="json", exclude_none=True) if recipe is not None else {
            "name": "eval", "model": {"name": ref.base},
        }
        raw["data"] = {"source": data, "task": task, "shuffle": False}
        if rewards or recipe is None or recipe.data.task != task:  # another task needs its own rewards
            names = rewards or list(TASKS[task].rewards if task in TASKS else ["answer_match"])
            raw["rewards"] = [{"name": n} for n in names]
        try:
            recipe = recipe_from_dict(raw, source="eval")
        except UserError as e:  # name the flags the user typed, not the recipe keys they fill
            message = str(e).replace("data.source", "--data").replace("data.task", "--task")
            raise UserError(message.replace("rewards[", "--reward [")) from None
        return EvalTarget(recipe, ref, out_root, rows_from="train")
    if rewards:
        raw = recipe.model_dump(mode="json", exclude_none=True)
        raw["rewards"] = [{"name": n} for n in rewards]
        recipe = recipe_from_dict(raw, source="--reward")
    return EvalTarget(recipe, ref, out_root)


def eval_rows(target: EvalTarget, tokenizer, limit: int | None) -> list[dict]:
    """The held-out rows, built by the same data pipeline as training."""
    splits = load_splits(target.recipe, tokenizer)
    ds = splits.eval if target.rows_from == "eval" else splits.train
    if ds is None:
        raise UserError(
            f"recipe {target.recipe.name}: no held-out prompts; set data.eval_size (e.g. 50) or data.eval_split "
            f"in the recipe, or pass --data FILE --task TASK"
        )
    n = limit if limit is not None else (target.recipe.eval.size or len(ds))
    n = min(n, len(ds))
    if n == 0:
        raise UserError(f"recipe {target.recipe.name}: the eval split is empty")
    return [ds[i] for i in range(n)]


# --------------------------------------------------------------------------------------------------
# Scoring


def correctness_rewards(recipe) -> list[tuple[str, float]]:
    """[(name, full marks)] of the reward that judges the answer, or [] when none does."""
    judge = RecipeRewards.from_recipe(recipe).correctness()
    return [(judge.name, float(judge.full_marks))] if judge else []


def lenient_correct(text: str, gold: Any) -> bool:
    """The gold answer appears as the answer anywhere: tag/boxed/last number, whichever matches."""
    if gold is None:
        return False
    return any(answers_equal(extract_answer(text, mode), gold) for mode in ("auto", "boxed", "last_number"))


def _vote_key(text: str) -> str | None:
    ans = extract_answer(text, "auto")
    if ans is None:
        return None
    num = parse_number(ans)
    return repr(num) if num is not None else normalize_text(ans) or None


def score(recipe, rows: list[dict], outs: list[list[Completion]], label: str) -> Scored:
    """Every metric for one model's completions (`outs[i]`: the samples for `rows[i]`)."""
    rewards = RecipeRewards.from_recipe(recipe)
    k = len(outs[0]) if outs else 1
    prompts, completions, columns = [], [], {}
    texts = []
    for row, samples in zip(rows, outs):
        for c in samples:
            prompts.append(row["prompt"])
            texts.append(c.text)
            completions.append(rewards.wrap(c.text, row["prompt"]))
            for key, value in row.items():
                if key != "prompt":
                    columns.setdefault(key, []).append(value)
    ids = [c.ids for samples in outs for c in samples]
    try:
        values = rewards.score_all(prompts, completions, completion_ids=ids, **columns)
    except RewardError as e:  # on_error = "raise"; "skip" scores None
        raise UserError(f"reward {e.reward.name} failed during eval: {e}") from None
    judge = rewards.correctness()
    gold_col = get_task(recipe.data).gold_column
    has_gold = gold_col is not None and gold_col in columns
    n = len(texts)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    def is_strict(j):
        v = values[judge.name][j]
        return v is not None and v >= judge.full_marks - 1e-9

    metrics: dict[str, float | None] = {}
    metrics["accuracy"] = mean([float(is_strict(j)) for j in range(n)]) if judge else None
    lenient = [lenient_correct(texts[j], columns[gold_col][j]) for j in range(n)] if has_gold else None
    metrics["accuracy_lenient"] = mean([float(x) for x in lenient]) if lenient else None
    if k > 1:
        groups = [range(i * k, (i + 1) * k) for i in range(len(rows))]
        metrics[f"pass@{k}"] = mean([float(any(is_strict(j) for j in g)) for g in groups]) if judge else None
        if has_gold:
            votes = []
            for g in groups:
                keys = [kk for kk in (_vote_key(texts[j]) for j in g) if kk is not None]
                if not keys:
                    votes.append(0.0)
                    continue
                winner = Counter(keys).most_common(1)[0][0]
                pick = next(texts[j] for j in g if _vote_key(texts[j]) == winner)
                votes.append(float(answers_equal(_extracted(pick), columns[gold_col][g[0]])))
            metrics[f"maj@{k}"] = mean(votes)
    totals = [rewards.total(v[j] for v in values.values()) for j in range(n)]
    metrics["reward"] = mean(totals)
    for name, v in values.items():
        metrics[f"rewards/{name}"] = mean(v)
    metrics["completion_length"] = mean([c.tokens for s in outs for c in s])
    metrics["clipped_ratio"] = mean([float(c.clipped) for s in outs for c in s])
    records = []
    for j in range(n):
        rec = {"model": label, "index": j // k, "sample": j % k, "prompt": prompts[j], "completion": texts[j],
               "tokens": ids and len(ids[j]), "rewards": {nm: v[j] for nm, v in values.items()}}
        if judge:
            rec["strict"] = is_strict(j)
        if has_gold:
            rec["gold"] = columns[gold_col][j]
            rec["extracted"] = _extracted(texts[j])
            rec["lenient"] = lenient[j]
        records.append(rec)
    return Scored(metrics, records)


def _extracted(text: str) -> str | None:
    return extract_answer(text, "auto")


# --------------------------------------------------------------------------------------------------
# Generation


def generate_all(gen: Generator, prompt_ids: list[list[int]], sampling: Decoding, samples: int, batch_size: int,
                 progress=None, task=None) -> list[list[Completion]]:
    """Batched generation, longest prompts first (least padding), results in the original order."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    per_batch = max(1, batch_size // samples)
    outs: list[list[Completion] | None] = [None] * len(prompt_ids)
    for start in range(0, len(order), per_batch):
        idx = order[start:start + per_batch]
        got = gen.generate([prompt_ids[i] for i in idx], sampling, n=samples)
        for i, g in zip(idx, got):
            outs[i] = g
        if progress is not None:
            progress.advance(task, len(idx))
    return outs  # type: ignore[return-value]


def evaluate(target: str, settings: EvalSettings, model: str | None = None, data: str | None = None,
             task: str | None = None, rewards: list[str] | None = None, console=None) -> dict:
    """Evaluate, print a table, save results.json + generations.jsonl; returns the results."""
    return evaluate_target(resolve_target(target, model, data, task, rewards), settings, console, target)


def evaluate_target(t: EvalTarget, settings: EvalSettings, console=None, target: str = "") -> dict:
    """Evaluate one resolved target (a model on a recipe's prompts and rewards)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    console = console or Console()
    target = target or t.ref.label
    if settings.baseline and t.ref.adapter is None:
        raise UserError(f"eval {target}: --baseline compares a trained run with its base; {t.ref.label} has no "
                        f"adapter (pass a run directory, or evaluate the base model on its own)")
    if settings.samples < 1:
        raise UserError(f"--samples {settings.samples}: must be at least 1")
    if settings.out is not None:  # fail before the work, not after it
        refuse_existing(Path(settings.out), settings.force, "eval results folder", inputs=_inputs(t))
    recipe = t.recipe
    tokenizer = load_tokenizer(t.ref)
    rows = eval_rows(t, tokenizer, settings.limit)
    sampling = _sampling(recipe, settings)
    batch = settings.batch_size or recipe.eval.batch_size
    started = time.time()
    results: dict[str, Any] = {
        "model": t.ref.label, "base_model": t.ref.base, "adapter": str(t.ref.adapter) if t.ref.adapter else None,
        "recipe": recipe.name, "task": recipe.data.task, "data": recipe.data.source, "prompts": len(rows),
        "samples": settings.samples, "sampling": vars(sampling), "strict_reward":
            (correctness_rewards(recipe) or [(None, None)])[0][0],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with err.status(f"loading {t.ref.label} ...", spinner="dots"):
        gen = load_generator(t.ref, settings.engine, tokenizer=tokenizer)
    results["engine"] = gen.engine
    prompt_ids = [gen.encode(r["prompt"]) for r in rows]
    scored: dict[str, Scored] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as progress:
        for which in (["tuned", "base"] if settings.baseline else ["model"]):
            if which == "base":
                with err.status(f"loading the base model {t.ref.base} ...", spinner="dots"):
                    gen = gen.for_base()
            bar = progress.add_task(f"{which}: generating", total=len(rows))
            t0 = time.time()
            outs = generate_all(gen, prompt_ids, sampling, settings.samples, batch, progress, bar)
            s = score(recipe, rows, outs, which)
            s.metrics["seconds"] = round(time.time() - t0, 2)
            scored[which] = s
    gen.close()
    main = scored["tuned" if settings.baseline else "model"]
    results["metrics"] = main.metrics
    if settings.baseline:
        base = scored["base"].metrics
        results["baseline"] = {"model": t.ref.base, "metrics": base}
        results["difference"] = {k: v - base[k] for k, v in main.metrics.items()
                                 if isinstance(v, (int, float)) and isinstance(base.get(k), (int, float))
                                 and k != "seconds"}
    results["seconds"] = round(time.time() - started, 2)
    out = save(results, [r for s in scored.values() for r in s.records], t, settings)
    results["out_dir"] = str(out)
    print_results(results, console)
    console.print(f"saved {out}/results.json and {out}/generations.jsonl")
    return results


def _sampling(recipe, s: EvalSettings) -> Decoding:
    max_new = s.max_new_tokens or recipe.eval.max_new_tokens or recipe.generation.max_completion_length
    if s.samples > 1:  # pass@k needs diverse samples: the training temperature unless told otherwise
        temp = s.temperature if s.temperature is not None else recipe.generation.temperature
    else:
        temp = s.temperature or 0.0
    top_p = s.top_p if s.top_p is not None else (recipe.generation.top_p if temp > 0 else 1.0)
    if temp == 0 and s.samples > 1:
        raise UserError("--samples k > 1 needs sampling; pass --temperature above 0")
    return Decoding(temperature=temp, top_p=top_p, max_new_tokens=max_new, seed=s.seed)


def _inputs(t: EvalTarget) -> tuple:
    """What eval reads from local disk; its --out must not be, hold or lie inside any of them."""
    return (t.ref.base, t.ref.adapter, t.recipe.data.source)


def save(results: dict, records: list[dict], t: EvalTarget, s: EvalSettings) -> Path:
    """results.json + generations.jsonl in a new folder (<run>/eval/<time>/), renamed into place whole."""
    out = s.out or t.out_root / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    with atomic_dir(Path(out), s.force, "eval results folder", inputs=_inputs(t)) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        with open(tmp / "generations.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
    return Path(out)


def print_results(results: dict, console) -> None:
    from rich.table import Table

    main = results["metrics"]
    base = (results.get("baseline") or {}).get("metrics")
    diff = results.get("difference") or {}
    table = Table(title=f"eval: {results['model']} on {results['prompts']} {results['task']} prompts "
                        f"x {results['samples']} sample(s)")
    table.add_column("metric")
    table.add_column("tuned" if base else "model", justify="right")
    if base is not None:
        table.add_column("base", justify="right")
        table.add_column("difference", justify="right")
    for key, value in main.items():
        if key == "seconds":
            continue
        row = [_label(key, results), _fmt(key, value)]
        if base is not None:
            d = diff.get(key)
            row += [_fmt(key, base.get(key)), "" if d is None else _fmt(key, d, signed=True)]
        table.add_row(*row)
    console.print(table)


_PERCENT = ("accuracy", "accuracy_lenient", "clipped_ratio")


def _label(key: str, results: dict) -> str:
    if key == "accuracy":
        return f"accuracy (strict: {results.get('strict_reward') or 'n/a'})"
    if key == "accuracy_lenient":
        return "accuracy (lenient: answer anywhere)"
    return key


def _fmt(key: str, v, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    if key in _PERCENT or key.startswith(("pass@", "maj@")):
        return f"{v * 100:+.1f} pts" if signed else f"{v * 100:.1f}%"
    return f"{v:+.3f}" if signed else f"{v:.3f}"
