"""`lowmem-r1 doctor`: green on this (CPU) machine for the CPU demo, red with a non-zero exit for a GPU
recipe, for a library outside the tested pins, and for a recipe's impossible settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.preflight import doctor as D

REPO = Path(__file__).resolve().parent.parent


def statuses(checks, what):
    return [c.status for c in checks if c.what == what]


def test_pins_come_from_the_installed_metadata_else_pyproject(monkeypatch):
    """doctor checks against the project's own pins: the installed package's requirements, and without an
    installed package every pinned requirement of pyproject.toml (nothing it does not pin)."""
    from packaging.requirements import Requirement

    declared = {}
    for text in D._pyproject_requirements():
        req = Requirement(text)
        if str(req.specifier):
            declared.setdefault(D._norm(req.name), str(req.specifier))
    assert {"trl", "transformers", "unsloth", "vllm"} <= set(declared)

    def not_installed(name):
        raise D.md.PackageNotFoundError(name)

    monkeypatch.setattr(D.md, "requires", not_installed)
    assert D.pins() == declared
    monkeypatch.setattr(D.md, "requires", lambda name: ["trl==9.9", "Unsloth-Zoo>=1; extra == 'gpu'", "rich"])
    assert D.pins() == {"trl": "==9.9", "unsloth_zoo": ">=1"}


def test_this_machine_can_run_the_cpu_path():
    checks = D.run_checks()
    assert all(c.status != D.FAIL for c in checks), [c for c in checks if c.status == D.FAIL]
    assert statuses(checks, "trl") == [D.OK]
    backend = [c for c in checks if c.what == "backend = auto"][0]
    assert backend.value.startswith("hf: auto: no CUDA")  # no GPU here
    assert any(c.what == "torch build" and "CPU build" in c.value for c in checks)


def test_a_library_outside_the_pins_is_red(monkeypatch):
    real = D.version_of
    monkeypatch.setattr(D, "version_of", lambda p: "1.99.0" if p == "trl" else real(p))
    checks = D.run_checks()
    trl = [c for c in checks if c.what == "trl"][0]
    assert trl.status == D.FAIL and f"outside the tested {D.pins()['trl']}" in trl.value and "pip install" in trl.fix


def test_missing_gpu_extras_are_red_only_when_the_recipe_needs_them(monkeypatch):
    real = D.version_of
    monkeypatch.setattr(D, "version_of", lambda p: None if p in ("unsloth", "unsloth_zoo") else real(p))
    assert statuses(D.run_checks(), "unsloth") == [D.INFO]
    from lowmem_r1.models import backends

    monkeypatch.setattr(backends, "unsloth_installed", lambda: False)
    recipe = recipe_from_dict({"rewards": [{"name": "brevity"}], "model": {"backend": "unsloth"}}, check_rewards=False)
    checks = D.run_checks(recipe)
    assert statuses(checks, "unsloth") == [D.FAIL]
    assert any(c.what == "recipe" and c.status == D.FAIL and "model.backend" in c.value for c in checks)


def test_disk_estimates_use_the_model_size(tmp_path):
    recipe = recipe_from_dict({"rewards": [{"name": "brevity"}], "model": {"name": "Qwen/Qwen2.5-3B-Instruct"},
                               "output": {"dir": str(tmp_path / "run")}}, check_rewards=False)
    rows = {c.what: c for c in D.disk_checks(recipe)}
    need = lambda what: float(rows[what].value.split("~")[1].split(" GB")[0])  # noqa: E731
    # the run: checkpoints of a ~30M-parameter adapter; export: 3.09B params x 2 bytes, twice (merged + f16 GGUF)
    assert 0.3 < need("disk for the run") < 2
    assert need("disk for export (merge + GGUF)") == pytest.approx(need("disk for the run") + 12.34, abs=0.1)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "doctor", *args], capture_output=True,
                          text=True, timeout=180, cwd=REPO, env={"COLUMNS": "200", "PATH": "/usr/bin",
                                                                  "HF_HUB_OFFLINE": "1"})


def test_doctor_command_exit_codes(tmp_path):
    demo = REPO / "recipes" / "demo.toml"
    if not demo.is_file():
        pytest.skip("recipes/demo.toml is not bundled")
    ok = run_cli(str(demo))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ready" in ok.stdout and "python" in ok.stdout and "backend = auto" in ok.stdout
    bad = run_cli(str(demo), "--set", "model.fast_inference=true")
    assert bad.returncode == 1
    assert "FAIL" in bad.stdout and "model.fast_inference" in bad.stdout and "cannot run" in bad.stdout


def test_gpu_rows_with_a_simulated_card(monkeypatch):
    """The GPU lines cannot run here for real; simulate one old and one current card through torch's API."""
    import torch

    cards = [("Tesla P100", (6, 0)), ("NVIDIA GeForce RTX 4090", (8, 9))]
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: cards[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: cards[i][1])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (20 * 2**30, 24 * 2**30))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    rows, cuda = D.torch_checks()
    assert cuda
    by = {r.what: r for r in rows}
    assert "CUDA 12.8" in by["torch build"].value
    assert by["GPU 0"].status == D.WARN and "6.0" in by["GPU 0"].value and "fast_inference=false" in by["GPU 0"].fix
    assert by["GPU 1"].status == D.OK and "20.0 of 24.0 GiB free" in by["GPU 1"].value


# --- several processes --------------------------------------------------------------------------------

FULL = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env, gpus, cuda, status, says", [
    ({}, 0, False, D.INFO, "one process"),
    (FULL, 2, True, D.OK, "RANK 1 of WORLD_SIZE 2, LOCAL_RANK 1, master 10.0.0.1:29500"),
    (FULL, 0, False, D.OK, "RANK 1 of WORLD_SIZE 2"),  # CPU processes over gloo need no GPU each
    ({"RANK": "0", "WORLD_SIZE": "2"}, 2, True, D.FAIL, "set but not LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),
    ({**FULL, "RANK": "2"}, 2, True, D.FAIL, "RANK=2 with WORLD_SIZE=2"),
    ({**FULL, "WORLD_SIZE": "two"}, 2, True, D.FAIL, "WORLD_SIZE='two' is not a whole number"),
    ({**FULL, "MASTER_PORT": "70000"}, 2, True, D.FAIL, "MASTER_PORT=70000"),
    ({**FULL, "LOCAL_RANK": "1"}, 1, True, D.FAIL, "LOCAL_RANK=1 but this process sees 1 GPU(s)"),
])
def test_launch_environment(env, gpus, cuda, status, says):
    check = D.launch_env_check(env, gpus, cuda)
    assert check.status == status and says in check.value, check
    assert bool(check.fix) == (status == D.FAIL)


def test_distributed_rows_here():
    """This CPU machine: gloo is there, no GPU, no launch variables; deepspeed only matters for ZeRO."""
    rows = {c.what: c for c in D.distributed_checks(cuda=False, env={})}
    assert rows["distributed backends"].status == D.OK and "gloo yes" in rows["distributed backends"].value
    assert rows["GPUs seen"].value == "0 (CUDA_VISIBLE_DEVICES unset)"
    assert rows["launch environment"].status == D.INFO
    assert rows["deepspeed"].status in (D.OK, D.INFO)
    assert "distributed backends" in {c.what for c in D.run_checks()}


def test_zero_without_deepspeed_and_more_processes_than_gpus_are_red(monkeypatch):
    import torch

    monkeypatch.setattr(D, "version_of", lambda p: None if p == "deepspeed" else "1.0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA H100")
    recipe = recipe_from_dict({"rewards": [{"name": "brevity"}],
                               "distributed": {"strategy": "zero3", "nproc": 4}}, check_rewards=False)
    rows = {c.what: c for c in D.distributed_checks(cuda=True, recipe=recipe, env={"CUDA_VISIBLE_DEVICES": "0,1"})}
    assert rows["GPUs seen"].value == "2: NVIDIA H100, NVIDIA H100 (CUDA_VISIBLE_DEVICES='0,1')"
    assert rows["GPUs seen"].status == D.FAIL and "distributed.nproc = 4" in rows["GPUs seen"].fix
    assert rows["deepspeed"].status == D.FAIL and "fsdp2" in rows["deepspeed"].fix
    ddp = recipe_from_dict({"rewards": [{"name": "brevity"}]}, check_rewards=False)
    rows = {c.what: c for c in D.distributed_checks(cuda=True, recipe=ddp, env={})}
    assert rows["deepspeed"].status == D.INFO and rows["GPUs seen"].status == D.OK
