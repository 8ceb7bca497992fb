"""tcmalloc under the heavy commands: CPU GRPO steps measured 1.15-1.32x faster, the demo pipeline 1.21x.

glibc's malloc serves every tensor above its mmap threshold with a fresh mmap and unmaps it on free, so
each training step page-faults its activations in again (sys time doubles; scripts/bench_vllm_cpu.py,
256-token completions on 2 cores: train half 6.2 s -> 3.2 s, steady step 28.4 -> 24.6 s without vLLM
and 14.6 -> 11.1 s with it). tcmalloc keeps freed pages for the next step; vLLM's CPU worker and
PyTorch's CPU guides ask for it too. A malloc is chosen when the process starts (LD_PRELOAD), so `main()`
re-executes `train`, `sample` and `eval` once with it in place when the library is installed (Debian /
Ubuntu: `apt install libtcmalloc-minimal4`). LOWMEM_R1_ALLOCATOR=system keeps glibc's malloc.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

from lowmem_r1.core.errors import UserError

COMMANDS = ("train", "sample", "eval")  # where the tensors are: generation and training
OPT_OUT = "LOWMEM_R1_ALLOCATOR"
NAMES = ("tcmalloc_minimal", "tcmalloc")
INSTALL = "apt install libtcmalloc-minimal4 (Debian/Ubuntu) or your system's gperftools package"


def find_tcmalloc() -> str | None:
    """The installed tcmalloc, as the dynamic loader finds it (ldconfig's cache), or None."""
    if not sys.platform.startswith("linux"):
        return None
    for name in NAMES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def mode(env=os.environ) -> str:
    """LOWMEM_R1_ALLOCATOR: "auto" (tcmalloc when installed, the default) or "system" (glibc's malloc)."""
    value = env.get(OPT_OUT, "auto")
    if value not in ("auto", "system"):
        raise UserError(f"{OPT_OUT}={value!r}: use 'auto' (tcmalloc when installed) or 'system' (glibc's malloc)")
    return value


def preloaded(env=os.environ) -> bool:
    return "tcmalloc" in env.get("LD_PRELOAD", "")


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def wanted(argv: list[str]) -> bool:
    """Is this command line one that should run under tcmalloc? (Not --help, not --dry-run: those load nothing.)"""
    return _command(argv) in COMMANDS and not {"--dry-run", "--help", "-h"} & set(argv)


def preload_env(library: str, env=os.environ) -> dict[str, str]:
    """`env` with `library` first in LD_PRELOAD (what is there already stays, after it)."""
    rest = env.get("LD_PRELOAD", "")
    return {**env, "LD_PRELOAD": f"{library}:{rest}" if rest else library}


def reexec(argv: list[str]) -> None:
    """Replace this process with the same command under tcmalloc, when the command wants it; else return.
    A bad LOWMEM_R1_ALLOCATOR fails these commands, --dry-run included, before anything loads."""
    if _command(argv) in COMMANDS:
        mode()
    if wanted(argv) and list(sys.orig_argv[-len(argv):]) == list(argv):
        under_tcmalloc()  # not when main() is called in-process (a test) with its own argv: exec would replace the caller


def under_tcmalloc() -> None:
    """Re-execute this process (sys.orig_argv) with tcmalloc preloaded, once: unless it is there already,
    not installed, or opted out. Same PID, same file descriptors, so a launcher (torchrun) or a shell sees
    no difference; the benchmarks call it so that their child processes inherit the setting."""
    if mode() == "system" or preloaded() or not sys.executable:
        return
    library = find_tcmalloc()
    if library is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, list(sys.orig_argv), preload_env(library))


def describe() -> tuple[str, str, str]:
    """`doctor`'s row: (what runs, "ok" / "info" / "fail", the fix)."""
    try:
        if mode() == "system":
            return f"glibc malloc ({OPT_OUT}=system)", "ok", ""
    except UserError as e:
        return str(e), "fail", f"unset {OPT_OUT}, or set it to auto or system"
    if preloaded():
        return "tcmalloc, already in LD_PRELOAD", "ok", ""
    library = find_tcmalloc()
    if library:
        return f"tcmalloc ({library}): train, sample and eval run under it", "ok", ""
    return "glibc malloc: CPU steps take 1.15-1.32x as long as under tcmalloc", "info", INSTALL


def loaded() -> bool:
    """Is tcmalloc mapped into this process? (What a benchmark prints beside its figures.)"""
    try:
        return "tcmalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def for_benchmark() -> str:
    """A benchmark's first call: run under the toolkit's allocator (its child processes inherit it), and
    say which one, to print beside the figures."""
    under_tcmalloc()
    return "tcmalloc" if loaded() else "glibc malloc"
