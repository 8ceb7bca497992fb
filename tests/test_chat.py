"""chat: reasoning split, engine choice, model resolution, one-shot on a run dir / merged folder / GGUF,
and the REPL driven from a script."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowmem_r1.core.errors import UserError
from lowmem_r1.generation.chat import (
    ChatOptions,
    Conversation,
    ReasoningSplitter,
    chat,
    repl,
    split_reasoning,
    trained_format,
)
from lowmem_r1.generation.engine import (
    Decoding,
    ModelRef,
    choose_engine,
    load_generator,
    newest_model,
    resolve_ref,
)

GREEDY = Decoding(temperature=0.0, max_new_tokens=10)
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# Pure logic


@pytest.mark.parametrize("cut", range(1, 30))
def test_splitter_handles_tags_split_anywhere(cut):
    text = "Hi <think>add 3 and 5</think>\n<answer>8</answer>"
    s = ReasoningSplitter()
    parts = s.feed(text[:cut]) + s.feed(text[cut:]) + s.flush()
    reasoning = "".join(t for r, t in parts if r)
    answer = "".join(t for r, t in parts if not r)
    assert reasoning == "add 3 and 5"
    assert answer == "Hi \n8"


def test_split_reasoning_variants():
    assert split_reasoning("<reasoning>\nx\n</reasoning>\n<answer>\n4\n</answer>") == ("x", "4")
    assert split_reasoning("plain answer 7") == ("", "plain answer 7")
    # An assistant prefix opened <think>: the completion starts inside the reasoning.
    assert split_reasoning("so 3+5=8 </think> 8", in_reasoning=True) == ("so 3+5=8", "8")
    # A lone '<' that starts no tag is not held back forever.
    assert split_reasoning("3 < 5") == ("", "3 < 5")


def test_engine_choice():
    kw = {"has_vllm": True, "has_unsloth": True}
    assert choose_engine("auto", cuda=False, streaming=False, **kw) == "hf"
    assert choose_engine("auto", cuda=True, streaming=False, **kw) == "vllm"
    assert choose_engine("auto", cuda=True, streaming=True, **kw) == "unsloth"  # vLLM cannot stream here
    assert choose_engine("auto", cuda=True, streaming=False, has_vllm=False, has_unsloth=True) == "unsloth"
    assert choose_engine("auto", cuda=True, streaming=False, has_vllm=False, has_unsloth=False) == "hf"
    assert choose_engine("hf", cuda=True, streaming=False, **kw) == "hf"
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        choose_engine("vllm", cuda=False, streaming=False, **kw)
    with pytest.raises(UserError, match="not installed"):
        choose_engine("vllm", cuda=True, streaming=False, has_vllm=False, has_unsloth=True)
    with pytest.raises(UserError, match="unknown"):
        choose_engine("llamacpp", cuda=False, streaming=False, **kw)


def test_resolve_ref_and_newest(tmp_path, lora_run_dir, base_model_dir):
    ref = resolve_ref(lora_run_dir)
    assert ref.adapter == lora_run_dir / "adapter" and ref.base == str(base_model_dir)
    assert ref.base_only().adapter is None
    assert resolve_ref(lora_run_dir / "adapter").adapter == lora_run_dir / "adapter"
    assert resolve_ref("HuggingFaceTB/SmolLM2-135M-Instruct").base == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(UserError, match="no trained model"):
        newest_model(tmp_path)
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text("{}")
    merged = tmp_path / "new" / "merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}")
    os.utime(old / "run.json", (time.time() - 100, time.time() - 100))
    assert newest_model(tmp_path) == merged


def test_run_whose_base_folder_moved_resolves_like_merge(tmp_path, base_model_dir):
    """chat/eval and merge agree: a recorded base folder that is gone falls back to the recipe's name."""
    import json

    from lowmem_r1.export.source import resolve_source

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"base_model": str(tmp_path / "gone"), "model_name": str(base_model_dir)}))
    assert resolve_ref(run).base == resolve_source(run).base == str(base_model_dir)
    (run / "run.json").write_text("{}")
    with pytest.raises(UserError, match="no base_model recorded"):
        resolve_ref(run)


# --------------------------------------------------------------------------------------------------
# The REPL, driven from a script, with a scripted generator (the session logic, not the model)


class ScriptedGenerator:
    """Streams a fixed reply and records every prompt it was given."""

    class ref:
        label = "scripted"

    def __init__(self):
        self.prompts = []

    def encode(self, prompt):
        self.prompts.append(prompt)
        return [0]

    def stream(self, ids, sampling, on_text):
        n = len(self.prompts)
        for piece in ["<thi", f"nk>step {n}</think>", f"answer {n}"]:
            on_text(piece)


def test_repl_commands_from_a_script():
    gen = ScriptedGenerator()
    conv = Conversation(gen, system="Be brief.")
    out = io.StringIO()
    from rich.console import Console

    script = "hello\nagain\n/think off\nthird\n/reset\n/system Be loud.\nfourth\n/bogus\n/exit\nnever read\n"
    assert repl(conv, ChatOptions(GREEDY), io.StringIO(script), Console(file=out, width=120)) == 0
    text = out.getvalue()
    assert "thinking: step 1" in text and "answer 1" in text
    # multi-turn: the second prompt carries the first turn (its answer, not its reasoning)
    second = gen.prompts[1]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"] == "answer 1"
    # /think off hides the reasoning of the third turn but not its answer
    assert "step 3" not in text and "answer 3" in text and "reasoning hidden" in text
    # /reset then /system: a fresh conversation with the new system prompt
    fourth = gen.prompts[3]
    assert fourth == [{"role": "system", "content": "Be loud."}, {"role": "user", "content": "fourth"}]
    assert "unknown command '/bogus'" in text
    assert len(gen.prompts) == 4  # /exit stopped before "never read"


# --------------------------------------------------------------------------------------------------
# The real embedded model


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, lora_run_dir, base_model_dir):
    """The fixture adapter merged with peft (independent of `lowmem-r1 merge`)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("merged") / "model"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir), lora_run_dir / "adapter")
    model.merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(out)
    return out


def one_shot(model, prompt="What is 3 + 5?", **kw):
    out, err = io.StringIO(), io.StringIO()
    assert chat(str(model), ChatOptions(GREEDY, **kw), prompt=prompt, stdout=out, stderr=err) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def answers(lora_run_dir, merged_dir, base_model_dir):
    return {"run": one_shot(lora_run_dir), "merged": one_shot(merged_dir), "base": one_shot(base_model_dir)}


def test_one_shot_run_dir_equals_merged_folder(answers):
    """The run dir's base + adapter and the peft-merged folder give the same greedy answer, alone on stdout."""
    assert answers["run"].strip() and answers["run"].endswith("\n")
    assert answers["run"] == answers["merged"]


def test_one_shot_streams_the_same_text_as_batch_generation(lora_run_dir):
    gen = load_generator(resolve_ref(lora_run_dir), "hf")
    ids, _ = Conversation(gen).prompt_ids("Name a colour.")
    batch = gen.generate([ids], GREEDY)[0][0]
    pieces: list[str] = []
    completion = gen.stream(ids, GREEDY, pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == batch.text
    assert completion.tokens == batch.tokens == gen.extra["last_completion"].tokens


@pytest.fixture(scope="module")
def base_gen(base_model_dir):
    return load_generator(resolve_ref(str(base_model_dir)), "hf")


def test_trained_format_and_assistant_prefix(tmp_path, base_gen):
    """A run trained with the r1 preset and an assistant prefix is chatted with in that format."""
    (tmp_path / "recipe.toml").write_text(
        '[prompt]\nsystem = "r1"\nassistant_prefix = "Let me solve this step by step.\\n<think>"\n\n'
        '[[rewards]]\nname = "think_format"\n'
    )
    system, prefix = trained_format(ModelRef("unused", None, tmp_path))
    assert system.startswith("A conversation between User and Assistant") and prefix.endswith("<think>")
    conv = Conversation(base_gen, system=system, assistant_prefix=prefix)
    ids, inside = conv.prompt_ids("What is 3 + 5?")
    assert inside  # the completion starts inside <think>: shown dimmed until </think>
    rendered = base_gen.tokenizer.decode(ids)
    assert rendered.endswith("<|im_start|>assistant\nLet me solve this step by step.\n<think>")
    assert rendered.count("<|im_end|>") == 2  # system and user turns closed, the assistant turn left open
    # token for token the prompt training built for the same question (what the rewards saw)
    from types import SimpleNamespace

    from lowmem_r1.data.splits import render_prompt

    trained = render_prompt("What is 3 + 5?", SimpleNamespace(system="r1", assistant_prefix=prefix), base_gen.tokenizer)
    assert ids == base_gen.encode(trained)


def test_multi_turn_uses_the_chat_template(base_gen):
    gen = base_gen
    conv = Conversation(gen, system="You are terse.")
    _, first = conv.reply_text("Say hi.", GREEDY)
    ids, _ = conv.prompt_ids("And again?")
    rendered = gen.tokenizer.decode(ids)
    assert rendered.count("<|im_start|>user") == 2 and "You are terse." in rendered
    assert first in rendered and rendered.endswith("<|im_start|>assistant\n")


def test_compare_shows_base_and_tuned_side_by_side(lora_run_dir, answers, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    buf = io.StringIO()
    chat(str(lora_run_dir), ChatOptions(GREEDY), prompt="What is 3 + 5?", compare="base", stdout=buf, stderr=io.StringIO())
    lines = buf.getvalue().splitlines()
    header = next(l for l in lines if "(base)" in l)
    assert header.index("(base)") < header.index(str(lora_run_dir))  # base on the left
    row = next(l for l in lines if answers["base"].strip() in l)
    assert answers["run"].strip() in row  # both answers on the same table row


def test_cli_one_shot_on_gguf_prints_only_the_answer(answers, tmp_path):
    """`lowmem-r1 chat FILE.gguf --prompt` in a subprocess: stdout is the answer and nothing else."""
    from lowmem_r1.models.names import builtin_gguf_path

    gguf = builtin_gguf_path("builtin:smollm2-135m-instruct")
    cmd = [sys.executable, "-m", "lowmem_r1.cli", "chat", str(gguf), "--prompt", "What is 3 + 5?",
           "--temperature", "0", "--max-new-tokens", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tmp_path, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == answers["base"]  # the GGUF dequantizes to the builtin base model
    assert "Loading" not in proc.stdout and "loading" not in proc.stdout


def test_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from lowmem_r1.cli import app

    result = CliRunner().invoke(app, ["chat", str(tmp_path / "missing.gguf"), "--prompt", "x"])
    assert isinstance(result.exception, UserError) and "GGUF file not found" in str(result.exception)
    empty = tmp_path / "runs"
    empty.mkdir()
    with pytest.raises(UserError, match="no trained model"):
        resolve_ref(None, root=empty)


def test_ctrl_c_while_streaming_stops_generation_in_this_thread(base_gen):
    """Generation runs in the caller's thread (no helper thread left generating after Ctrl-C): a
    KeyboardInterrupt raised while a piece is shown ends generate itself."""
    import threading

    ids = base_gen.encode([{"role": "user", "content": "Write a long story about a cat."}])
    pieces, threads = [], threading.active_count()

    def show(text):
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        base_gen.stream(ids, Decoding(temperature=0.0, max_new_tokens=64), show)
    assert len(pieces) == 3 and threading.active_count() == threads
