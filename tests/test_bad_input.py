"""Issue 13, one test per class with several inputs of its kind, on the shared helpers that fix each class
at its root (fsutil, rundir, reward_guard, recipe validation, chat input). The command-level view of the
same classes is tests/test_new_user.py."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from test_new_user import make_model, safetensors_bytes

from lowmem_r1.core.errors import UserError, printable
from lowmem_r1.core.fsutil import (
    MARKER,
    atomic_dir,
    atomic_write_text,
    check_safetensors,
    is_ours,
    refuse_existing,
)
from lowmem_r1.runs.rundir import RunDir, jsonl_rows, read_jsonl

# 1. --force replaces only an output of the same kind that lowmem-r1 wrote, never an input


def test_force_replaces_only_our_own_output_of_the_same_kind(tmp_path):
    out = tmp_path / "merged"
    with atomic_dir(out, kind="merged model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / MARKER).read_text().strip() == "merged model"
    with atomic_dir(out, force=True, kind="merged model") as tmp:  # ours, same kind: replaced
        (tmp / "config.json").write_text('{"v": 2}')
    assert json.loads((out / "config.json").read_text()) == {"v": 2}
    with pytest.raises(UserError, match="did not write"):  # ours, another kind: kept
        refuse_existing(out, True, "eval results folder")

    older = tmp_path / "older"  # written before markers existed: recognised by its files
    older.mkdir()
    (older / "config.json").write_text("{}")
    (older / "merge_info.json").write_text("{}")
    assert is_ours(older, "merged model") and not is_ours(older, "run directory")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "recipe.toml").write_text("")
    assert is_ours(run, "run directory")
    data = tmp_path / "puzzles.jsonl"
    data.write_text('{"nums": [1, 2], "target": 3, "solution": "1+2"}\n')
    assert is_ours(data, "countdown data")

    for foreign in (tmp_path / "thesis.txt", tmp_path / "photos"):  # never ours, with or without --force
        foreign.mkdir() if foreign.suffix == "" else foreign.write_text("mine")
        if foreign.is_dir():
            (foreign / "a.jpg").write_bytes(b"x")
        for kind in ("merged model", "run directory", "countdown data", "report"):
            with pytest.raises(UserError):
                refuse_existing(foreign, True, kind)
    assert (tmp_path / "photos" / "a.jpg").is_file() and (tmp_path / "thesis.txt").read_text() == "mine"

    adapter = run / "adapter"
    adapter.mkdir()
    for bad_out in (run, adapter, adapter / "sub"):  # is, holds, lies inside an input
        with pytest.raises(UserError, match="input"):
            refuse_existing(bad_out, True, "merged model", inputs=[adapter])


# 2. one line, not a raw exception


@pytest.mark.parametrize("result", [["1.0", "0.5"], [float("nan"), 1.0], [1.0], 1.0, "10", {"a": 1},
                                    [float("inf"), 0.0], [object(), 1.0]])
def test_reward_returning_the_wrong_thing_stops_with_one_message(result):
    from lowmem_r1.rewards.guard import BadRewardValues, RewardFailure, RewardRecorder, _guard, check_values
    from lowmem_r1.rewards.recipe_rewards import RecipeRewards, Reward

    with pytest.raises(BadRewardValues):
        check_values(result, 2)
    recorder = RewardRecorder(Path("/nonexistent/c.jsonl"), type("R", (), {"output": type("O", (), {
        "completions_fraction": 1.0})(), "training": type("T", (), {"seed": 0})()})())
    mine = Reward("mine", "mine", 1.0, "raise", {}, None, lambda prompts, completions, **kw: result)
    recorder.rewards = RecipeRewards([mine])
    guarded = _guard(recorder.rewards, mine, recorder, 0)
    with pytest.raises(RewardFailure) as e:
        guarded(prompts=["p", "q"], completions=["a", "b"])
    assert str(e.value).startswith("reward 'mine' ") and "Traceback" not in str(e.value)
    assert check_values([1, None, True, 0.5], 4) == [1.0, None, 1.0, 0.5]
    assert not math.isnan(sum(v for v in check_values([0, 1], 2)))


def test_broken_files_and_places_are_one_line(tmp_path):
    whole = tmp_path / "ok.safetensors"
    whole.write_bytes(safetensors_bytes())
    check_safetensors(whole)
    for name, data in (("cut", safetensors_bytes()[:-1]), ("empty", b""), ("text", b"hello world, not weights"),
                       ("header", (5).to_bytes(8, "little") + b"{bad}")):
        f = tmp_path / f"{name}.safetensors"
        f.write_bytes(data)
        with pytest.raises(UserError, match=name):
            check_safetensors(f)
    for out in (Path("/proc/x/y"), tmp_path / "ok.safetensors" / "sub"):
        with pytest.raises(UserError):
            atomic_write_text(out, "x")
    with pytest.raises(UserError, match="folder"):
        atomic_write_text(tmp_path, "x")


# 3. validation that comes before the run


@pytest.mark.parametrize("override,key", [
    ("rewards.0.extract=nonsense", "extract"), ("rewards.0.extract=3", "extract"),
    ("rewards.1.max_chars=[1]", "max_chars"), ("rewards.1.max_chars=1.5", "max_chars"),
    ("data.source=nowhere/x.jsonl", "nowhere"), ("lora.r=100000", "hidden size"),
    ("training.seed=9223372036854775808", "too large"), ("generation.max_completion_length=100000", "max_position_embeddings"),
])
def test_recipe_rejects_what_the_run_would(tmp_path, override, key):
    from lowmem_r1.config.recipe import load_recipe

    make_model(tmp_path / "m", hidden=64)
    recipe = tmp_path / "r.toml"
    text = (Path(__file__).parent.parent / "recipes" / "demo.toml").read_text()
    recipe.write_text(text.replace("generator = { n = 2000, seed = 0 }", "") if "data.source" in override else text)
    extra = [f"model.name={tmp_path / 'm'}"] if key in ("hidden size", "max_position_embeddings") else []
    with pytest.raises(UserError, match=key):
        load_recipe(recipe, [override, *extra])


# 4. resume and reading survive a crash's leftovers


def test_torn_lines_anywhere_are_skipped(tmp_path):
    f = tmp_path / "m.jsonl"
    good = [json.dumps({"step": i, "text": "café 计算"}, ensure_ascii=False) for i in (1, 2)]
    torn_utf8 = '{"step": 3, "text": "计'.encode()[:-1]
    f.write_bytes((good[0] + "\n").encode() + b"\xff\xfe\n" + (good[1] + "\n").encode() + b"[1, 2]\n" + torn_utf8)
    assert [r["step"] for r in read_jsonl(f)] == [1, 2]
    assert [line for line, _ in jsonl_rows(f)] == good


def test_truncate_logs_and_incomplete_checkpoints(tmp_path):
    from lowmem_r1.training.run import truncate_logs

    run = RunDir(tmp_path)
    run.metrics.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": "x"}\n' + '{"step": 3, "t": "é'.encode()[:-1])
    truncate_logs(run, 1)
    assert read_jsonl(run.metrics) == [{"step": 1}, {"step": "x"}]

    def checkpoint(step, skip=(), cut=False):
        d = run.checkpoints / f"checkpoint-{step}"
        d.mkdir(parents=True)
        for name in ("trainer_state.json", "adapter_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            if name not in skip:
                (d / name).write_text("{}")
        if "adapter_model.safetensors" not in skip:
            (d / "adapter_model.safetensors").write_bytes(safetensors_bytes()[:-2] if cut else safetensors_bytes())

    checkpoint(1)
    checkpoint(2, skip=("optimizer.pt",))
    checkpoint(3, cut=True)
    checkpoint(4, skip=("trainer_state.json",))
    assert [p.name for p in run.checkpoint_dirs()] == ["checkpoint-1"]
    skipped = {p.name: why for p, why in run.skipped_checkpoints()}
    assert set(skipped) == {"checkpoint-2", "checkpoint-3", "checkpoint-4"}
    assert "optimizer.pt" in skipped["checkpoint-2"] and "truncated" in skipped["checkpoint-3"]


# 5. messages that point the right way: in tests/test_new_user.py (class 5 rows)


# 6. terminal hygiene


def test_control_bytes_are_escaped():
    for raw in ("\x1b[2J", "\x07bell", "a\x08b", "\x00", "\x9b" + "\x7f"):
        shown = printable(raw)
        assert not any(ord(c) < 32 or ord(c) == 127 for c in shown), repr(shown)
    assert printable("line\n\tok é") == "line\n\tok é"


class _Gen:
    class ref:
        label = "fake"


class _Conv:
    def __init__(self):
        self.gen, self.system, self.turns = _Gen(), None, []

    def reset(self):
        pass


def test_chat_think_toggles_and_ctrl_d_ends_the_line(monkeypatch):
    from rich.console import Console

    from lowmem_r1.generation import chat
    from lowmem_r1.generation.chat import ChatOptions, repl
    from lowmem_r1.generation.engine import Decoding

    said = []
    monkeypatch.setattr(chat, "_stream_turn", lambda console, conv, user, opts: said.append(user))
    opts = ChatOptions(Decoding())
    out = io.StringIO()
    repl(_Conv(), opts, io.StringIO("/think\nhi \x1b[A\x07there\n/think\n/think on\n/think maybe\n"),
         Console(file=out, width=200), None)
    text = out.getvalue()
    assert "(reasoning hidden)" in text and "(reasoning shown)" in text and "unknown command '/think maybe'" in text
    assert opts.think is True and said == ["hi \\x1b[A\\x07there"]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = io.StringIO()
    repl(_Conv(), opts, Tty(""), Console(file=out, width=200), None)  # Ctrl-D at the prompt
    assert out.getvalue().endswith("you> \n")


def test_no_third_party_noise_in_a_pipe(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "1", "answer": "1"}\n{bad\n')
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\nsource = "bad.jsonl"\ntask = "gsm8k"\n\n[[rewards]]\nname = "answer_match"\n')
    out = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "rewards", "check", str(recipe)], check=False,
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    # caught when the recipe is read (before any loading), naming the file's bad line
    assert out.stderr.startswith("error: ") and "bad.jsonl line 2: not valid JSON" in out.stderr, out.stderr
    assert len(out.stderr.splitlines()) == 1, out.stderr
