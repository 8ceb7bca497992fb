"""`lowmem-r1 sample`: rejection sampling and distillation data. Generate k completions per prompt from
any model the toolkit loads, score them with a recipe's rewards, keep those that pass, and write
SFT-ready rows plus each prompt's pass rate.

    OUT/generations.jsonl   every scored completion, appended batch by batch (the resume log)
    OUT/samples.jsonl       kept rows: `messages` (or `prompt` + `completion` when the recipe's prompt
                            ends in an open assistant prefix) + the task's columns, for a `stage = "sft"`
    OUT/pass_rates.jsonl    per prompt: passed / k (prompt difficulty for the model that sampled)
    OUT/grpo_prompts.jsonl  (--grpo-prompts) the prompts some but not all samples solved
    OUT/sample.json         settings and counts; written last, so its presence means "complete"
    OUT/sample-settings.json  what generated the log (a resume must match it)

Generation is generation/engine.py's (batched transformers here; its engine choice serves vLLM where present),
scoring is generation/evaluate.py's (the same rewards and strict "correctness" as `eval`). A rerun skips the
prompts already in generations.jsonl, so a killed run resumes; a rerun with another filter
(--min-reward, --keep) re-filters without generating again.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from lowmem_r1.core.errors import UserError
from lowmem_r1.core.fsutil import atomic_write_json, atomic_write_text, check_writable, is_ours, mark
from lowmem_r1.data import load_splits
from lowmem_r1.generation.engine import Decoding, load_generator, load_tokenizer, resolve_ref
from lowmem_r1.generation.evaluate import correctness_rewards, score
from lowmem_r1.rewards.guard import prompt_text
from lowmem_r1.rewards.recipe_rewards import RecipeRewards
from lowmem_r1.runs.rundir import read_jsonl

KIND = "sample folder"  # fsutil's output kind: the marker --force and resume look for


@dataclass
class SampleSettings:
    k: int = 4
    keep: int = 1
    """At most this many kept completions per prompt."""
    min_reward: float | None = None
    """Keep completions whose weighted reward total is at least this (default: full marks on the
    recipe's correctness reward, as `eval`'s strict accuracy)."""
    limit: int | None = None
    split: str = "train"
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int | None = None
    batch_size: int = 32
    seed: int = 0
    engine: str = "auto"
    grpo_prompts: bool = False
    force: bool = False

    def generation_key(self) -> dict:
        """What changes the generated completions (a resume must match it)."""
        return {k: getattr(self, k) for k in ("k", "split", "temperature", "top_p", "max_new_tokens", "seed")}


@dataclass
class SampleResult:
    out: Path
    prompts: int
    generated: int
    kept: int
    pass_rates: list[float]
    seconds: float

    def histogram(self, k: int) -> list[str]:
        counts = Counter(round(p * k) for p in self.pass_rates)
        width = max(counts.values() or [1])
        return [f"  {j}/{k} passed: {counts.get(j, 0):5d} {'#' * round(30 * counts.get(j, 0) / width)}"
                for j in range(k + 1)]


def sample(model: str, recipe, out: Path, s: SampleSettings, console=None) -> SampleResult:
    """Generate, score, filter, write. Raises UserError (exit 2) when the filter keeps nothing."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = console or Console(stderr=True)
    out = Path(out)
    strict = correctness_rewards(recipe)
    if s.min_reward is None and not strict:
        raise UserError(f"recipe {recipe.name}: no correctness reward (one that reads the gold answer and has full "
                        f"marks) to filter on; pass --min-reward X")
    if s.k < 1 or s.keep < 1:
        raise UserError("sample: -k and --keep must be at least 1")
    ref = resolve_ref(model)  # a model that cannot resolve fails before the output folder exists
    key = {"model": model, "recipe": recipe.name, **s.generation_key()}
    _prepare_out(out, key, s.force)
    started = time.time()
    tokenizer = load_tokenizer(ref)
    note = tokenizer_note(ref, tokenizer, recipe.model.name)
    if note:
        console.print(note)
    rows = _rows(recipe, tokenizer, s)
    log = out / "generations.jsonl"
    done = {r["index"] for r in read_jsonl(log) if r.get("sample") == s.k - 1}
    todo = [i for i in range(len(rows)) if i not in done]
    _truncate_partial(log, done)
    sampling = Decoding(temperature=s.temperature, top_p=s.top_p, seed=s.seed,
                        max_new_tokens=s.max_new_tokens or recipe.generation.max_completion_length)
    if todo:
        if done:
            console.print(f"resuming: {len(done)} of {len(rows)} prompts already sampled in {log}")
        with console.status(f"loading {ref.label} ...", spinner="dots"):
            gen = load_generator(ref, s.engine, tokenizer=tokenizer)
        per_batch = max(1, s.batch_size // s.k)
        weighted = RecipeRewards.from_recipe(recipe)  # each completion's total, as training weighs it
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("eta"), TimeRemainingColumn(), console=console) as progress:
            bar = progress.add_task("sampling", total=len(rows), completed=len(done))
            for start in range(0, len(todo), per_batch):
                idx = todo[start:start + per_batch]
                batch = [rows[i] for i in idx]
                if sampling.seed is not None:  # each batch its own seed: a resumed run samples the same
                    sampling.seed = s.seed + idx[0]
                outs = gen.generate([gen.encode(r["prompt"]) for r in batch], sampling, n=s.k)
                _append(log, idx, score(recipe, batch, outs, "sample").records, weighted)
                progress.advance(bar, len(idx))
        gen.close()
    return finish(out, recipe, rows, s, key, started, console)


def tokenizer_note(ref, tokenizer, student: str) -> str | None:
    """One line when the sampled model (a teacher) and the recipe's model (the student) tokenize differently.
    Fine for SFT: the samples are text, which the student tokenizes itself; said once, not an error."""
    try:
        student_ref = resolve_ref(student)
        if student_ref.base == ref.base:
            return None
        theirs = load_tokenizer(student_ref).get_vocab()
    except UserError:  # a student that cannot load here (a hub id offline): nothing to compare
        return None
    if theirs == tokenizer.get_vocab():
        return None
    return (f"note: teacher {ref.label} and student {student} have different tokenizers ({len(tokenizer.get_vocab())} "
            f"vs {len(theirs)} tokens): fine for SFT, the samples are text that the student tokenizes itself")


def finish(out: Path, recipe, rows: list[dict], s: SampleSettings, key: dict, started: float, console) -> SampleResult:
    """Filter the scored log and write the outputs (each renamed into place)."""
    records = read_jsonl(out / "generations.jsonl")
    by_prompt: dict[int, list[dict]] = {}
    for r in records:
        by_prompt.setdefault(r["index"], []).append(r)
    kept, rates, grpo = [], [], []
    for i in sorted(by_prompt):
        group = sorted(by_prompt[i], key=lambda r: r["sample"])
        passing = [r for r in group if passes(r, s)]
        rate = len(passing) / len(group)
        rates.append({"index": i, "prompt": prompt_text(rows[i]["prompt"]), "k": len(group),
                      "passed": len(passing), "pass_rate": rate})
        seen = set()
        for r in sorted(passing, key=lambda r: -r["total"]):
            norm = " ".join(r["completion"].split())
            if norm in seen:
                continue
            seen.add(norm)
            kept.append(sft_row(rows[i], r, recipe))
            if len(seen) >= s.keep:
                break
        if 0 < rate < 1:
            grpo.append({**rows[i], "pass_rate": rate})
    result = SampleResult(out, len(by_prompt), len(records), len(kept), [r["pass_rate"] for r in rates],
                          round(time.time() - started, 1))
    if not kept:
        what = f"--min-reward {s.min_reward}" if s.min_reward is not None else "full marks on " + \
            correctness_rewards(recipe)[0][0]
        raise UserError(f"sample: the filter ({what}) kept nothing of {len(records)} completions for {len(by_prompt)} "
                        f"prompts; nothing written (the scored completions stay in {out}/generations.jsonl). Lower "
                        f"--min-reward, raise -k, or sample from a stronger model")
    _write_jsonl(out / "samples.jsonl", kept)
    _write_jsonl(out / "pass_rates.jsonl", rates)
    if s.grpo_prompts:
        _write_jsonl(out / "grpo_prompts.jsonl", grpo)
    summary = {**key, "settings": asdict(s), "prompts": result.prompts, "generated": result.generated,
               "kept": result.kept, "mean_pass_rate": sum(result.pass_rates) / max(1, len(result.pass_rates)),
               "grpo_prompts": len(grpo) if s.grpo_prompts else None, "seconds": result.seconds}
    atomic_write_json(out / "sample.json", summary)
    return result


def passes(record: dict, s: SampleSettings) -> bool:
    if s.min_reward is not None:
        return record["total"] >= s.min_reward - 1e-9
    return bool(record.get("strict"))


def sft_row(row: dict, record: dict, recipe) -> dict:
    """A kept completion as an SFT row, with the task's columns (so `eval` and the rewards can read it)."""
    columns = {k: v for k, v in row.items() if k != "prompt"}
    prompt = row["prompt"]
    extra = {**columns, "reward": record["total"], "source_index": record["index"]}
    if isinstance(prompt, str):  # rendered text ending in an open assistant prefix: TRL's standard format
        return {"prompt": prompt, "completion": record["completion"], **extra}
    return {"messages": [*prompt, {"role": "assistant", "content": record["completion"]}], **extra}


# --------------------------------------------------------------------------------------------------
# Inputs, the resume log, outputs


def _rows(recipe, tokenizer, s: SampleSettings) -> list[dict]:
    splits = load_splits(recipe, tokenizer)
    ds = splits.eval if s.split == "eval" else splits.train
    if s.split not in ("train", "eval"):
        raise UserError(f"--split {s.split}: use train or eval")
    if ds is None or len(ds) == 0:
        raise UserError(f"recipe {recipe.name}: no {s.split} prompts (set data.eval_size for --split eval)")
    n = min(s.limit or len(ds), len(ds))
    return [dict(ds[i]) for i in range(n)]


def _prepare_out(out: Path, key: dict, force: bool) -> None:
    """A new folder; or one `sample` wrote with the same settings (resume or re-filter); --force starts over,
    only in a folder this command wrote (fsutil's marker), never in any other."""
    check_writable(out)
    if out.exists() and not is_ours(out, KIND):
        raise UserError(f"{out}: exists and was not written by `lowmem-r1 sample`; choose another --out")
    settings = out / "sample-settings.json"
    if settings.is_file():
        saved = json.loads(settings.read_text())
        if saved != key:
            if not force:
                diff = ", ".join(f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in key.items() if saved.get(k) != v)
                raise UserError(f"{out}: sampled with other settings ({diff}); pass --force to start over, or "
                                f"choose another --out")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    mark(out, KIND)
    atomic_write_json(settings, key)
    if force and (out / "sample.json").exists():
        (out / "sample.json").unlink()


def _truncate_partial(log: Path, done: set[int]) -> None:
    """Drop the rows of a prompt whose samples were cut off by a kill (they are generated again)."""
    if not log.is_file():
        return
    rows = [r for r in read_jsonl(log) if r["index"] in done]
    atomic_write_text(log, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _append(log: Path, idx: list[int], records: list[dict], weighted: RecipeRewards) -> None:
    with open(log, "a", encoding="utf-8") as f:
        for rec in records:
            rewards = rec["rewards"]
            total = weighted.total([rewards[name] for name in weighted.names])
            f.write(json.dumps({"index": idx[rec["index"]], "sample": rec["sample"], "completion": rec["completion"],
                                "tokens": rec.get("tokens"), "rewards": rewards, "total": total,
                                "strict": rec.get("strict")}, ensure_ascii=False, default=str) + "\n")
        f.flush()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def print_result(result: SampleResult, k: int, console) -> None:
    console.print(f"kept {result.kept}/{result.generated} completions ({result.prompts} prompts x {k}) "
                  f"in {result.seconds:.0f} s -> {result.out}/samples.jsonl")
    console.print("pass rate per prompt:")
    for line in result.histogram(k):
        console.print(line, markup=False, highlight=False)
