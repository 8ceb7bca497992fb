"""Data: sources, task adapters, prompt formats and the splits GRPOTrainer receives, on real rows."""

from __future__ import annotations

import json

import pytest

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.core.errors import UserError
from lowmem_r1.data import TASKS, answer_format, gold_completion, load_splits
from lowmem_r1.rewards import build


def make(data: dict | None = None, prompt: dict | None = None, rewards: list | None = None):
    return recipe_from_dict({"data": data or {}, "prompt": prompt or {},
                             "rewards": rewards or [{"name": "answer_match"}]})


def score(name: str, row: dict, completion: str, **params) -> float:
    """One reward on one completion, called the way TRL calls it (conversational or standard)."""
    prompt = row["prompt"]
    comp = [{"role": "assistant", "content": completion}] if isinstance(prompt, list) else completion
    columns = {k: [v] for k, v in row.items() if k != "prompt"}
    return build(name, **params)(prompts=[prompt], completions=[comp], **columns)[0]


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


# --------------------------------------------------------------------------------------------------
# GSM8K on the real test set


@pytest.fixture(scope="module")
def gsm8k_test(gsm8k_dir):
    r = make({"source": str(gsm8k_dir / "test.jsonl"), "task": "gsm8k", "shuffle": False})
    return load_splits(r).train


def test_gsm8k_every_row_has_a_numeric_answer(gsm8k_test, gsm8k_dir):
    raw = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()]
    assert len(raw) == 1319 and len(gsm8k_test) == 1319
    assert set(gsm8k_test.column_names) == {"prompt", *TASKS["gsm8k"].columns}
    for row, src in zip(gsm8k_test, raw):
        float(row["answer"])  # raises if not numeric
        assert "," not in row["answer"] and "$" not in row["answer"]
        final = src["answer"].rsplit("####", 1)[1]
        assert float(final.replace(",", "").replace("$", "")) == float(row["answer"])
        assert "####" not in row["solution"] and "<<" not in row["solution"]
        assert row["prompt"] == [{"role": "user", "content": src["question"]}]
    assert gsm8k_test[0]["answer"] == "18"
    assert any("," in s["answer"].rsplit("####", 1)[1] for s in raw)  # the comma case is really exercised


CORRECTNESS = {  # format preset -> the correctness reward that judges it
    "r1": ("answer_match", {"extract": "tag"}),
    "xml": ("answer_match", {"extract": "tag"}),
    "boxed": ("boxed_match", {}),
    "think_boxed": ("boxed_match", {}),
    "plain": ("answer_match", {"extract": "last_number"}),
}
FORMAT_REWARDS = {"r1": [("think_format", {})], "xml": [("xml_strict_format", {}), ("xml_soft_format", {})],
                  "boxed": [("boxed_format", {"think": False})], "think_boxed": [("boxed_format", {})], "plain": []}


@pytest.mark.parametrize("preset", ["r1", "xml", "boxed", "think_boxed", "plain"])
def test_gold_answer_in_each_format_gets_full_marks(gsm8k_test, preset):
    system = preset if preset in ("r1", "xml", "boxed") else "none"
    r = make({"task": "gsm8k"}, {"system": system, "answer_format": preset})
    assert answer_format(r.prompt) == preset
    name, params = CORRECTNESS[preset]
    correct, auto = build(name, **params), build("answer_match", extract="auto")
    formats = [build(f, **p) for f, p in FORMAT_REWARDS[preset]]
    rows = list(gsm8k_test)
    golds = [gold_completion(row, r) for row in rows]
    prompts = [row["prompt"] for row in rows]
    comps = [[{"role": "assistant", "content": g}] for g in golds]
    cols = {c: [row[c] for row in rows] for c in TASKS["gsm8k"].columns}
    assert correct(prompts=prompts, completions=comps, **cols) == [1.0] * len(rows)
    assert auto(prompts=prompts, completions=comps, **cols) == [1.0] * len(rows)
    for f in formats:
        assert f(prompts=prompts, completions=comps, **cols) == [1.0] * len(rows), f.__name__
    # and a wrong answer in the same format does not
    wrong = gold_completion({**rows[0], "answer": str(float(rows[0]["answer"]) + 1)}, r)
    assert score(name, rows[0], wrong, **params) == 0.0


def test_hub_style_folder_with_named_splits(gsm8k_dir):
    r = make({"source": str(gsm8k_dir), "task": "gsm8k", "split": "test", "eval_split": "test", "eval_size": 10,
              "limit": 20})
    s = load_splits(r)
    assert len(s.train) == 20 and len(s.eval) == 10 and s.dropped == 0
    with pytest.raises(UserError, match="no split 'nope'"):
        load_splits(make({"source": str(gsm8k_dir), "task": "gsm8k", "split": "nope"}))


# --------------------------------------------------------------------------------------------------
# Splits: shuffle, hold-out, limit, length filter


def test_eval_holdout_is_deterministic_and_disjoint():
    def split(seed):
        s = load_splits(make({"generator": {"n": 200, "max_operand": 50}, "eval_size": 30, "seed": seed}))
        return [r["question"] for r in s.train], [r["question"] for r in s.eval]

    t1, e1 = split(1)
    t2, e2 = split(1)
    t3, e3 = split(2)
    assert (t1, e1) == (t2, e2) and len(t1) == 170 and len(e1) == 30
    assert e1 != e3
    # held out rows are not training rows (positions, since generated questions may repeat)
    full = load_splits(make({"generator": {"n": 200, "max_operand": 50}, "seed": 1})).train
    assert [r["question"] for r in full] == e1 + t1


def test_limit_and_errors():
    s = load_splits(make({"generator": {"n": 100}, "limit": 7, "eval_size": 5}))
    assert len(s.train) == 7 and len(s.eval) == 5
    with pytest.raises(UserError, match="eval_size"):
        load_splits(make({"generator": {"n": 10}, "eval_size": 10}))
    with pytest.raises(UserError, match="no parameter 'nn'"):
        load_splits(make({"generator": {"nn": 10}}))
    with pytest.raises(UserError, match="not found"):
        load_splits(make({"source": "./missing.jsonl"}))


def test_long_prompts_are_dropped_and_counted(tokenizer):
    r = make({"source": "builtin:countdown", "task": "countdown", "generator": {"n": 60, "max_number": 999}},
             rewards=[{"name": "countdown_equation"}])
    full = load_splits(r).train
    lengths = [len(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                   ["input_ids"]) for p in full["prompt"]]
    limit = sorted(lengths)[len(lengths) // 2]
    expected = sum(1 for n in lengths if n > limit)
    assert 0 < expected < len(lengths)
    r.data.max_prompt_length = limit
    s = load_splits(r, tokenizer)
    assert s.dropped == expected and len(s.train) == len(full) - expected


def test_assistant_prefix_renders_a_string_left_open(tokenizer):
    prefix = "Let me solve this step by step.\n<think>"
    r = make({"source": "builtin:countdown", "task": "countdown", "generator": {"n": 5}},
             {"system": "r1", "assistant_prefix": prefix}, [{"name": "think_format"}])
    with pytest.raises(UserError, match="tokenizer"):
        load_splits(r)
    row = load_splits(r, tokenizer).train[0]
    assert isinstance(row["prompt"], str) and row["prompt"].endswith(prefix)
    assert row["prompt"].count("<|im_start|>assistant") == 1 and "<|im_end|>" not in row["prompt"].split(prefix)[-1]
    gold = gold_completion(row, r)
    assert not gold.startswith("<think>")  # the prefix already opened it
    assert score("think_format", row, gold) == 1.0
    assert score("countdown_equation", row, gold) == 1.0


def test_conversational_prompts_keep_the_models_template(tokenizer):
    r = make({"generator": {"n": 3}}, {"system": "Be brief."})
    row = load_splits(r, tokenizer).train[0]
    assert row["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert row["prompt"][1]["role"] == "user" and row["prompt"][1]["content"].startswith("What is ")


# --------------------------------------------------------------------------------------------------
# Adapters and templates


def test_math_adapter_takes_the_last_boxed_and_skips_rows_without(tmp_path):
    rows = [
        {"problem": "Compute 1/2 + 1/4.", "solution": "We get $\\frac{3}{4}$, so $\\boxed{\\frac{3}{4}}$."},
        {"problem": "Find x if 2x = 10.", "solution": "First $\\boxed{2x=10}$; then x is $\\boxed{5}$."},
        {"problem": "No answer here.", "solution": "We cannot tell."},
    ]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = make({"source": str(path), "task": "math", "shuffle": False}, {"system": "boxed"},
             [{"name": "math_accuracy"}])
    ds = load_splits(r).train
    assert ds["answer"] == ["\\frac{3}{4}", "5"]
    for row in ds:
        assert score("math_accuracy", row, gold_completion(row, r)) == 1.0
        assert score("boxed_match", row, gold_completion(row, r)) == 1.0


def test_generic_task_maps_columns_and_fills_templates(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("q,label\nWhat is the capital of France?,Paris\nHow many legs has a spider?,8\n")
    r = make({"source": str(path), "task": "generic", "columns": {"answer": "label"}, "shuffle": False},
             {"user": "Q: {q}\nPut the answer in \\boxed{} and keep {{braces}}.", "system": "none"})
    ds = load_splits(r).train
    assert ds.column_names == ["prompt", "answer"]
    assert ds[0]["prompt"][0]["content"] == ("Q: What is the capital of France?\nPut the answer in \\boxed{} "
                                             "and keep {braces}.")
    assert answer_format(r.prompt) == "boxed"
    assert score("boxed_match", ds[1], gold_completion(ds[1], r)) == 1.0
    bad = make({"source": str(path), "task": "generic", "columns": {"answer": "label"}}, {"user": "{question}"})
    with pytest.raises(UserError, match=r"placeholder \{question\}"):
        load_splits(bad)


def test_parquet_and_json_sources_read_like_jsonl(tmp_path):
    import datasets

    rows = [{"nums": [2, 3, 4], "target": 14}, {"nums": [10, 5, 7, 1], "target": 11}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    (tmp_path / "c.json").write_text(json.dumps(rows))
    for name in ("c.parquet", "c.json"):
        r = make({"source": str(tmp_path / name), "task": "countdown", "shuffle": False},
                 {"system": "r1"}, [{"name": "countdown_equation"}])
        ds = load_splits(r).train
        assert ds["nums"] == [[2, 3, 4], [10, 5, 7, 1]] and ds["target"] == [14, 11]
        for row in ds:  # hub-style rows carry no solution: the solver writes the gold equation
            assert score("countdown_equation", row, gold_completion(row, r)) == 1.0


def test_preview_shows_the_rendered_prompt_and_lengths(tokenizer):
    from lowmem_r1.data.preview import preview

    r = make({"generator": {"n": 40}}, {"system": "xml"})
    text = preview(r, n=2, tokenizer=tokenizer)
    first = load_splits(r).train[0]
    rendered = tokenizer.apply_chat_template(first["prompt"], add_generation_prompt=True, tokenize=False)
    assert rendered in text
    assert "answer: " + first["answer"] in text
    assert "<reasoning>" in text and "over data.max_prompt_length = 256: 0 of 40" in text


def test_a_template_bos_is_not_doubled_when_the_tokenizer_adds_one():
    from lowmem_r1.data.splits import _strip_double_bos

    class Tok:  # a Llama / R1-Distill style tokenizer: the template writes BOS and encoding adds it again
        bos_token, bos_token_id = "<s>", 1

        def __init__(self, adds: bool):
            self.adds = adds

        def __call__(self, text):
            return {"input_ids": ([1] if self.adds else []) + [5]}

    assert _strip_double_bos("<s>[INST] hi", Tok(adds=True)) == "[INST] hi"
    assert _strip_double_bos("<s>[INST] hi", Tok(adds=False)) == "<s>[INST] hi"


def test_template_typos_in_generated_tasks_fail_before_loading():
    from lowmem_r1.data import check_prompt

    ok = make({"source": "builtin:countdown", "task": "countdown"}, {"user": "{nums} -> {target}"},
              [{"name": "countdown_equation"}])
    check_prompt(ok)
    # recipe validation runs check_prompt, so the typo fails before any data is read
    with pytest.raises(UserError, match=r"<recipe>: prompt.user: placeholder \{numbers\}"):
        make({"source": "builtin:countdown", "task": "countdown"}, {"user": "{numbers} -> {target}"},
             [{"name": "countdown_equation"}])
    with pytest.raises(UserError, match="eval_size"):
        load_splits(make({"generator": {"n": 10}, "eval_split": "test"}))


# --------------------------------------------------------------------------------------------------
# The task registry


def test_the_registry_is_the_one_list_of_tasks():
    """The recipe, `eval --task` and its help accept exactly the registry's tasks."""
    from typer.testing import CliRunner

    from lowmem_r1.cli import app

    for name, task in TASKS.items():
        data = {"task": name, "columns": {"answer": "label"}} if name == "generic" else {"task": name}
        assert make(data, rewards=[{"name": r} for r in task.rewards]).data.task == name
    with pytest.raises(UserError, match="data.task"):
        make({"task": "chess"})
    help_text = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output
    assert " | ".join(TASKS) in help_text


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_is_whole(name):
    """A task's default rewards exist and read only columns it gives; its gold column is one of them; its
    default prompt names only columns its source has."""
    from lowmem_r1.data.formats import check_template
    from lowmem_r1.rewards import REGISTRY

    task = TASKS[name]
    assert task.name == name and task.rewards
    given = set(task.columns) or {"answer"}  # generic: what data.columns maps, an answer at least
    for reward in task.rewards:
        assert set(REGISTRY[reward].columns) <= given, (reward, REGISTRY[reward].columns)
    assert task.gold_column is None or task.gold_column in given
    if task.user is not None:
        check_template(task.user, sorted(set(task.raw_columns) | set(task.columns)))


def test_builtin_task_rows_adapt_and_have_a_gold_answer():
    """Generated rows go through their task's adapter; the gold answer is what a perfect completion holds."""
    for task, source in (("arithmetic", "builtin:arithmetic"), ("countdown", "builtin:countdown")):
        r = make({"task": task, "source": source, "generator": {"n": 4}},
                 rewards=[{"name": r} for r in TASKS[task].rewards])
        row = load_splits(r).train[0]
        assert set(row) == {"prompt", *TASKS[task].columns}
        reasoning, answer = TASKS[task].gold(row)
        assert answer and answer in gold_completion(row, r)
