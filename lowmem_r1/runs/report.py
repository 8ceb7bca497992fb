"""`lowmem-r1 report RUN_DIR`: the curves of a run (PNG) and a summary with sample completions.

Reads metrics.jsonl and completions.jsonl as they are, so it works while training is still going (a torn
last line is skipped). Plots go to <run>/report/, which is rebuilt on each call (it is a view of the logs,
not an output of its own).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lowmem_r1.config.recipe import load_recipe
from lowmem_r1.core.errors import UserError
from lowmem_r1.core.fsutil import atomic_dir
from lowmem_r1.rewards.extract import prompt_text
from lowmem_r1.runs import health
from lowmem_r1.runs.rundir import RunDir, newest_run, read_jsonl

PLOTS = {
    "reward": "reward (total and each reward's mean)",
    "reward_std": "reward std within groups",
    "completion_length": "completion length (tokens)",
    "kl": "KL to the reference model",
    "frac_reward_zero_std": "share of groups with no reward spread (no learning signal)",
    "grad_norm": "gradient norm (0: nothing learned)",
    "clip_ratio": "share of tokens whose ratio was clipped",
    "importance_sampling": "vLLM importance-sampling ratio (1: vLLM and trainer agree)",
    "loss": "training loss (SFT: on the completion tokens)",
    "learning_rate": "learning rate",
}


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a metric, skipping rows without it or with a non-finite value."""
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(r.get("step", i + 1)))
            ys.append(float(v))
    return xs, ys


def reward_keys(rows: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k.startswith("rewards/") and k.endswith("/mean"):
                keys[k] = None
    return list(keys)


def length_key(rows: list[dict]) -> str:
    return next((k for k in ("completions/mean_length", "completion_length") if any(k in r for r in rows)),
                "completions/mean_length")


def plot(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per curve, plus overview.png with all of them; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, str, list[tuple[str, str]]]] = [
        ("reward", PLOTS["reward"], [("reward", "reward")] + [(k, k.split("/")[1]) for k in reward_keys(rows)]),
        ("reward_std", PLOTS["reward_std"], [("reward_std", "reward_std")]),
        ("completion_length", PLOTS["completion_length"], [(length_key(rows), "mean length")]),
        ("kl", PLOTS["kl"], [("kl", "kl")]),
        ("frac_reward_zero_std", PLOTS["frac_reward_zero_std"], [("frac_reward_zero_std", "frac_reward_zero_std")]),
        ("grad_norm", PLOTS["grad_norm"], [("grad_norm", "grad_norm")]),
        ("clip_ratio", PLOTS["clip_ratio"], [(f"clip_ratio/{k}_mean", k) for k in ("region", "low", "high")]),
        ("importance_sampling", PLOTS["importance_sampling"],
         [(f"sampling/importance_sampling_ratio/{k}", k) for k in ("mean", "min", "max")]),
    ]
    if not any("reward" in r for r in rows):  # an SFT run: its loss is the curve to watch
        panels += [("loss", PLOTS["loss"], [("loss", "loss")]),
                   ("learning_rate", PLOTS["learning_rate"], [("learning_rate", "learning_rate")])]
    panels = [p for p in panels if any(series(rows, k)[0] for k, _ in p[2])]
    written = []
    for name, title, lines in panels:
        fig, ax = plt.subplots(figsize=(7, 4))
        _draw(ax, rows, title, lines)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if panels:
        cols = 2
        nrows = (len(panels) + 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(12, 3.6 * nrows), squeeze=False)
        for ax, (_, title, lines) in zip(axes.flat, panels):
            _draw(ax, rows, title, lines)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / "overview.png", dpi=90)
        plt.close(fig)
        written.append(out / "overview.png")
    return written


def _draw(ax, rows, title, lines) -> None:
    for key, label in lines:
        xs, ys = series(rows, key)
        if not xs:
            continue
        line, = ax.plot(xs, ys, alpha=0.35 if len(xs) >= 10 else 1.0, linewidth=1)
        if len(xs) >= 10:  # noisy per-step values: a moving average shows the trend
            w = max(3, len(xs) // 10)
            smooth = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, color=line.get_color(), linewidth=2, label=label)
        else:
            line.set_label(label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend(fontsize=8)


def summarize(rows: list[dict]) -> list[tuple[str, float | None, float | None]]:
    """(metric, start, end): means over the first and last tenth of the logged steps (at least 1 step)."""
    if not rows:
        return []
    w = max(1, len(rows) // 10)
    keys = ["reward"] + reward_keys(rows) + ["reward_std", length_key(rows), "completions/clipped_ratio", "kl",
                                             "frac_reward_zero_std", "entropy", "step_time"]
    keys += [k for k, _ in health.SIGNALS if k not in keys] + ["loss"]
    if not any("reward" in r for r in rows):  # an SFT run
        keys = ["loss", "mean_token_accuracy", "learning_rate", "grad_norm", "entropy"]
    out = []
    for k in keys:
        _, head = series(rows[:w], k)
        _, tail = series(rows[-w:], k)
        if head or tail:
            out.append((k, sum(head) / len(head) if head else None, sum(tail) / len(tail) if tail else None))
    return out


def samples(completions: list[dict], per_end: int = 2) -> tuple[list[dict], list[dict]]:
    """A few completions from the first and from the last logged step (best reward first)."""
    if not completions:
        return [], []
    steps = sorted({c.get("step", 0) for c in completions if isinstance(c.get("step", 0), (int, float))})
    if not steps:
        return completions[:per_end], completions[-per_end:]

    def pick(step):
        at = sorted((c for c in completions if c.get("step") == step),
                    key=lambda c: -(c.get("reward") if isinstance(c.get("reward"), (int, float)) else 0))
        seen, picked = set(), []
        for c in at:  # distinct completions: a group often repeats itself
            if str(c.get("completion")) not in seen and len(picked) < per_end:
                seen.add(str(c.get("completion")))
                picked.append(c)
        return picked

    return pick(steps[0]), (pick(steps[-1]) if steps[-1] != steps[0] else [])


def report(run_dir: str | Path | None, console=None, per_end: int = 2) -> dict[str, Any]:
    """Write <run>/report/*.png and report/summary.json, print the summary; returns the summary."""
    import json

    from rich.console import Console

    console = console or Console()
    run = RunDir(Path(run_dir) if run_dir else newest_run())
    if not run.path.is_dir():
        raise UserError(f"{run.path}: no such run directory; pass the RUN_DIR that `lowmem-r1 train` wrote")
    if not (run.exists() or run.metrics.is_file()):
        raise UserError(f"{run.path}: not a lowmem-r1 run directory (no run.json or metrics.jsonl)")
    info: dict = {}
    if run.exists():
        info = run.info()
    rows = [r for r in read_jsonl(run.metrics) if isinstance(r, dict)]
    comps = [c for c in read_jsonl(run.completions) if isinstance(c, dict)]
    out = run.path / "report"
    saved = _saved_recipe(run)
    with atomic_dir(out, force=True, kind="report") as tmp:
        written = [out / p.name for p in plot(rows, tmp)]
        summary = {
            "run": str(run.path), "status": info.get("status"), "global_step": info.get("global_step"),
            "max_steps": info.get("max_steps"), "logged_steps": len(rows),
            "metrics": [{"metric": k, "start": a, "end": b} for k, a, b in summarize(rows)],
            "plots": [p.name for p in written],
            "warnings": health.scan(rows, saved),
            "beta": saved.training.beta if saved is not None else None,
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print(console, run, info, rows, comps, summary, per_end)
    return summary


def _print(console, run, info, rows, comps, summary, per_end) -> None:
    from rich.table import Table
    from rich.text import Text

    status = info.get("status", "unknown")
    step = info.get("global_step", rows[-1].get("step") if rows else 0)
    title = f"{run.path}  ({status}, step {step}/{info.get('max_steps', '?')}, {len(rows)} logged steps)"
    if not rows:
        console.print(Text(f"{title}: no metrics logged yet", style="yellow"))
        return
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    table.add_column("change", justify="right")
    for m in summary["metrics"]:
        a, b = m["start"], m["end"]
        change = f"{b - a:+.3f}" if a is not None and b is not None else ""
        table.add_row(m["metric"], _num(a), _num(b), change)
    console.print(table)
    if any(m["metric"] == "loss" for m in summary["metrics"]) and summary.get("beta") == 0:
        console.print(Text("loss near 0 is normal for GRPO with beta = 0: judge the run by reward and grad_norm",
                           style="dim"))
    for w in summary.get("warnings", []):
        console.print(Text(f"warning: {w}", style="yellow"))
    first, last = samples(comps, per_end)
    for label, picked in (("start of training", first), ("end of training", last)):
        for c in picked:
            rewards = ", ".join(f"{k}={_num(v)}" for k, v in (c.get("rewards") or {}).items())
            console.print(Text(f"-- {label}, step {c.get('step')}, reward {_num(c.get('reward'))} ({rewards})",
                               style="bold"))
            console.print(Text(_prompt_tail(c.get("prompt")), style="dim"))
            console.print(Text(str(c.get("completion", ""))[:600]))
    console.print(f"plots: {run.path / 'report'}/ ({', '.join(summary['plots']) or 'none'})")


def _num(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a" if v is None else str(v)


def _prompt_tail(prompt) -> str:
    text = prompt_text(prompt) if not isinstance(prompt, str) else prompt
    text = " ".join(text.split())
    return ("prompt: ..." + text[-200:]) if len(text) > 200 else f"prompt: {text}"


def _saved_recipe(run):
    """The run's recipe.toml, for what its rewards check; None when absent or no longer valid."""
    try:
        return load_recipe(run.recipe, check_rewards=False) if run.recipe.is_file() else None
    except Exception:
        return None
