"""Backends load the model + tokenizer + LoRA and say which trainer settings differ. Selection lives here.

    hf       transformers + peft (+ bitsandbytes NF4 when model.load_in_4bit) + TRL's GRPOTrainer.
    unsloth  Unsloth's FastLanguageModel (4-bit, fused kernels, colocated vLLM) + TRL's GRPOTrainer.
    auto     unsloth when CUDA and unsloth are both present, else hf - and it says so.

A backend is any object with:
    name: str, why: str (set by select: why this backend)
    load(recipe) -> (peft_model, tokenizer)
    grpo_overrides(recipe) -> dict        extra GRPOConfig keyword arguments
(Generation for chat/eval is generation/engine.py's, which picks its own engine.)

Unsloth must be imported before trl/transformers/peft in a process, so `select` is called before the
trainer imports anything heavy.
"""

from __future__ import annotations

import importlib.util
import logging

from lowmem_r1.core.errors import UserError
from lowmem_r1.models import vllm_cpu

log = logging.getLogger("lowmem_r1")


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def unsloth_installed() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def choose(backend: str) -> tuple[str, str]:
    """The backend name to use and why, without importing it."""
    if backend == "hf":
        return "hf", "asked for in the recipe (model.backend = 'hf')"
    if backend == "unsloth":
        return "unsloth", "asked for in the recipe (model.backend = 'unsloth')"
    cuda, unsloth = cuda_available(), unsloth_installed()
    if cuda and unsloth:
        return "unsloth", "auto: CUDA and unsloth are present"
    if cuda:
        return "hf", 'auto: CUDA is present but unsloth is not installed (pip install "lowmem-r1[gpu]")'
    return "hf", "auto: no CUDA device, training on CPU with transformers + peft + TRL"


def preflight(recipe) -> str:
    """What `train --dry-run` checks, importing nothing heavy: on a CUDA machine everything select() checks;
    on one without (a GPU recipe validated on a laptop) only what no machine could run. The backend name."""
    name, _ = choose(recipe.model.backend)
    if cuda_available():
        refuse(requirements(recipe, name))
    elif recipe.model.backend != "auto":
        refuse(combination_problems(recipe, name))
    return name


def refuse(problems: list[str]) -> None:
    if problems:
        more = f" (+{len(problems) - 1} more: run `lowmem-r1 doctor RECIPE`)" if len(problems) > 1 else ""
        raise UserError(problems[0] + more)


# --------------------------------------------------------------------------------------------------
# GPU-only settings: refuse clearly where they cannot work, fall back out loud where it is safe.

GPU_EXTRA = 'pip install "lowmem-r1[gpu]"'


def lora_kwargs(lora) -> dict:
    """The recipe's [lora] section in peft's names (LoraConfig and Unsloth's get_peft_model take these)."""
    return dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                use_rslora=lora.use_rslora)


def vllm_server_kwargs(generation) -> dict:
    """GRPOConfig's server-mode keys (TRL 1.15 names) when generation.vllm_mode = "server", else none. The
    server itself is started by `lowmem-r1 serve` (generation/serve.py), which also checks it before step 1."""
    g = generation
    if g.vllm_mode != "server":
        return {}
    return dict(vllm_server_host=g.vllm_server_host, vllm_server_port=g.vllm_server_port,
                vllm_server_timeout=g.vllm_server_timeout)


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def compute_capability() -> tuple[int, int] | None:
    if not cuda_available():
        return None
    import torch

    return torch.cuda.get_device_capability(0)


def requirements(recipe, name: str | None = None) -> list[str]:
    """Why this machine cannot run the recipe with backend `name`: one line each, naming the key and the
    fix. Empty when it can. `doctor` shows the same list."""
    m, g = recipe.model, recipe.generation
    name = name or choose(m.backend)[0]
    cuda = cuda_available()
    out: list[str] = combination_problems(recipe, name)
    if name == "unsloth" and not unsloth_installed():
        out.append(f'model.backend = "unsloth": unsloth is not installed; {GPU_EXTRA}, or --set model.backend=hf')
    if m.load_in_4bit and not installed("bitsandbytes"):
        out.append(f"model.load_in_4bit: bitsandbytes is not installed; {GPU_EXTRA}, or --set model.load_in_4bit=false")
    if "8bit" in recipe.training.optim and not installed("bitsandbytes"):
        out.append(f"training.optim: {recipe.training.optim} needs bitsandbytes; {GPU_EXTRA}, or --set training.optim=adamw_torch")
    for key, on in (("model.fast_inference", m.fast_inference), ("generation.use_vllm", g.use_vllm)):
        if not on:
            continue
        off = f"--set {key}=false"
        if not cuda and key == "generation.use_vllm":  # vLLM's CPU build: TRL's colocated engine (models/vllm_cpu.py)
            why = vllm_cpu.usable() or (g.vllm_mode == "server" and "TRL's server-mode weight sync needs NCCL "
                                        "(a GPU); --set generation.vllm_mode=colocate")
            if why:
                out.append(f"{key}: vLLM on this CPU: {why}; or {off}")
        elif not cuda:
            out.append(
                f"{key}: vLLM generation needs a CUDA GPU and this machine has none (a GPU recipe); run it on a "
                f"CUDA machine, or {off} (and a small model.name) to run it here on the CPU"
            )
        elif not installed("vllm"):
            out.append(f"{key}: vllm is not installed; {GPU_EXTRA}, or {off}")
        elif (compute_capability() or (7, 0)) < (7, 0):
            major, minor = compute_capability()
            out.append(f"{key}: this GPU (compute capability {major}.{minor}) is too old for vLLM (7.0+); {off}")
    if name == "unsloth" and cuda and g.use_vllm and not m.fast_inference and m.load_in_4bit:
        out.append(
            "generation.vllm_mode = 'server': TRL's vLLM server cannot receive 4-bit weight updates "
            "(huggingface/trl#4973); --set model.load_in_4bit=false (16-bit LoRA), or generate colocated with "
            "--set generation.vllm_mode=colocate --set model.fast_inference=true"
            if g.vllm_mode == "server" else
            "generation.use_vllm: with unsloth and a 4-bit model, vLLM must share the weights (TRL's own "
            "engine cannot receive 4-bit weight updates); --set model.fast_inference=true"
        )
    return list(dict.fromkeys(out))


def combination_problems(recipe, name: str) -> list[str]:
    """Settings no machine can run together on backend `name` (the same on a GPU, a laptop or in CI):
    TRL's colocated vLLM receives peft-merged packed 4-bit weights without their quant state and fails at
    the first weight sync (huggingface/trl#4973, #3654); Unsloth's engine shares the 4-bit weights instead."""
    m, g = recipe.model, recipe.generation
    if name == "unsloth" and m.fast_inference and g.use_vllm and g.vllm_mode == "server":
        return [
            "generation.vllm_mode = 'server' with model.fast_inference on unsloth: Unsloth's engine shares the "
            "training weights on the same GPU and its trainer forces colocated generation, so the server would "
            "go unused; --set model.fast_inference=false to generate on the server, or "
            "--set generation.vllm_mode=colocate"
        ]
    if name == "hf" and m.load_in_4bit and (g.use_vllm or m.fast_inference):
        why = "model.backend = 'hf'" if m.backend == "hf" else "auto chose hf: unsloth is not installed"
        off = "--set generation.use_vllm=false" + (" --set model.fast_inference=false" if m.fast_inference else "")
        return [(
            f"model.load_in_4bit with vLLM on the hf backend ({why}): TRL's vLLM cannot receive 4-bit weight "
            f"updates (huggingface/trl#4973); ways out: {GPU_EXTRA} (Unsloth's engine shares the 4-bit weights), "
            f"or --set model.load_in_4bit=false, or {off}"
        )]
    return []


def fallbacks(recipe, name: str) -> list[str]:
    """What will run differently from what the recipe says, and why (logged, never silent)."""
    m, g = recipe.model, recipe.generation
    cuda = cuda_available()
    notes = []
    if name == "hf" and m.fast_inference:
        notes.append(
            "model.fast_inference: unsloth is not in use, so the hf backend generates with TRL's colocated vLLM "
            f"(a second copy of the weights: more memory than Unsloth's shared engine); {GPU_EXTRA} for Unsloth"
        )
    if name == "unsloth" and not cuda:
        notes.append("unsloth: no CUDA device, Unsloth's CPU backend trains with plain transformers + PEFT (slow)")
    if m.vllm_standby and not (name == "unsloth" and m.fast_inference):
        notes.append("model.vllm_standby: only Unsloth's shared vLLM engine has standby (model.fast_inference); ignored")
    if cuda and not (m.fast_inference or g.use_vllm):
        notes.append(
            "generation: transformers generate() on the GPU (slow for long completions); "
            + ("--set model.fast_inference=true" if name == "unsloth" else "--set generation.use_vllm=true")
            + " to generate with vLLM"
        )
    return notes


__all__ = [
    "choose", "select", "preflight", "vllm_server_kwargs", "requirements", "combination_problems", "fallbacks", "cuda_available", "unsloth_installed", "UserError",
]
