"""A test hook for interruption tests: LOWMEM_R1_FAULT="point:step:SIGNAL[,...]" sends SIGNAL to this
process when training reaches `point` (generation, optimizer, save, step_end) at `step`.
With several processes, LOWMEM_R1_FAULT_RANK=R limits it to global rank R (a kill of one rank).

It lets the tests kill a run at exact moments (mid-generation, mid-optimizer-step, mid-checkpoint-save)
instead of guessing with timers. Unset, it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal


def maybe_fault(point: str, step: int) -> None:
    spec = os.environ.get("LOWMEM_R1_FAULT")
    if not spec:
        return
    rank = os.environ.get("LOWMEM_R1_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    for item in spec.split(","):
        try:
            where, at, sig = item.split(":")
        except ValueError:
            continue
        if where == point and int(at) == step:
            os.kill(os.getpid(), getattr(signal, sig if sig.startswith("SIG") else f"SIG{sig}"))
