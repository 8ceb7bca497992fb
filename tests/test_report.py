"""report: plots from a small metrics file (real, non-empty images), the summary, a run still going."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowmem_r1.core.errors import UserError
from lowmem_r1.runs.report import report, samples, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path: Path, steps: int = 12, torn: bool = True, kl: bool = False, status: str = "running") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "run.json").write_text(json.dumps({"base_model": "x", "status": status, "global_step": steps,
                                               "max_steps": 30}))
    with open(path / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            row = {"step": s, "reward": s / steps, "reward_std": 0.4 - s / 100, "rewards/answer_match/mean": s / steps,
                   "rewards/brevity/mean": 0.3 + s / 100, "frac_reward_zero_std": 0.5 - s / 50,
                   "completions/mean_length": 26.0 - s, "completions/clipped_ratio": 0.0, "learning_rate": 5e-4,
                   "step_time": 6.1}
            if kl:
                row["kl"] = s / 1000
            f.write(json.dumps(row) + "\n")
        if torn:  # the trainer was writing when we read
            f.write('{"step": 13, "reward": 0.9, "rew')
    with open(path / "completions.jsonl", "w") as f:
        for s, text, r in ((1, "To add 3 and 5 we can use counting", 0.0), (1, "It is 7", 0.0),
                           (steps, "8", 1.0), (steps, "8", 1.0), (steps, "9", 0.0)):
            f.write(json.dumps({"step": s, "prompt": [{"role": "user", "content": "What is 3 + 5?"}],
                                "completion": text, "rewards": {"answer_match": r}, "reward": r}) + "\n")
    return path


def read_png(path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    return mpimg.imread(path)


def test_report_writes_real_plots_of_a_running_run(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    summary = report(run)
    out = run / "report"
    assert summary["logged_steps"] == 12  # the torn 13th line is skipped
    names = {"reward.png", "reward_std.png", "completion_length.png", "frac_reward_zero_std.png", "overview.png"}
    assert set(summary["plots"]) == names and "kl.png" not in summary["plots"]  # beta = 0: no kl logged
    for name in names:
        img = read_png(out / name)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01  # something was drawn, not a blank canvas
    assert json.loads((out / "summary.json").read_text())["status"] == "running"
    text = capsys.readouterr().out
    assert "running, step 12/30" in text and "rewards/answer_match/mean" in text
    assert "start of training" in text and "end of training" in text


def test_summary_start_and_end(tmp_path):
    rows = [{"step": s, "reward": float(s), "completions/mean_length": 30.0 - s} for s in range(1, 21)]
    got = {k: (a, b) for k, a, b in summarize(rows)}
    assert got["reward"] == (1.5, 19.5)  # means of the first and last tenth
    assert got["completions/mean_length"] == (28.5, 10.5)
    first, last = samples([{"step": 1, "completion": "a", "reward": 0}, {"step": 1, "completion": "a", "reward": 0},
                           {"step": 5, "completion": "b", "reward": 1}, {"step": 5, "completion": "c", "reward": 0}])
    assert [c["completion"] for c in first] == ["a"]  # repeats are shown once
    assert [c["completion"] for c in last] == ["b", "c"]  # best reward first


def test_report_kl_plot_and_rerun(tmp_path):
    run = write_run(tmp_path / "run", kl=True, torn=False, status="completed")
    assert "kl.png" in report(run)["plots"]
    (run / "report" / "stale.png").write_bytes(b"x")
    report(run)  # a second report replaces the folder whole
    assert not (run / "report" / "stale.png").exists()
    read_png(run / "report" / "kl.png")


def test_report_before_the_first_step_and_errors(tmp_path, capsys):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "running", "global_step": 0, "max_steps": 10}))
    assert report(run)["plots"] == []
    assert "no metrics logged yet" in capsys.readouterr().out
    with pytest.raises(UserError, match="not a lowmem-r1 run directory"):
        report(tmp_path)
    with pytest.raises(UserError, match="no such run directory"):
        report(tmp_path / "missing")


def test_cli_report(tmp_path):
    from typer.testing import CliRunner

    from lowmem_r1.cli import app

    run = write_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["report", str(run), "--samples", "1"])
    assert result.exit_code == 0, result.output
    assert (run / "report" / "overview.png").stat().st_size > 10_000
