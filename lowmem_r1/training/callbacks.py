"""Trainer callbacks that need no transformers import: metrics.jsonl and Ctrl-C handling.

With several processes the Trainer calls every callback on every process: only the main one
(state.is_world_process_zero) writes, and a Ctrl-C stops all of them at the same step."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from lowmem_r1.core import distributed
from lowmem_r1.core.faults import maybe_fault


class Callback:
    """A TrainerCallback without importing transformers: the Trainer calls `on_<event>(args, state,
    control, **kwargs)` on every callback for every event; unknown events are no-ops here."""

    def __getattr__(self, name):
        if name.startswith("on_"):
            return _noop
        raise AttributeError(name)


def _noop(*args, **kwargs):
    return None


class MetricsLog(Callback):
    """One JSON line per logged step, with its step number, appended and flushed as it happens."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "train_runtime" in logs or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def _plain(v):
    if v is None:
        return None
    try:
        return float(v) if not isinstance(v, (int, str, bool)) else v
    except (TypeError, ValueError):
        return str(v)


class Interrupt(Callback):
    """Ctrl-C once: finish the step, checkpoint, stop. Twice: stop now (KeyboardInterrupt)."""

    def __init__(self):
        self.requested = False
        self._console = None

    def _handler(self, signum, frame):
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        if self._console is not None:
            self._console.print(
                "\n[yellow]Ctrl-C:[/] finishing this step, then saving a checkpoint (Ctrl-C again to stop now)"
            )

    def installed(self, console):
        self._console = console
        return _SignalScope(self)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        maybe_fault("optimizer", state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        maybe_fault("step_end", state.global_step)
        self.requested = distributed.any_process(self.requested, args.device)  # a collective: every process, every step
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


class _SignalScope:
    def __init__(self, interrupt: Interrupt):
        self.interrupt = interrupt
        self.previous = None

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self.interrupt._handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)
        return False
