"""`lowmem-r1 serve` and server-mode training's check before step 1.

Nothing here starts vLLM (its server needs a CUDA GPU): the command is TRL's own build_command filled from
the recipe, and the check is exercised against a port with nothing listening and a stdlib HTTP server that
answers like vLLM's (/health, /v1/models, /get_world_size)."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lowmem_r1.config.recipe import recipe_from_dict
from lowmem_r1.core.errors import UserError
from lowmem_r1.generation import serve
from lowmem_r1.models import backends

REPO = Path(__file__).resolve().parent.parent
MODEL = "builtin:smollm2-135m-instruct"


def make(port=8000, timeout=1.0, **sections):
    raw = {"rewards": [{"name": "brevity"}], "model": {"name": MODEL},
           "generation": {"use_vllm": True, "vllm_mode": "server", "vllm_server_port": port,
                          "vllm_server_timeout": timeout}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return recipe_from_dict(raw, check_rewards=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the command --------------------------------------------------------------------------------------


def test_parse_gpus():
    assert serve.parse_gpus(None) is None
    assert serve.parse_gpus("0") == [0]
    assert serve.parse_gpus("2, 3") == [2, 3]
    for bad in ("a", "0,,1", "-1", "0,0", ""):
        with pytest.raises(UserError, match="--gpus"):
            serve.parse_gpus(bad)


def test_the_command_is_trls_vllm_serve_filled_from_the_recipe(base_model_dir):
    """TRL's own ScriptArguments and build_command (a wrong field name would raise here), plus the served name
    the check compares, and CUDA_VISIBLE_DEVICES from --gpus."""
    from trl.scripts.vllm_serve import ScriptArguments

    recipe = make(port=8123, data={"max_prompt_length": 100}, generation={"max_completion_length": 28,
                                                                          "vllm_tensor_parallel_size": 2})
    s = serve.ServeSettings(gpus=[2, 3], host="0.0.0.0")
    args = serve.script_args(recipe, s, "/m")
    assert isinstance(args, ScriptArguments)
    assert (args.tensor_parallel_size, args.port, args.host, args.max_model_len) == (2, 8123, "0.0.0.0", 128)
    assert args.gpu_memory_utilization == serve.SERVER_GPU_MEMORY_UTILIZATION
    argv, env = serve.server_command(recipe, s)
    assert env == {"VLLM_SERVER_DEV_MODE": "1", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert argv[1:4] == ["-m", "vllm.entrypoints.cli.main", "serve"]
    assert argv[4] == str(base_model_dir)  # the builtin, resolved through models/names.py
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--weight-transfer-config") + 1] == '{"backend": "nccl"}'  # TRL's weight sync
    assert argv[argv.index("--served-model-name") + 1] == MODEL
    s2 = serve.ServeSettings(tp=1, port=9000)
    argv2, env2 = serve.server_command(recipe, s2)
    assert "CUDA_VISIBLE_DEVICES" not in env2 and argv2[argv2.index("--port") + 1] == "9000"
    assert argv2[argv2.index("--tensor-parallel-size") + 1] == "1"


def test_dry_run_prints_the_command_and_starts_nothing(base_model_dir, monkeypatch):
    monkeypatch.setattr(serve.os, "execve", lambda *a: pytest.fail("dry run started the server"))
    lines = []
    code = serve.serve(REPO / "recipes" / "demo.toml", serve.ServeSettings(gpus=[0, 1], tp=2), dry_run=True,
                       out=lines.append)
    assert code == 0
    assert lines[0].startswith("VLLM_SERVER_DEV_MODE=1 CUDA_VISIBLE_DEVICES=0,1 ")
    assert "--served-model-name" in lines[0] and "vllm.entrypoints.cli.main serve" in lines[0]
    assert any("does not train against a server yet" in line for line in lines)  # demo.toml is colocated/none


def test_machine_independent_problems_even_in_a_dry_run():
    recipe = make()
    with pytest.raises(UserError, match=r"--tp = 3 is more than the 2 GPU\(s\) in --gpus 0,1"):
        serve.serve(REPO / "recipes" / "demo.toml", serve.ServeSettings(gpus=[0, 1], tp=3),
                    dry_run=True, out=lambda _: None)
    assert serve.problems(recipe, serve.ServeSettings(gpu_memory_utilization=1.5), machine=False)


def test_a_real_start_without_a_gpu_is_one_line(monkeypatch, cpu):
    monkeypatch.setattr(serve.os, "execve", lambda *a: pytest.fail("started vLLM without a GPU"))
    with pytest.raises(UserError, match="no CUDA GPU here.*vllm_mode = \"colocate\""):
        serve.serve(REPO / "recipes" / "demo.toml", serve.ServeSettings(), out=lambda _: None)


@pytest.fixture
def cpu(monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: False)


@pytest.fixture
def gpus(monkeypatch):
    """A CUDA machine with 2 GPUs and a CUDA build of vllm."""
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(serve, "_gpu_count", lambda: 2)
    monkeypatch.setattr(serve, "_vllm_is_cpu_build", lambda: False)
    monkeypatch.setattr(backends, "installed", lambda p: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


def test_gpu_machine_problems(gpus):
    port = free_port()
    recipe = make(port=port)
    assert serve.problems(recipe, serve.ServeSettings(), machine=True) == []
    assert "more than the 2 GPU(s) this process sees" in serve.problems(recipe, serve.ServeSettings(tp=4), True)[0]
    assert "no GPU 5" in serve.problems(recipe, serve.ServeSettings(gpus=[0, 5]), True)[0]
    gpus.setattr(backends, "installed", lambda p: p != "vllm")
    assert "vllm (a CUDA build) is not installed" in serve.problems(recipe, serve.ServeSettings(), True)[0]


def test_port_in_use_is_refused(gpus):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        found = serve.problems(make(port=port), serve.ServeSettings(), machine=True)
        assert found == [f"port {port} on 127.0.0.1 is in use (another server?); stop it, or --port another"]
    assert serve.port_in_use("127.0.0.1", port) is None  # closed again: free
    assert "not an address of this machine" in serve.port_in_use("192.0.2.1", port)  # TEST-NET-1


def test_cli_exit_codes():
    run = lambda *a: subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "serve", *a], capture_output=True,
                                    text=True, timeout=120, cwd=REPO)
    bad = run("recipes/demo.toml", "--gpus", "0", "--tp", "2", "--dry-run")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--tp = 2" in bad.stderr
    assert "Traceback" not in bad.stderr


# --- the check before step 1 --------------------------------------------------------------------------


def test_nothing_listening_is_one_line_and_bounded():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        serve.wait_for_server(make(port=port, timeout=0.5), interval=0.1)
    assert time.monotonic() - start < 5
    assert str(e.value) == (f"generation.vllm_mode = 'server': nothing listening at 127.0.0.1:{port} after 0.5 s "
                            f"(generation.vllm_server_timeout); start it with `lowmem-r1 serve RECIPE`")


class FakeVLLM(BaseHTTPRequestHandler):
    """Answers like vLLM's OpenAI server in dev mode (the routes TRL's VLLMClient uses first)."""

    routes: dict = {}

    def do_GET(self):
        status, body = self.routes.get(self.path, (404, {"detail": "Not Found"}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    def start(routes):
        handler = type("Handler", (FakeVLLM,), {"routes": routes})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    servers = []
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def vllm_routes(model_id=MODEL, root="/cache/smollm2", world=True):
    routes = {"/health": (200, {}),
              "/v1/models": (200, {"object": "list", "data": [{"id": model_id, "root": root, "max_model_len": 160}]})}
    if world:
        routes["/get_world_size"] = (200, {"world_size": 2})
    return routes


def test_a_server_that_serves_the_recipes_model(fake_server):
    port = fake_server(vllm_routes())
    info = serve.wait_for_server(make(port=port))
    assert (info.model, info.world_size, info.url) == (MODEL, 2, f"http://127.0.0.1:{port}")


def test_a_hand_started_server_is_matched_by_the_path_it_loaded(fake_server, tmp_path):
    port = fake_server(vllm_routes(model_id=str(tmp_path), root=str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    recipe = make(port=port)
    recipe.model.name = str(tmp_path)  # validate_assignment: a local folder name
    assert serve.check_server(recipe).root == str(tmp_path)


def test_a_server_for_another_model_is_refused(fake_server):
    port = fake_server(vllm_routes(model_id="Qwen/Qwen2.5-3B-Instruct", root="Qwen/Qwen2.5-3B-Instruct"))
    with pytest.raises(UserError, match=r"serves 'Qwen/Qwen2.5-3B-Instruct' .*not model.name = "
                                        r"'builtin:smollm2-135m-instruct'"):
        serve.wait_for_server(make(port=port))


def test_a_plain_vllm_serve_without_trls_endpoints_is_refused(fake_server):
    port = fake_server(vllm_routes(world=False))
    with pytest.raises(UserError, match="no /get_world_size: it was started without VLLM_SERVER_DEV_MODE=1"):
        serve.wait_for_server(make(port=port))


def test_something_else_on_the_port_is_refused(fake_server):
    port = fake_server({"/health": (200, {})})
    with pytest.raises(UserError, match="not a vLLM server"):
        serve.wait_for_server(make(port=port))


def test_an_unhealthy_server_is_waited_for_then_refused(fake_server):
    port = fake_server({"/health": (503, {})})
    with pytest.raises(UserError, match="answers /health with HTTP 503 after 0.3 s"):
        serve.wait_for_server(make(port=port, timeout=0.3), interval=0.1)


# --- training ------------------------------------------------------------------------------------------


def test_train_says_nothing_listening_first_and_leaves_no_run_dir(tmp_path):
    """On this CPU, server mode is also refused for its NCCL weight sync; the missing server is said first."""
    from lowmem_r1.training.run import train

    port = free_port()
    recipe = make(port=port, timeout=0.2, output={"dir": str(tmp_path / "run")})
    with pytest.raises(UserError, match=f"nothing listening at 127.0.0.1:{port}"):
        train(recipe)
    assert not (tmp_path / "run").exists()


def test_train_with_a_server_up_on_cpu_reaches_the_nccl_refusal(fake_server, tmp_path, cpu):
    from lowmem_r1.training.run import train

    recipe = make(port=fake_server(vllm_routes()), output={"dir": str(tmp_path / "run")})
    with pytest.raises(UserError, match="generation.use_vllm: vLLM on this CPU"):
        train(recipe)
    assert not (tmp_path / "run").exists()


def _grpo_fields() -> set[str]:
    from trl import GRPOConfig

    return {f.name for f in dataclasses.fields(GRPOConfig)}


def test_server_keys_reach_grpoconfig_in_both_backends():
    import torch

    from lowmem_r1.models.backends.unsloth import gpu_grpo_overrides

    recipe = make(port=8123, timeout=30, generation={"vllm_server_host": "10.0.0.5"})
    want = {"vllm_server_host": "10.0.0.5", "vllm_server_port": 8123, "vllm_server_timeout": 30.0}
    assert backends.vllm_server_kwargs(recipe.generation) == want
    assert set(want) <= _grpo_fields()
    out = gpu_grpo_overrides(recipe, torch.bfloat16)
    assert out["vllm_mode"] == "server" and want.items() <= out.items()
    colocated = make(generation={"vllm_mode": "colocate"})
    assert backends.vllm_server_kwargs(colocated.generation) == {}


def test_hf_backend_passes_the_server(monkeypatch):
    import torch

    from lowmem_r1.models.backends.hf import HFBackend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = HFBackend().grpo_overrides(make(port=8124))
    assert out["vllm_mode"] == "server" and out["vllm_server_port"] == 8124 and set(out) <= _grpo_fields()


def test_unsloth_shared_engine_with_a_server_is_refused():
    recipe = make(model={"fast_inference": True, "backend": "unsloth"})
    [problem] = backends.combination_problems(recipe, "unsloth")
    assert "server would go unused" in problem and "model.fast_inference=false" in problem
    assert backends.combination_problems(make(model={"backend": "unsloth"}), "unsloth") == []


def test_a_4bit_model_with_a_server_is_refused_on_a_gpu(monkeypatch):
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "compute_capability", lambda: (8, 6))
    monkeypatch.setattr(backends, "installed", lambda p: True)
    monkeypatch.setattr(backends, "unsloth_installed", lambda: True)
    recipe = make(model={"backend": "unsloth", "load_in_4bit": True})
    [problem] = backends.requirements(recipe, "unsloth")
    assert problem.startswith("generation.vllm_mode = 'server': TRL's vLLM server cannot receive 4-bit") \
        and "model.load_in_4bit=false" in problem
    hf = backends.requirements(make(model={"backend": "hf", "load_in_4bit": True}), "hf")
    assert "huggingface/trl#4973" in hf[0]
    assert backends.requirements(make(model={"backend": "unsloth"}), "unsloth") == []


def test_a_run_directory_serves_its_recipes_model(tmp_path, base_model_dir):
    """`serve RUN_DIR` (for --resume): the run's saved recipe and base model."""
    (tmp_path / "recipe.toml").write_text('[model]\nname = "builtin:smollm2-135m-instruct"\n\n[generation]\n'
                                          'use_vllm = true\nvllm_mode = "server"\nvllm_server_port = 8555\n\n'
                                          '[[rewards]]\nname = "brevity"\n')
    (tmp_path / "run.json").write_text("{}")
    lines = []
    assert serve.serve(tmp_path, serve.ServeSettings(), dry_run=True, out=lines.append) == 0
    assert "--port 8555" in lines[0] and str(base_model_dir) in lines[0]
    assert not any("does not train against a server" in line for line in lines)
