"""What a person watches: the dry-run table, the live training panel and the end-of-run summary."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from lowmem_r1.config.recipe import Recipe
from lowmem_r1.config.stages import STAGES
from lowmem_r1.generation.serve import server_url, uses_server
from lowmem_r1.runs import health
from lowmem_r1.runs.rundir import RunDir, read_jsonl
from lowmem_r1.training.callbacks import Callback
from lowmem_r1.training.stages import TRAINERS


def make_console(quiet: bool = False) -> Console:
    """quiet: a process other than the main one of several prints nothing."""
    return Console(highlight=False, quiet=quiet)


def print_dry_run(recipe: Recipe, path: Path | str, console: Console | None = None) -> None:
    """The resolved recipe and the numbers the run will use; nothing heavy is imported."""
    console = console or make_console()
    table = Table(title=f"recipe {path} (resolved)", show_lines=False)
    table.add_column("key", style="cyan")
    table.add_column("value")
    data = recipe.model_dump(mode="json")
    for section, value in data.items():
        if isinstance(value, dict):
            for k, v in value.items():
                table.add_row(f"{section}.{k}", _fmt(v))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                table.add_row(f"{section}[{i}]", _fmt(item))
        else:
            table.add_row(section, _fmt(value))
    console.print(table)
    t = recipe.training
    numbers = Table(title="the run will use", show_header=False)
    numbers.add_column(style="cyan")
    numbers.add_column()
    for label, value in TRAINERS[recipe.stage].plan_rows(recipe):
        numbers.add_row(label, value)
    if uses_server(recipe):
        numbers.add_row("generation", f"vLLM server at {server_url(recipe)} (`lowmem-r1 serve`), checked before "
                                      f"step 1, waiting up to {recipe.generation.vllm_server_timeout:g} s")
    numbers.add_row("checkpoints", f"every {t.save_steps} steps, keep {t.save_total_limit or 'all'}")
    numbers.add_row("run directory", str(recipe.run_dir()))
    console.print(numbers)


def _fmt(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, str) and len(v) > 90:
        return repr(v[:87] + "...")
    return repr(v) if isinstance(v, str) else str(v)


def _trend(values: list[float]) -> str:
    if len(values) < 4:
        return ""
    half = len(values) // 2
    early, late = sum(values[:half]) / half, sum(values[half:]) / (len(values) - half)
    arrow = "↑" if late > early + 1e-3 else "↓" if late < early - 1e-3 else "→"
    return f"{arrow} from {early:.3f}"


class TrainingDisplay(Callback):
    """A live rich panel on a terminal; one plain line per logged step elsewhere (CI, pipes, files)."""

    def __init__(self, recipe: Recipe, run: RunDir, console: Console, start_step: int = 0):
        self.recipe, self.run, self.console = recipe, run, console
        self.start_step = start_step
        self.total = recipe.training.max_steps
        self.rewards: list[float] = []
        self.headline = STAGES[recipe.stage].headline  # the number each step is judged by
        self.last: dict = {}
        self.sample: str = ""
        self.recorder = None
        self.started = time.time()
        self.live: Live | None = None
        self.watch = health.HealthWatch.for_recipe(recipe)
        self.warnings: list[str] = []

    def __enter__(self):
        if self.console.is_terminal and not self.console.quiet:
            self.live = Live(self._render(0), console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)
        return False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.headline not in logs:
            return
        self.last = dict(logs)
        self.rewards.append(float(logs[self.headline]))
        step = state.global_step
        every = self.recipe.logging.sample_every
        if every and self.recorder is not None and self.recorder.last_rows and step % every == 0:
            self.sample = self.recorder.last_rows[0]["completion"]
        new_warnings = self.watch.update(logs)
        self.warnings += new_warnings
        if self.live is not None:
            self.live.update(self._render(step))
        else:
            self.console.print(self._line(step))
            for w in new_warnings:
                self.console.print(f"    warning: {w}")
            if self.sample and every and step % every == 0:
                self.console.print(f"    sample: {self.sample[:120]!r}")

    def _eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        left = (time.time() - self.started) / done * (self.total - step)
        return f"{int(left // 60)}m{int(left % 60):02d}s"

    def _per_reward(self) -> list[tuple[str, float]]:
        return [
            (k[len("rewards/"):-len("/mean")], float(v))
            for k, v in self.last.items()
            if k.startswith("rewards/") and k.endswith("/mean") and v is not None
        ]

    def _line(self, step: int) -> str:
        parts = [f"step {step}/{self.total}", f"{self.headline} {self.rewards[-1]:.3f} {_trend(self.rewards)}".rstrip()]
        parts += [f"{n} {v:.2f}" for n, v in self._per_reward()]
        if self.last.get("frac_reward_zero_std") is not None:
            parts.append(f"zero-std {float(self.last['frac_reward_zero_std']):.2f}")
        if self.last.get("completions/mean_length") is not None:
            parts.append(f"len {float(self.last['completions/mean_length']):.1f}")
        if health.number(self.last.get("grad_norm")) is not None:
            parts.append(f"grad {float(self.last['grad_norm']):.3g}")
        if health.number(self.last.get("dynamic/extra_generations")):
            parts.append(f"refill +{int(self.last['dynamic/extra_generations'])}")
        parts.append(f"eta {self._eta(step)}")
        line = " | ".join(parts)
        if float(self.last.get("frac_reward_zero_std") or 0) >= 1.0:
            line += "\n    warning: every group scored the same reward - no learning signal this step"
        return line

    def _render(self, step: int):
        table = Table(show_header=False, box=None)
        table.add_column(style="cyan")
        table.add_column()
        table.add_row("step", f"{step}/{self.total}   eta {self._eta(step)}")
        if self.rewards:
            table.add_row(self.headline, f"{self.rewards[-1]:.3f}  {_trend(self.rewards)}")
            for name, v in self._per_reward():
                table.add_row(f"  {name}", f"{v:.3f}")
            for key, label in (("learning_rate", "learning rate"), ("mean_token_accuracy", "token accuracy"),
                               ("completions/mean_length", "completion length"), ("kl", "kl"),
                               ("step_time", "step time (s)")):
                if self.last.get(key) is not None:
                    table.add_row(label, f"{float(self.last[key]):.3f}")
            for label, value in health.signal_rows(self.last):
                table.add_row(label, value)
            if "loss" in self.last:
                table.add_row("loss", health.loss_label(self.last["loss"], self.recipe.training.beta))
        items = [table]
        items += [f"[yellow]warning:[/] {w}" for w in self.warnings]
        if float(self.last.get("frac_reward_zero_std") or 0) >= 1.0:
            items.append("[yellow]no group has a learning signal: every completion of a prompt scored the same[/]")
        if self.sample:
            items.append(Panel(self.sample[:400], title="sample completion", border_style="dim"))
        return Panel(Group(*items), title=f"lowmem-r1 · {self.run.path}", border_style="green")


def print_summary(run: RunDir, console: Console) -> None:
    """Reward at the start vs the end, time per step, where the adapter is."""
    rows = [r for r in read_jsonl(run.metrics) if "reward" in r]
    info = run.info()
    table = Table(title="run summary", show_header=False)
    table.add_column(style="cyan")
    table.add_column()
    if rows:
        k = max(1, min(5, len(rows) // 4 or 1))
        start = sum(r["reward"] for r in rows[:k]) / k
        end = sum(r["reward"] for r in rows[-k:]) / k
        table.add_row("reward (mean of first/last steps)", f"{start:.3f} -> {end:.3f}  ({end - start:+.3f})")
        names = sorted({k2[8:-5] for r in rows for k2 in r if k2.startswith("rewards/") and k2.endswith("/mean")})
        for name in names:
            a = [r.get(f"rewards/{name}/mean") for r in rows[:k]]
            b = [r.get(f"rewards/{name}/mean") for r in rows[-k:]]
            a = [x for x in a if x is not None]
            b = [x for x in b if x is not None]
            if a and b:
                table.add_row(f"  {name}", f"{sum(a) / len(a):.3f} -> {sum(b) / len(b):.3f}")
        times = [r["step_time"] for r in rows if "step_time" in r]
        if times:
            table.add_row("time per step", f"{sorted(times)[len(times) // 2]:.1f} s (median)")
    losses = [r for r in read_jsonl(run.metrics) if "loss" in r and "reward" not in r]  # an SFT run
    if losses:
        table.add_row("loss (first -> last step)", f"{losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f}")
    table.add_row("steps", f"{info.get('global_step')}/{info.get('max_steps')}")
    if "seconds" in info:
        table.add_row("wall time", f"{info['seconds']:.0f} s")
    table.add_row("adapter", str(run.adapter))
    table.add_row("next", f"lowmem-r1 eval {run.path} --baseline   |   lowmem-r1 merge {run.path}")
    console.print(table)
