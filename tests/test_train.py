"""The driver end to end: outputs, dev selection, exact resume after a crash or a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from configs import ce_baseline
from l2t_jax import data, metrics, train
from l2t_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**train_overrides):
    config = ce_baseline.get_config("digits,smoke")
    config.train.update(train_overrides)
    return config


def test_smoke_run_writes_everything_a_user_looks_at(tmp_path):
    summary = train.train_and_evaluate(smoke_config(), str(tmp_path))
    with open(tmp_path / train.SUMMARY_FILE) as f:
        assert json.load(f) == summary
    records = metrics.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == list(range(10, 61, 10))
    eval_records = [r for r in records if "dev/error" in r]
    assert [r["step"] for r in eval_records] == [20, 40, 60]
    # Selection on dev: the reported test error is the one at the lowest dev error.
    best = min(eval_records, key=lambda r: r["dev/error"])
    assert summary["best_step"] == best["step"]
    assert summary["test_error"] == pytest.approx(best["test/error"], abs=1e-4)
    # A 60-step MLP on digits is already far better than chance (90% error).
    assert summary["test_error"] < 20.0
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    assert any(name.startswith("events.out.tfevents")
               for name in os.listdir(tmp_path / "tensorboard"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["40", "60"]


def test_resume_after_a_crash_finishes_with_the_same_metrics(tmp_path, monkeypatch):
    reference = train.train_and_evaluate(smoke_config(), str(tmp_path / "reference"))

    crashed = str(tmp_path / "crashed")
    original = data.stacked_batches

    def crash_at_step_50(*args, **kwargs):
        if kwargs["start_step"] == 50:  # after the checkpoint at 40: steps 40-50 are lost
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(data, "stacked_batches", crash_at_step_50)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train_and_evaluate(smoke_config(), crashed)
    assert [r["step"] for r in metrics.read_metrics(crashed)][-1] == 50
    monkeypatch.setattr(data, "stacked_batches", original)

    resumed = train.train_and_evaluate(smoke_config(), crashed)
    for key in ("test_error", "best_dev_error", "best_step", "final_test_error",
                "final_dev_error"):
        assert resumed[key] == reference[key], key
    # The JSONL history is the same as the uninterrupted run's, each step once.
    expected = metrics.read_metrics(str(tmp_path / "reference"))
    assert metrics.read_metrics(crashed) == expected


def _launch(workdir, *overrides):
    return [sys.executable, "-m", "launch.train",
            "--config=configs/ce_baseline.py:digits,smoke", f"--workdir={workdir}",
            *overrides]


def test_killed_launcher_resumes_and_matches_an_uninterrupted_run(tmp_path):
    overrides = ["--config.train.num_steps=3000", "--config.train.checkpoint_every=100",
                 "--config.train.eval_every=100"]
    workdir = tmp_path / "killed"
    process = subprocess.Popen(_launch(workdir, *overrides), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (workdir / "checkpoints" / "100").exists():
        assert process.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (workdir / train.SUMMARY_FILE).exists()  # killed before the end

    finished = subprocess.run(_launch(workdir, *overrides), cwd=REPO, capture_output=True,
                              text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "from the checkpoint at step" in finished.stderr
    with open(workdir / train.SUMMARY_FILE) as f:
        resumed = json.load(f)

    config = smoke_config(num_steps=3000, checkpoint_every=100, eval_every=100)
    reference = train.train_and_evaluate(config, str(tmp_path / "reference"))
    for key in ("test_error", "best_dev_error", "best_step", "final_test_error"):
        assert resumed[key] == reference[key], key


def test_launcher_reports_bad_config_in_one_line_without_traceback(tmp_path):
    result = subprocess.run(_launch(tmp_path, "--config.student.name=resnet"), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "unknown student 'resnet'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("field, value, message", [
    ("method", "l2t", "config.method"),
    ("train.num_steps", 0, "config.train.num_steps must be an integer >= 1"),
    ("train.eval_every", 15, "config.train.eval_every (15) must be a multiple"),
    ("optimizer.name", "lamb", "config.optimizer.name"),
    ("optimizer.learning_rate", -1.0, "config.optimizer.learning_rate must be > 0"),
    ("engine.remat", "everything", "config.engine.remat"),
    ("data.name", "imagenet", "imagenet"),
    ("data.noise_rate", 1.5, "noise_rate"),
    ("student.name", "vit", "unknown student 'vit'"),
])
def test_bad_config_fields_are_rejected_before_anything_runs(field, value, message):
    config = smoke_config()
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.validate_config(config)
