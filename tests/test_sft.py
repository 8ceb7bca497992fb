"""stage = "sft": a real tiny SFT run on the embedded model, loss on the completion only, the run directory
every other command reads, and one-line errors for data SFT cannot use."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.core.errors import UserError
from lowmem_r1.runs.rundir import RunDir, read_jsonl


def sft_recipe(run_dir: Path, **data) -> dict:
    return {
        "name": "sft-tiny",
        "stage": "sft",
        "model": {"name": "builtin:smollm2-135m-instruct", "backend": "hf", "max_seq_length": 256},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"source": "builtin:arithmetic", "task": "arithmetic", "eval_size": 4,
                 "generator": {"n": 40, "seed": 0}, **data},
        "prompt": {"system": "r1"},
        "rewards": [{"name": "answer_match", "extract": "tag"}],
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "save_steps": 1},
        "eval": {"size": 4, "max_new_tokens": 24},
        "output": {"dir": str(run_dir)},
    }


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, base_model_dir):
    from lowmem_r1.training.run import train

    run = tmp_path_factory.mktemp("sft") / "run"
    assert train(recipe_from_dict(sft_recipe(run))) == 0
    return RunDir(run)


def test_prompt_tokens_are_masked_and_the_completion_is_the_gold_answer(base_model_dir, tmp_path):
    """The chat template has no {% generation %} markers, so SFT uses prompt-completion rows: TRL labels
    every prompt token -100 and learns exactly the gold answer plus the end-of-turn token."""
    from lowmem_r1.data import gold_completion, load_splits
    from lowmem_r1.models.backends.hf import HFBackend
    from lowmem_r1.runs.rundir import RunDir as RD
    from lowmem_r1.training.sft import build_trainer

    recipe = recipe_from_dict(sft_recipe(tmp_path / "r"))
    model, tok = HFBackend().load(recipe)
    assert "{% generation %}" not in (tok.chat_template or "")

    class Quiet:
        def print(self, *a, **k):
            pass

    trainer = build_trainer(recipe, RD(tmp_path / "r"), HFBackend(), model, tok, [], Quiet())
    row = trainer.train_dataset[0]
    labels, ids = row["labels"], row["input_ids"]
    first = next(i for i, x in enumerate(labels) if x != -100)
    assert first > 10 and all(x == -100 for x in labels[:first])  # system + user turns: no loss
    assert labels[first:] == ids[first:]
    learned = tok.decode(ids[first:])
    gold = gold_completion(load_splits(recipe, tok).train[0], recipe)
    assert learned.startswith(gold) and learned.rstrip().endswith("<|im_end|>")
    assert "<answer>" in learned


def test_examples_longer_than_max_seq_length_are_dropped_not_cut(base_model_dir, tmp_path):
    from lowmem_r1.data.sft import drop_long, load_sft_splits
    from lowmem_r1.models.backends.hf import load_tokenizer

    recipe = recipe_from_dict(sft_recipe(tmp_path / "r"))
    tok = load_tokenizer(str(base_model_dir))
    ds = load_sft_splits(recipe, tok)
    kept, dropped = drop_long(ds, tok, 256)
    assert dropped == 0 and len(kept) == len(ds)
    kept, dropped = drop_long(ds, tok, 120)  # the r1 system prompt alone is ~100 tokens
    assert dropped > 0 and len(kept) + dropped == len(ds)


def test_sft_run_directory(sft_run):
    info = sft_run.info()
    assert info["status"] == "completed" and info["global_step"] == 2 and info["stage"] == "sft"
    assert (sft_run.adapter / "adapter_model.safetensors").is_file()
    assert [p.name for p in sft_run.checkpoint_dirs()] == ["checkpoint-1", "checkpoint-2"]
    rows = read_jsonl(sft_run.metrics)
    assert [r["step"] for r in rows] == [1, 2]
    assert all("loss" in r and "learning_rate" in r for r in rows)


def test_eval_and_report_work_on_an_sft_run(sft_run):
    from lowmem_r1.generation.evaluate import EvalSettings, evaluate
    from lowmem_r1.runs.report import report

    results = evaluate(str(sft_run.path), EvalSettings(limit=2, max_new_tokens=16))
    assert results["prompts"] == 2 and results["adapter"]
    assert results["metrics"]["accuracy"] is not None
    summary = report(sft_run.path)
    assert "loss.png" in summary["plots"]
    assert any(m["metric"] == "loss" for m in summary["metrics"])


@pytest.mark.slow
def test_sft_resume_continues_from_the_checkpoint(tmp_path, base_model_dir):
    from lowmem_r1.training.run import Start, train

    run = tmp_path / "run"
    cfg = sft_recipe(run)
    cfg["training"]["max_steps"] = 1
    assert train(recipe_from_dict(cfg)) == 0
    cfg["training"]["max_steps"] = 2
    with pytest.raises(UserError):  # max_steps changed: refused without --force
        train(recipe_from_dict(cfg), start=Start.resume(recipe_from_dict(cfg), run))
    assert train(recipe_from_dict(cfg), start=Start.resume(recipe_from_dict(cfg), run, force=True)) == 0
    assert [r["step"] for r in read_jsonl(RunDir(run).metrics)] == [1, 2]


@pytest.mark.parametrize("rows, message", [
    ([{"text": "hello"}], "needs a `messages` column, `prompt` + `completion`"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "no assistant turn"),
])
def test_unusable_sft_data_fails_at_dry_run(tmp_path, rows, message):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "r.toml"
    path.write_text(
        f'name = "x"\nstage = "sft"\n[data]\nsource = {json.dumps(str(data))}\ntask = "generic"\n'
        f'[output]\ndir = {json.dumps(str(tmp_path / "run"))}\n'
    )
    done = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "train", str(path), "--dry-run"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_messages_rows_split_at_the_last_assistant_turn():
    from lowmem_r1.data.sft import split_messages

    conv = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    out = split_messages(conv, "row 0")
    assert out["prompt"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert out["completion"] == [{"role": "assistant", "content": "a"}]
    with pytest.raises(UserError, match="no assistant turn"):
        split_messages([{"role": "user", "content": "q"}], "row 3")
