"""The GPU path a hobbyist takes, checked without a GPU: every backend x 4-bit x vLLM x CUDA x bf16
combination runs or is refused with its fix; dtype is decided once; unsloth comes first; the install
resolves (slow: needs the registry). CUDA, bf16 support and unsloth's presence are simulated."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.core.errors import UserError
from lowmem_r1.generation import engine as inference
from lowmem_r1.models import backends, precision
from lowmem_r1.models.backends import unsloth as ub
from lowmem_r1.models.backends.hf import HFBackend
from lowmem_r1.models.backends.select import select as select_backend
from lowmem_r1.preflight import doctor

REPO = Path(__file__).resolve().parent.parent


def make(backend="auto", four_bit=False, vllm=False, dtype="auto"):
    return recipe_from_dict({
        "rewards": [{"name": "brevity"}],
        "model": {"backend": backend, "load_in_4bit": four_bit, "fast_inference": vllm, "dtype": dtype},
        "generation": {"use_vllm": vllm},
    }, check_rewards=False)


def machine(monkeypatch, cuda: bool, bf16: bool, unsloth: bool):
    """A simulated machine: CUDA (capability 8.6 or 7.5), bitsandbytes + vllm installed, unsloth as given.
    Importing unsloth is replaced by a no-op (the CPU here would pick Unsloth's CPU backend)."""
    monkeypatch.setattr(backends, "cuda_available", lambda: cuda)
    monkeypatch.setattr(backends, "unsloth_installed", lambda: unsloth)
    monkeypatch.setattr(backends, "compute_capability", lambda: ((8, 6) if bf16 else (7, 5)) if cuda else None)
    monkeypatch.setattr(backends, "installed", lambda p: p in ("vllm", "bitsandbytes") or (p == "unsloth" and unsloth))
    monkeypatch.setattr(ub, "_cuda", lambda: cuda)
    monkeypatch.setattr(ub.UnslothBackend, "prepare", lambda self: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda and (bf16 or including_emulation))


# (backend, 4-bit, vLLM, CUDA, unsloth installed) -> None (runs) or the words its refusal must contain.
# bf16 support never decides whether a run is allowed, only its dtype: every case runs with and without it.
NO_CUDA_VLLM = "needs a CUDA GPU"
HF_4BIT = "--set model.load_in_4bit=false"
EXPECTED = {}
for _backend in ("auto", "hf", "unsloth"):
    for _four in (True, False):
        for _vllm in (True, False):
            for _cuda in (True, False):
                for _unsloth in (True, False):
                    name = _backend if _backend != "auto" else ("unsloth" if _cuda and _unsloth else "hf")
                    refusal = None
                    if name == "unsloth" and not _unsloth:
                        refusal = "unsloth is not installed"
                    elif name == "hf" and _four and _vllm:
                        refusal = HF_4BIT  # the three ways out, on any machine
                    elif _vllm and not _cuda:
                        refusal = NO_CUDA_VLLM
                    EXPECTED[(_backend, _four, _vllm, _cuda, _unsloth)] = refusal


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "no-bf16"])
@pytest.mark.parametrize("case", sorted(EXPECTED), ids=lambda c: "-".join(
    [c[0], "4bit" if c[1] else "16bit", "vllm" if c[2] else "novllm", "cuda" if c[3] else "cpu",
     "unsloth" if c[4] else "nounsloth"]))
def test_every_combination_runs_or_is_refused_with_its_fix(monkeypatch, case, bf16):
    backend, four, vllm, cuda, unsloth = case
    machine(monkeypatch, cuda, bf16, unsloth)
    recipe = make(backend, four, vllm)
    refusal = EXPECTED[case]
    if refusal is not None:
        with pytest.raises(UserError) as e:
            select_backend(recipe)
        msg = str(e.value)
        assert refusal in msg and "\n" not in msg, msg
        if refusal == HF_4BIT:  # the three ways out
            assert 'pip install "lowmem-r1[gpu]"' in msg and "--set generation.use_vllm=false" in msg
        return
    chosen = select_backend(recipe)
    out = chosen.grpo_overrides(recipe)
    if not cuda:
        assert out.get("use_cpu") is True
        return
    # On a card: the trainer's precision is the dtype the model is loaded in, on both backends.
    want = torch.bfloat16 if bf16 else torch.float16
    assert (out["bf16"], out["fp16"]) == (want == torch.bfloat16, want == torch.float16)
    if chosen.name == "unsloth":
        assert ub.from_pretrained_kwargs(recipe, cuda=True)["dtype"] == want
    assert out.get("use_vllm", False) == vllm


def test_the_table_has_every_combination():
    assert len(EXPECTED) * 2 == 3 * 2 * 2 * 2 * 2 * 2  # backends x 4-bit x vLLM x CUDA x unsloth, x bf16 above


def test_hf_4bit_vllm_is_refused_by_dry_run_before_a_run_directory(tmp_path):
    """Machine-independent, so `train --dry-run` refuses it here too (no CUDA), and nothing is written."""
    recipe = tmp_path / "r.toml"
    run = tmp_path / "run"
    recipe.write_text('[model]\nbackend = "hf"\nload_in_4bit = true\n\n[generation]\nuse_vllm = true\n\n'
                      f'[output]\ndir = "{run}"\n\n[[rewards]]\nname = "brevity"\n')
    done = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "train", str(recipe), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "trl#4973" in done.stderr and "Traceback" not in done.stderr and not run.exists()


# --- dtype --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,bf16,want", [
    ("bfloat16", False, "float16"),  # a T4 asked for bf16: fp16 on both backends, not a mid-run TypeError
    ("bfloat16", True, "bfloat16"),
    ("auto", False, "float16"),
    ("float32", True, "float32"),  # full precision: neither flag, on both backends (unsloth used to set fp16)
    ("float16", True, "float16"),
])
def test_one_dtype_for_loader_and_trainer_on_both_backends(monkeypatch, dtype, bf16, want):
    machine(monkeypatch, cuda=True, bf16=bf16, unsloth=True)
    recipe = make("unsloth", dtype=dtype)
    want = getattr(torch, want)
    flags = {"bf16": want == torch.bfloat16, "fp16": want == torch.float16}
    assert ub.from_pretrained_kwargs(recipe, cuda=True)["dtype"] == want
    hf_out = HFBackend().grpo_overrides(recipe)
    us_out = ub.UnslothBackend().grpo_overrides(recipe)
    assert {k: hf_out[k] for k in flags} == flags == {k: us_out[k] for k in flags}


def test_bf16_support_is_native_only(monkeypatch):
    """A T4 answers True to is_bf16_supported() (emulation); the toolkit asks without emulation everywhere."""
    machine(monkeypatch, cuda=True, bf16=False, unsloth=False)
    assert torch.cuda.is_bf16_supported() is True  # what the old code asked
    assert precision.bf16_supported() is False
    assert precision.torch_dtype("auto", cuda=True) == torch.float16
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    rows, _ = doctor.torch_checks()
    assert any(r.what == "bf16" and "not supported" in r.value for r in rows)


def test_chat_and_training_use_the_same_4bit_config(monkeypatch, tmp_path):
    """NF4 with double quantization in training and in chat/eval (the adapter is read against the same base)."""
    seen = {}

    class Fake:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.update(kwargs)
            raise OSError("stop here")

    import transformers

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", Fake)
    with pytest.raises(UserError):
        inference._load_hf(inference.ModelRef(str(tmp_path), label="x", load_in_4bit=True))
    q = seen["quantization_config"]
    assert q.bnb_4bit_use_double_quant and q.bnb_4bit_quant_type == "nf4"
    assert q.to_dict() == precision.nf4_config(seen["dtype"]).to_dict()


# --- order of imports -----------------------------------------------------------------------------------


def test_chat_with_unsloth_imports_unsloth_before_the_tokenizer(monkeypatch):
    order = []
    monkeypatch.setattr(ub, "prepare", lambda standby=False: order.append("unsloth"))
    monkeypatch.setattr(inference, "load_tokenizer", lambda ref: order.append("tokenizer") or object())
    monkeypatch.setattr(inference, "_load_unsloth", lambda ref, tok: order.append("model"))
    inference.load_generator(inference.ModelRef("x", label="x"), engine="unsloth")
    assert order == ["unsloth", "tokenizer", "model"]


def test_select_imports_unsloth_before_touching_cuda(monkeypatch):
    """The capability probe initialises CUDA; unsloth sets the allocator's environment on import: it goes first."""
    machine(monkeypatch, cuda=True, bf16=True, unsloth=True)
    order = []
    monkeypatch.setattr(backends, "compute_capability", lambda: order.append("cuda") or (8, 6))
    monkeypatch.setattr(ub.UnslothBackend, "prepare", lambda self: order.append("unsloth"))
    select_backend(make("auto", four_bit=True, vllm=True))
    assert order and order[0] == "unsloth"


def test_hf_path_bounds_vllms_context(monkeypatch):
    machine(monkeypatch, cuda=True, bf16=True, unsloth=False)
    out = HFBackend().grpo_overrides(make("hf", vllm=True))
    r = make("hf", vllm=True)
    assert out["vllm_max_model_length"] == r.data.max_prompt_length + r.generation.max_completion_length


def test_gsm8k_follows_unsloths_current_notebook():
    """nb/Qwen2.5_(3B)-GRPO.ipynb: UNSLOTH_VLLM_STANDBY=1 and gpu_memory_utilization = 0.9."""
    from lowmem_r1.config.recipe import load_recipe

    m = load_recipe(REPO / "recipes" / "gsm8k.toml").model
    assert m.vllm_standby and m.gpu_memory_utilization == 0.9


# --- doctor and the install ---------------------------------------------------------------------------------


def test_doctor_names_each_library_outside_the_tested_gpu_set(monkeypatch):
    versions = {"torch": "2.13.0+cu128", "vllm": "0.30.0", "numpy": "2.4.6", "unsloth": "2026.10.9"}
    monkeypatch.setattr(doctor, "version_of", lambda p: versions.get(p.replace("-", "_")))
    rows = doctor.gpu_set_checks(cuda=True)
    named = {r.what for r in rows}
    assert named == {"vllm (GPU set)", "numpy (GPU set)"}  # torch's +cu128 build label is the same version
    assert all("constraints-gpu.txt" in r.fix for r in rows)
    assert doctor.tested_gpu_set()["vllm"] == "0.31.0"


def readme_gpu_command() -> list[str]:
    """The README's GPU install command (the `pip install` line that names constraints-gpu.txt)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"\s*pip install .*constraints-gpu\.txt", ln)]
    assert lines, "README has no `pip install ... constraints-gpu.txt` line"
    return shlex.split(lines[0].split("#")[0])


def test_readme_gpu_command_is_the_one_doctor_suggests():
    assert readme_gpu_command() == shlex.split(doctor.GPU_INSTALL)


@pytest.mark.slow
def test_readme_gpu_install_resolves(tmp_path):
    """pip's resolver, dry-run, on exactly README's GPU command (torch included, as the user has it)."""
    cmd = readme_gpu_command()
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", *cmd, "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report)], cwd=REPO, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 and re.search(r"NewConnectionError|Max retries|Temporary failure|No route", done.stderr):
        pytest.skip("the package registry is unreachable from here")
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    got = {i["metadata"]["name"].lower().replace("-", "_"): i["metadata"]["version"]
           for i in json.loads(report.read_text())["install"]}
    for package, version in doctor.tested_gpu_set().items():
        assert got[package].split("+")[0] == version, package
