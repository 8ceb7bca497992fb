"""Several processes: the launch, the refused combinations, rank discipline, and - slow - a real
2-process run over gloo (torchrun), a killed rank and its resume."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lowmem_r1.config.recipe import DistributedSection, load_recipe, recipe_from_dict
from lowmem_r1.core import distributed
from lowmem_r1.core.errors import UserError
from lowmem_r1.runs.rundir import RunDir, checkpoint_problem, checkpoint_world_size, read_jsonl
from lowmem_r1.training import launch
from lowmem_r1.training.callbacks import MetricsLog

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "recipes" / "demo.toml"


def cli(*args, env=None, cwd=REPO, timeout=60):
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOWMEM_R1_FAULT", "LOWMEM_R1_FAULT_RANK"):
        if name not in (env or {}):
            full.pop(name, None)
    return subprocess.run([sys.executable, "-m", "lowmem_r1", *args], capture_output=True, text=True, env=full,
                          cwd=cwd, timeout=timeout)


def recipe(**sections):
    raw = {"rewards": [{"name": "answer_match"}], "data": {"source": "builtin:arithmetic", "task": "arithmetic"}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return recipe_from_dict(raw)


@pytest.fixture
def rank1(monkeypatch):
    """This process as rank 1 of 2 (as torchrun would set it), with no process group."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")


# --- batch divisibility against the world size --------------------------------------------------------


def test_batch_divisibility_depends_on_the_world_size():
    r = recipe(training={"per_device_train_batch_size": 2, "num_generations": 4}, distributed={"nproc": 2})
    assert distributed.batch_problem(r.training, 2) is None  # 2 x 2 processes = 4: one group of 4
    msg = distributed.batch_problem(r.training, 1)
    assert "= 2 completions per step" in msg and "valid num_generations: 2;" in msg and "a multiple of 4" in msg
    msg = distributed.batch_problem(r.training, 3)  # 6 completions: groups of 2, 3 or 6
    assert "x 3 processes = 6" in msg and "valid num_generations: 2, 3, 6" in msg and "a multiple of 4 (4, 8, 12" in msg
    r = recipe(training={"per_device_train_batch_size": 8, "num_generations": 8})
    msg = distributed.batch_problem(r.training.model_copy(update={"per_device_train_batch_size": 2}), 2)
    assert "= 4 completions" in msg and "valid num_generations: 2, 4;" in msg and "a multiple of 4 (4, 8" in msg


def test_recipe_refuses_uneven_batch_for_its_nproc(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[training]\nper_device_train_batch_size = 2\nnum_generations = 4\n'
                    '[[rewards]]\nname = "answer_match"\n')
    with pytest.raises(UserError, match=r"r.toml: training.num_generations: .*valid num_generations: 2"):
        load_recipe(path)
    assert load_recipe(path, ["distributed.nproc=2"]).prompts_per_step() == 1


def test_batch_check_agrees_with_trl():
    """Where TRL 1.15's GRPOConfig (one process) refuses the batch, batch_problem does, and only there."""
    from trl import GRPOConfig

    from lowmem_r1.config.recipe import TrainingSection

    for per_device, accumulation, generations in [(4, 1, 4), (6, 1, 4), (2, 2, 4), (3, 1, 2), (8, 3, 6), (5, 1, 5)]:
        training = TrainingSection(per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                                   num_generations=generations)
        try:
            GRPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none", per_device_train_batch_size=per_device,
                       gradient_accumulation_steps=accumulation, num_generations=generations)
            trl_refuses = False
        except ValueError:
            trl_refuses = True
        assert (distributed.batch_problem(training, 1) is not None) == trl_refuses, (per_device, accumulation, generations)


# --- refused combinations ------------------------------------------------------------------------------


def test_zero3_and_fsdp2_with_4bit_need_quant_storage():
    for strategy in ("zero3", "fsdp2"):
        r = recipe(model={"load_in_4bit": True}, distributed={"strategy": strategy})
        found = launch.problems(r, 2, "hf", machine=False)
        assert len(found) == 1 and found[0].startswith("model.bnb_4bit_quant_storage:")
        assert "--set model.bnb_4bit_quant_storage=bfloat16" in found[0] and "strategy=ddp" in found[0]
        ok = recipe(model={"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"}, distributed={"strategy": strategy})
        assert launch.problems(ok, 2, "hf", machine=False) == []
    assert launch.problems(recipe(model={"load_in_4bit": True}, distributed={"strategy": "zero2"}), 2, "hf",
                           machine=False) == []
    # one process: no sharding, nothing to refuse
    assert launch.problems(recipe(model={"load_in_4bit": True}, distributed={"strategy": "zero3"}), 1, "hf") == []


def test_dynamic_sampling_is_one_process_only():
    r = recipe(training={"dynamic_sampling": "refill"})
    (line,) = launch.problems(r, 2, "hf", machine=False)
    assert line.startswith("training.dynamic_sampling = 'refill'") and "dynamic_sampling=off" in line
    assert launch.problems(r, 1, "hf", machine=False) == []


def test_unsloth_refusals_name_the_issue_and_the_way_out():
    r = recipe(model={"backend": "unsloth", "fast_inference": True})
    (line,) = launch.problems(r, 2, "unsloth", machine=False)
    assert "unslothai/unsloth#4559" in line and "model.backend=hf" in line and "vllm_mode='server'" in line
    assert launch.problems(r, 1, "unsloth", machine=False) == []  # one process: Unsloth's own path
    r = recipe(model={"backend": "unsloth"}, distributed={"strategy": "fsdp2"})
    (line,) = launch.problems(r, 2, "unsloth", machine=False)
    assert line.startswith("distributed.strategy = 'fsdp2'") and "strategy=ddp" in line


def test_quant_storage_reaches_bitsandbytes_config():
    pytest.importorskip("bitsandbytes")
    import torch

    from lowmem_r1.models.precision import nf4_config

    assert nf4_config(torch.bfloat16, "bfloat16").bnb_4bit_quant_storage == torch.bfloat16
    assert nf4_config(torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


# --- the launch ----------------------------------------------------------------------------------------


def test_strip_nproc():
    assert launch.strip_nproc(["train", "r.toml", "--nproc", "2", "--set", "a.b=1", "--nproc=3"]) == \
        ["train", "r.toml", "--set", "a.b=1"]


def test_dry_run_shows_the_launch_for_each_strategy():
    out = cli("train", str(DEMO), "--dry-run", "--nproc", "2")
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("would launch:"))
    assert "-m torch.distributed.run --standalone --nproc_per_node=2" in line
    assert line.endswith(f"-m lowmem_r1 train {DEMO}")  # the same command, without --nproc / --dry-run
    assert "64 completions per step (16 prompts x 4 generations)" in out.stdout
    out = cli("train", str(DEMO), "--dry-run", "--nproc", "2", "--set", "distributed.strategy=zero3")
    assert out.returncode == 0, out.stderr
    config = launch.CONFIGS / "zero3.yaml"
    assert f"-m accelerate.commands.launch --config_file {config} --num_processes=2 -m lowmem_r1 train" in out.stdout
    for strategy in ("zero2", "fsdp2"):
        cmd = launch.command(recipe(distributed={"strategy": strategy}), 4, ["train", "r.toml", "--nproc", "4"])
        assert cmd[1:] == ["-m", "accelerate.commands.launch", "--config_file", str(launch.CONFIGS / f"{strategy}.yaml"),
                           "--num_processes=4", "-m", "lowmem_r1", "train", "r.toml"]
    # one process: nothing about a launch
    assert "would launch" not in cli("train", str(DEMO), "--dry-run").stdout


def test_refused_combination_is_one_line_before_anything_runs(tmp_path):
    run = tmp_path / "run"
    out = cli("train", str(DEMO), "--nproc", "2", "--set", "distributed.strategy=zero3", "--set",
              "model.load_in_4bit=true", "--set", f"output.dir={run}", "--dry-run")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith(f"error: {DEMO}: model.bnb_4bit_quant_storage:")
    out = cli("train", str(DEMO), "--nproc", "3", "--set", "training.per_device_train_batch_size=2",
              "--set", f"output.dir={run}")
    assert out.returncode == 2 and "valid num_generations: 2, 3, 6" in out.stderr and "Traceback" not in out.stderr
    if not launch_needs_cuda_here():
        out = cli("train", str(DEMO), "--nproc", "2", "--set", "distributed.strategy=zero2", "--set", f"output.dir={run}")
        assert out.returncode == 2 and "need CUDA GPUs" in out.stderr and "strategy=ddp" in out.stderr
        assert "launching" not in out.stdout
    assert not run.exists()


def launch_needs_cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def test_pipeline_refuses_nproc():
    out = cli("train", str(REPO / "recipes" / "pipeline-demo.toml"), "--nproc", "2", "--dry-run")
    assert out.returncode == 2 and "--nproc" in out.stderr and "Traceback" not in out.stderr


def test_python_m_lowmem_r1_is_the_cli():
    out = cli("--help")
    assert out.returncode == 0 and "train" in out.stdout


def test_shipped_accelerate_configs_match_accelerate():
    """Every shipped config loads with the installed accelerate's schema and every nested key is one of its
    launch arguments (accelerate copies deepspeed_config.x to --x and fsdp_config.x to --fsdp_x)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    dests = {a.dest for a in launch_command_parser()._actions}
    assert set(launch.STRATEGY_CONFIG) == set(DistributedSection.model_fields["strategy"].annotation.__args__)
    for strategy, name in launch.STRATEGY_CONFIG.items():
        path = launch.CONFIGS / name
        ClusterConfig.from_yaml_file(path)
        raw = yaml.safe_load(path.read_text())
        assert raw["mixed_precision"] == "no"  # the recipe's dtype decides, through the trainer's flags
        for section in ("deepspeed_config", "fsdp_config"):
            for key in raw.get(section, {}):
                arg = key if section == "deepspeed_config" or key.startswith("fsdp") else f"fsdp_{key}"
                assert arg in dests, (name, key)
        expected = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}[strategy]
        assert raw["distributed_type"] == expected
    assert yaml.safe_load((launch.CONFIGS / "zero3.yaml").read_text())["deepspeed_config"]["zero_stage"] == 3
    assert yaml.safe_load((launch.CONFIGS / "fsdp2.yaml").read_text())["fsdp_config"]["fsdp_version"] == 2


# --- rank discipline -----------------------------------------------------------------------------------


def test_world_from_the_launcher_environment(rank1):
    w = distributed.world()
    assert (w.rank, w.local_rank, w.size, w.main) == (1, 1, 2, False)
    assert distributed.under_launcher()


def test_a_non_main_rank_writes_no_metrics_completions_or_run_json(tmp_path, rank1):
    from types import SimpleNamespace

    from lowmem_r1.rewards.guard import RewardRecorder, guard_rewards
    from lowmem_r1.training.run import RunStatus

    r = recipe()
    run = RunDir(tmp_path)
    state = SimpleNamespace(global_step=1, is_world_process_zero=False)
    MetricsLog(run.metrics).on_log(None, state, None, logs={"reward": 1.0})
    recorder = RewardRecorder(run.completions, r)
    funcs, _ = guard_rewards(r, recorder)
    funcs[0](prompts=["What is 1 + 1?"], completions=["2"], answer=["2"], trainer_state=state)
    status = RunStatus(run, r, "hf", "resume", None, SimpleNamespace(state=state))
    status.write("running")
    assert list(tmp_path.iterdir()) == []


def test_the_main_rank_writes_them(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lowmem_r1.rewards.guard import RewardRecorder, guard_rewards

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = recipe()
    state = SimpleNamespace(global_step=1, is_world_process_zero=True)
    MetricsLog(tmp_path / "metrics.jsonl").on_log(None, state, None, logs={"reward": 1.0})
    recorder = RewardRecorder(tmp_path / "completions.jsonl", r)
    guard_rewards(r, recorder)[0][0](prompts=["What is 1 + 1?"], completions=["2"], answer=["2"], trainer_state=state)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "reward": 1.0}]
    assert [row["step"] for row in read_jsonl(tmp_path / "completions.jsonl")] == [2]


def test_a_non_main_rank_prints_nothing(capsys):
    from lowmem_r1.training.progress import make_console

    make_console(quiet=True).print("step 1/2")
    assert capsys.readouterr().out == ""


def test_fault_rank_limits_a_fault_to_one_rank(monkeypatch, rank1):
    import signal

    from lowmem_r1.core.faults import maybe_fault

    got = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    try:
        monkeypatch.setenv("LOWMEM_R1_FAULT", "step_end:3:SIGUSR1")
        monkeypatch.setenv("LOWMEM_R1_FAULT_RANK", "0")
        maybe_fault("step_end", 3)
        assert got == []  # this is rank 1: spared
        monkeypatch.setenv("LOWMEM_R1_FAULT_RANK", "1")
        maybe_fault("step_end", 3)
        assert got == [1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_checkpoint_needs_every_ranks_rng_state(tmp_path):
    import torch
    from safetensors.torch import save_file

    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    for name in ("trainer_state.json", "adapter_config.json", "optimizer.pt", "scheduler.pt"):
        (ckpt / name).write_text("{}")
    save_file({"w": torch.zeros(2)}, str(ckpt / "adapter_model.safetensors"))
    assert checkpoint_problem(ckpt) == "no rng_state.pth"
    (ckpt / "rng_state_1.pth").write_bytes(b"x")
    assert checkpoint_problem(ckpt).startswith("no rng_state_0.pth")
    (ckpt / "rng_state_0.pth").write_bytes(b"x")
    assert checkpoint_problem(ckpt) is None and checkpoint_world_size(ckpt) == 2

    from lowmem_r1.training.run import world_size_change

    line = world_size_change(recipe(training={"per_device_train_batch_size": 8, "num_generations": 4}), ckpt, 1)
    assert "written by 2 process(es), this run has 1" in line and "from step 4" in line
    assert "8 completions per step instead of 16" in line and "--nproc 2 resumes it exactly" in line
    assert "\n" not in line


def test_parent_reports_a_dead_main_process_once(tmp_path, capsys):
    run = RunDir(tmp_path)
    run.info_file.write_text(json.dumps({"status": "running", "global_step": 3}))
    assert launch.report_stop(tmp_path, 1, "lowmem-r1 train r.toml --resume X --nproc 2") == 1
    err = capsys.readouterr().err
    assert err.count("--resume") == 1 and "--nproc 2" in err and run.info()["status"] == "failed"
    assert launch.report_stop(tmp_path, 1, "hint") == 1  # already reported (by the main process or above)
    assert capsys.readouterr().err == ""
    run.info_file.write_text(json.dumps({"status": "interrupted"}))
    assert launch.report_stop(tmp_path, 1, "hint") == 130


# --- slow: real processes over gloo -----------------------------------------------------------------------

TINY = ["--set", "training.max_steps=3", "--set", "training.per_device_train_batch_size=4", "--set",
        "training.num_generations=2", "--set", "generation.max_completion_length=6", "--set", "lora.r=4",
        "--set", "training.save_steps=1", "--set", "data.generator.n=64", "--set", "eval.size=2"]

RANK_SCRIPT = '''
import sys
from pathlib import Path

from lowmem_r1.config.recipe import load_recipe
from lowmem_r1.training.run import Start, train


class SaveEachRank:
    """Each rank's own LoRA weights at the end of training, to compare them (test only)."""
    def __getattr__(self, name):
        return lambda *a, **k: None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file
        weights = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(weights, str(Path(sys.argv[2]) / f"rank{args.process_index}.safetensors"))


recipe = load_recipe(sys.argv[1], sys.argv[3:])
sys.exit(train(recipe, Path(sys.argv[1]), Start.new(recipe), callbacks=(SaveEachRank(),)))
'''


def weights_digest(path: Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for key, value in sorted(load_file(str(path)).items()):
        h.update(key.replace(".default", "").encode())
        h.update(value.float().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.slow
def test_two_processes_one_run_identical_adapters(tmp_path, base_model_dir):
    """torchrun --nproc_per_node 2 (gloo): one run directory, each step logged once, both ranks end with the
    same adapter, which is the run's adapter and the one `eval` reads."""
    run = tmp_path / "runs" / "two"
    script = tmp_path / "two_ranks.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(DEMO), str(tmp_path), *[x for x in TINY if x != "--set"],
                          f"output.dir={run}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["two"]  # exactly one run directory
    info = RunDir(run).info()
    assert info["status"] == "completed" and info["world_size"] == 2 and info["global_step"] == 3
    assert [r["step"] for r in read_jsonl(RunDir(run).metrics)] == [1, 2, 3]
    assert sorted({r["step"] for r in read_jsonl(RunDir(run).completions)}) == [1, 2, 3]
    assert out.stdout.count("step 3/3") == 1  # one progress display
    for ckpt in RunDir(run).checkpoint_dirs():
        assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    rank0, rank1 = weights_digest(tmp_path / "rank0.safetensors"), weights_digest(tmp_path / "rank1.safetensors")
    assert rank0 == rank1
    assert weights_digest(run / "adapter" / "adapter_model.safetensors") == rank0

    ev = cli("eval", str(run), "--limit", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "ev"), timeout=900)
    assert ev.returncode == 0, ev.stderr[-2000:]
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert Path(results["adapter"]) == run / "adapter"


@pytest.mark.slow
def test_ctrl_c_stops_every_process_at_the_same_step(tmp_path, base_model_dir):
    """Ctrl-C as a terminal sends it (SIGINT to the foreground process group) during `train --nproc 2`: both
    processes finish the step, one checkpoint and the adapter are saved, the resume command is said once."""
    import signal
    import time

    run = tmp_path / "run"
    log = tmp_path / "log.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lowmem_r1", "train", str(DEMO), "--nproc", "2", *TINY,
                                 "--set", "training.max_steps=8", "--set", "training.save_steps=100", "--set",
                                 f"output.dir={run}"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO, start_new_session=True)
        deadline = time.time() + 600
        while "step 1/8" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=600)
    text = log.read_text()
    assert code == 130, text[-3000:]
    info = RunDir(run).info()
    assert text.count("resume with:") == 1 and info["resume"].endswith(f"--resume {run} --nproc 2")
    step = info["global_step"]
    assert info["status"] == "interrupted" and 1 <= step < 8
    assert [p.name for p in RunDir(run).checkpoint_dirs()] == [f"checkpoint-{step}"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in read_jsonl(RunDir(run).metrics)] == list(range(1, step + 1))


@pytest.mark.slow
def test_killed_rank_stops_the_job_then_resume_completes(tmp_path, base_model_dir):
    """`train --nproc 2`: rank 1 killed (SIGKILL) after step 2 -> the whole job stops, non-zero, with the resume
    command said once; `--resume --nproc 2` finishes the run with every step logged once."""
    run = tmp_path / "run"
    args = ["train", str(DEMO), "--nproc", "2", *TINY, "--set", "training.max_steps=4", "--set", f"output.dir={run}"]
    out = cli(*args, env={"LOWMEM_R1_FAULT": "step_end:2:SIGKILL", "LOWMEM_R1_FAULT_RANK": "1"}, timeout=900)
    assert out.returncode != 0
    assert out.stderr.count("--resume") == 1 and f"--resume {run} --nproc 2" in out.stderr
    assert RunDir(run).info()["status"] == "failed"
    assert [p.name for p in RunDir(run).checkpoint_dirs()] == ["checkpoint-1"]

    out = cli(*args[:2], "--resume", *args[2:], timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    info = RunDir(run).info()
    assert info["status"] == "completed" and info["global_step"] == 4
    assert [r["step"] for r in read_jsonl(RunDir(run).metrics)] == [1, 2, 3, 4]
