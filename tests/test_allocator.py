"""tcmalloc for the heavy commands: which command lines re-execute, and that the re-executed process has it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_r1.core import allocator
from lowmem_r1.preflight import doctor

REPO = Path(__file__).resolve().parent.parent
PROBE = """
import sys
from lowmem_r1.core import allocator
allocator.reexec(sys.argv[1:])
print(allocator.loaded(), allocator.preloaded())
"""


@pytest.mark.parametrize("argv, want", [
    (["train", "r.toml"], True),
    (["--debug", "sample", "runs/x", "--recipe", "r.toml"], True),
    (["eval", "runs/x", "--baseline"], True),
    (["train", "r.toml", "--dry-run"], False),  # loads nothing: stays instant
    (["train", "--help"], False),
    (["chat", "runs/x"], False),
    (["merge", "runs/x"], False),  # big tensors held at once: peak memory matters more than speed
    (["doctor"], False),
    ([], False),
])
def test_which_commands_run_under_tcmalloc(argv, want):
    assert allocator.wanted(argv) is want


def test_preload_keeps_what_is_there():
    assert allocator.preload_env("libt.so", {"LD_PRELOAD": "libx.so", "A": "1"}) == {
        "LD_PRELOAD": "libt.so:libx.so", "A": "1"}
    assert allocator.preload_env("libt.so", {})["LD_PRELOAD"] == "libt.so"
    assert allocator.preloaded({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4:libx.so"})
    assert not allocator.preloaded({"LD_PRELOAD": "libx.so"})


def test_in_process_main_never_execs(monkeypatch):
    """main() called by a test with its own sys.argv must not replace the caller (pytest) by exec."""
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(allocator.OPT_OUT, raising=False)

    def refuse(*a):
        raise AssertionError("exec from an in-process call")

    monkeypatch.setattr(os, "execve", refuse)
    allocator.reexec(["train", "recipe.toml"])  # sys.orig_argv is pytest's: no exec


def _probe(*argv, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="tcmalloc not installed (apt install libtcmalloc-minimal4)")
def test_heavy_command_reexecs_under_tcmalloc_once():
    assert _probe("eval", "runs/x") == ["True", "True"]
    assert _probe("eval", "runs/x", "--dry-run") == ["False", "False"]
    assert _probe("train", "r.toml", LOWMEM_R1_ALLOCATOR="system") == ["False", "False"]


def test_doctor_names_the_allocator(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(allocator.OPT_OUT, raising=False)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    row = next(c for c in doctor.run_checks() if c.what == "memory allocator")
    assert row.status == doctor.INFO and "glibc" in row.value and "libtcmalloc-minimal4" in row.fix
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "libtcmalloc_minimal.so.4")
    row = next(c for c in doctor.run_checks() if c.what == "memory allocator")
    assert row.status == doctor.OK and "tcmalloc" in row.value


def test_a_bad_allocator_value_is_one_line_and_exit_2_before_anything_loads():
    env = {**os.environ, allocator.OPT_OUT: "off"}
    env.pop("LD_PRELOAD", None)
    cli = [sys.executable, "-m", "lowmem_r1", "train", "recipes/demo.toml", "--dry-run"]
    done = subprocess.run(cli, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "LOWMEM_R1_ALLOCATOR='off'" in lines[0] and "'system'" in lines[0]
    assert "Traceback" not in done.stderr


def test_doctor_fails_a_bad_allocator_value(monkeypatch):
    monkeypatch.setenv(allocator.OPT_OUT, "glibc")
    row = next(c for c in doctor.run_checks() if c.what == "memory allocator")
    assert row.status == doctor.FAIL and "LOWMEM_R1_ALLOCATOR='glibc'" in row.value and "auto or system" in row.fix
