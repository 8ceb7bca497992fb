"""`lowmem-r1 plan RECIPE --measure`: peak memory measured on this machine, before any weights are downloaded.

The recipe's model is built from its config alone (plan's table of shipped configs, or the local folder's
config.json) with random weights, written to a temporary folder by a child process (on a GPU it is built
directly on the device), and then loaded by exactly the training path: the backend select() picks, 4-bit,
LoRA, gradient checkpointing, the optimizer, TRL's GRPOTrainer (Unsloth's when it is the backend). Two GRPO
steps run on prompts of data.max_prompt_length tokens whose completions are forced to
generation.max_completion_length tokens (min_new_tokens / vLLM min_tokens), the worst case plan estimates.

Measured: on a GPU, torch.cuda.max_memory_reserved and the device's own used memory (which includes what
vLLM reserves outside torch's allocator); on a CPU, the process's resident memory (sampled, and
ru_maxrss). Printed term by term next to plan's estimate where a phase matches a term.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.core.errors import UserError
from lowmem_r1.models import backends
from lowmem_r1.models.backends.select import select as select_backend
from lowmem_r1.preflight.plan import BUILTIN_SHAPES, GiB, ModelShape, Plan, model_shape
from lowmem_r1.runs.rundir import RunDir
from lowmem_r1.training.grpo.compat import patch_trl_for_cpu
from lowmem_r1.training.grpo.stage import grpo_kwargs
from lowmem_r1.training.grpo.trainer import config_class
from lowmem_r1.training.run import _quiet_default_printers

STEPS = 2


# --------------------------------------------------------------------------------------------------
# A config.json for the recipe's model, without its weights


def config_dict(name: str, revision: str | None = None) -> dict:
    """The model's config: a local folder's config.json, else built from plan's table of shipped shapes."""
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    if name in BUILTIN_SHAPES:
        return shape_config(BUILTIN_SHAPES[name], "llama" if "smollm" in name.lower() else "qwen2")
    model_shape(name, revision)  # the same one-line error plan gives for what it cannot read
    raise UserError(f"model {name}: --measure needs a local model folder or a model in plan's table "
                    f"({', '.join(sorted(k for k in BUILTIN_SHAPES if '/' in k and 'unsloth' not in k))})")


def shape_config(s: ModelShape, model_type: str) -> dict:
    """A transformers config dict with these dimensions (Qwen2 for the Qwen family, Llama otherwise)."""
    return {
        "model_type": model_type, "architectures": [f"{'Qwen2' if model_type == 'qwen2' else 'Llama'}ForCausalLM"],
        "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.d,
        "vocab_size": s.vocab, "tie_word_embeddings": s.tied, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
    }


def word_tokenizer():
    """A small word-level tokenizer built in code (no download, no embedded model): random weights need no
    real vocabulary, only token ids below the config's vocab_size. Ids it does not know decode to nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(["the", "a", "of", "and"])}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   padding_side="left")


def _materialize(config: dict, out: str, tokenizer_dir: str | None, on_cuda: bool, dtype: str) -> None:
    """Child process: random weights from the config, written as a normal model folder (+ a tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    with torch.device("cuda" if on_cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else word_tokenizer()
    tok.save_pretrained(out)


def random_model(recipe, out: Path, cuda: bool) -> Path:
    """Write the recipe's model with random weights to `out` (a child process, so its memory is not counted)."""
    import multiprocessing as mp

    m = recipe.model
    config = config_dict(m.name, m.revision)
    local = Path(m.name).expanduser()
    tok_dir = str(local) if (local / "tokenizer_config.json").is_file() else None
    dtype = "float32" if not cuda else "bfloat16"
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=_materialize, args=(config, str(out), tok_dir, cuda, dtype))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise UserError(f"model {m.name}: could not build it from its config (exit {child.exitcode}); see the output above")
    return out


# --------------------------------------------------------------------------------------------------
# Memory probes


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Samples used memory every few ms in a thread: RSS on CPU, the device's used memory on a GPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self._stop = cuda, 0, threading.Event()

    def now(self) -> int:
        if self.cuda:
            import torch

            free, total = torch.cuda.mem_get_info()
            return total - free
        return rss()

    def __enter__(self):
        self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


@dataclass
class Measurement:
    device: str
    backend: str
    runtime: int  # before the model loads (CPU: the process; GPU: the device's used memory)
    loaded: int  # weights + LoRA (after load, before the trainer)
    peak: int  # the whole run
    torch_reserved: int | None = None  # GPU: torch.cuda.max_memory_reserved
    step_seconds: list[float] = field(default_factory=list)
    completion_tokens: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


# --------------------------------------------------------------------------------------------------


def measure_recipe(recipe) -> Measurement:
    """Two GRPO steps of the recipe's training path on random weights; the memory each phase took."""
    cuda = backends.cuda_available()
    with tempfile.TemporaryDirectory(prefix="lowmem-r1-measure-") as tmp:
        folder = random_model(recipe, Path(tmp) / "model", cuda)
        raw = recipe.model_dump(mode="json")
        raw["model"]["name"] = str(folder)
        raw["model"]["revision"] = None
        raw["training"].update(max_steps=STEPS, save_steps=STEPS)
        r = recipe_from_dict(raw, check_rewards=False)
        return _run(r, Path(tmp), cuda)


def _run(recipe, tmp: Path, cuda: bool) -> Measurement:
    backend = select_backend(recipe)  # unsloth first, the same refusals as train
    import datasets  # noqa: F401  (the runtime plan counts: imported before the first reading)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import trl  # noqa: F401

    with Peak(cuda) as peak:
        runtime = peak.now()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        model, tok = backend.load(recipe)
        loaded = peak.now() - runtime
        trainer = _trainer(recipe, backend, model, tok, tmp)
        times = StepTimes()
        trainer.add_callback(times)
        trainer.train()
    reserved = torch.cuda.max_memory_reserved() if cuda else None
    if not cuda:
        peak.peak = max(peak.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    lengths = [x for x in times.lengths if x is not None]
    return Measurement("cuda" if cuda else "cpu", backend.name, runtime, loaded, peak.peak, reserved,
                       times.seconds, lengths)


def prompt_text(tok, n: int) -> str:
    """A plain-text prompt of exactly n tokens (plan's P)."""
    ids = tok(text=" the" * (n + 8), add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids)


def _trainer(recipe, backend, model, tok, tmp: Path):
    from datasets import Dataset
    from trl import GRPOTrainer

    patch_trl_for_cpu()
    g = recipe.generation
    overrides = backend.grpo_overrides(recipe)
    forced = {"min_tokens": g.max_completion_length} if overrides.get("use_vllm") else \
        {"min_new_tokens": g.max_completion_length}
    kwargs = {**grpo_kwargs(recipe, RunDir(tmp / "run"), [1.0]), **overrides}
    kwargs.update(save_strategy="no", logging_steps=1, report_to="none", generation_kwargs=forced)
    config = config_class()(**kwargs)
    n = config.generation_batch_size * (STEPS + 1)
    data = Dataset.from_dict({"prompt": [prompt_text(tok, recipe.data.max_prompt_length)] * n})

    def random_reward(completions, **_):
        import random

        return [random.random() for _ in completions]

    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[random_reward], args=config,
                          train_dataset=data)
    _quiet_default_printers(trainer)  # the measure prints its own table, not the Trainer's raw log dicts
    return trainer


class StepTimes:
    """A transformers TrainerCallback (duck-typed: only the hooks used) recording step time and lengths."""

    def __init__(self):
        self.seconds, self.lengths, self._t = [], [], 0.0

    def __getattr__(self, name):  # every other TrainerCallback hook: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(round(time.perf_counter() - self._t, 2))
        print(f"measure: step {state.global_step}/{STEPS} took {self.seconds[-1]:.1f} s", flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "completions/mean_length" in logs:
            self.lengths.append(logs["completions/mean_length"])


# --------------------------------------------------------------------------------------------------


def comparison(plan: Plan, m: Measurement) -> list[tuple[str, float, float | None]]:
    """(what, estimated GiB, measured GiB) for the phases that match plan's terms. After loading, the LoRA
    term holds only its fp32 weights (4 of its 10 or 16 bytes per parameter): grads and optimizer come later."""
    b = plan.breakdown
    lora_weights = b.lora.bytes * 4 / (10 if plan.knobs.optim_8bit else 16)
    return [
        (b.runtime.what, b.runtime.bytes / GiB, m.runtime / GiB),
        ("weights + LoRA, loaded", (b.weights.bytes + lora_weights) / GiB, m.loaded / GiB),
        ("training + generation beyond them", (plan.total - b.runtime.bytes - b.weights.bytes - lora_weights) / GiB,
         (m.peak - m.runtime - m.loaded) / GiB),
        ("peak", plan.total / GiB, m.peak / GiB),
    ]


def print_measurement(plan: Plan, m: Measurement, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    table = Table(title=f"measured: {plan.name} ({m.backend} on {m.device}, random weights, {STEPS} steps)")
    table.add_column("memory", style="cyan")
    table.add_column("estimate GiB", justify="right")
    table.add_column("measured GiB", justify="right")
    for what, est, got in comparison(plan, m):
        table.add_row(what, f"{est:.2f}", "-" if got is None else f"{got:.2f}")
    console.print(table)
    if m.device == "cuda":
        console.print(f"  device peak (torch + vLLM's own pool) {m.peak / GiB:.2f} GiB; "
                      f"torch.cuda.max_memory_reserved {m.torch_reserved / GiB:.2f} GiB")
    est, got = plan.total, m.peak
    console.print(f"peak: estimate {est / GiB:.2f} GiB, measured {got / GiB:.2f} GiB ({(est - got) / got:+.0%}); "
                  f"step time {', '.join(f'{s:.1f}' for s in m.step_seconds)} s; "
                  f"completion lengths {m.completion_tokens} (forced to {plan.knobs.completion})")
