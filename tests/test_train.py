"""The driver end to end: outputs, dev selection, exact resume after a crash or a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import ce_baseline
from l2t_jax import checkpoint, data, metrics, train
from l2t_jax.errors import ConfigError, DivergenceError

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
    with open(os.path.join(crashed, metrics.METRICS_FILE), "a") as f:
        f.write('{"step": 60, "train/lo')  # what a kill in the middle of a write leaves

    resumed = train.train_and_evaluate(smoke_config(), crashed)
    for key in ("test_error", "best_dev_error", "best_step", "final_test_error",
                "final_dev_error"):
        assert resumed[key] == reference[key], key
    # The JSONL history is the same as the uninterrupted run's, each step once, the torn
    # line gone.
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


def _files(directory):
    """``{relative path: bytes}`` of every file under `directory`."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                found[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return found


def test_a_workdir_of_another_config_is_refused_unless_allowed(tmp_path):
    train.train_and_evaluate(smoke_config(), str(tmp_path))
    before = _files(tmp_path)
    changed = smoke_config()
    changed.optimizer.learning_rate = 0.5
    with pytest.raises(ConfigError, match="config.optimizer.learning_rate: 0.05 -> 0.5"):
        train.train_and_evaluate(changed, str(tmp_path))
    assert _files(tmp_path) == before  # nothing written
    # The checkpoint interval and the divergence thresholds change no finished result.
    train.train_and_evaluate(smoke_config(checkpoint_every=30, max_growth=1e9), str(tmp_path))
    train.train_and_evaluate(changed, str(tmp_path), allow_config_change=True)
    with open(tmp_path / train.CONFIG_FILE) as f:
        assert json.load(f)["optimizer"]["learning_rate"] == 0.5


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    reference = train.train_and_evaluate(smoke_config(), str(tmp_path))
    expected = metrics.read_metrics(str(tmp_path))
    # Random bytes in the middle of the newest checkpoint's largest data file: orbax
    # restores it without complaint, with wrong values.
    data_files = [os.path.join(root, name)
                  for root, _, names in os.walk(tmp_path / "checkpoints" / "60")
                  for name in names if os.sep + "d" + os.sep in os.path.join(root, name)]
    largest = max(data_files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        f.write(os.urandom(64))

    resumed = train.train_and_evaluate(smoke_config(), str(tmp_path))
    for key in ("test_error", "best_dev_error", "best_step", "final_test_error"):
        assert resumed[key] == reference[key], key
    assert metrics.read_metrics(str(tmp_path)) == expected
    assert os.listdir(tmp_path / checkpoint.DAMAGED_DIR) == ["60"]  # kept, set aside


def test_a_skipped_teacher_update_is_allowed_unless_the_policy_raises():
    scalars = {"train/loss": 0.5, "meta/nonfinite": 1.0, "meta/objective": np.nan}
    assert train.check_health(scalars, 10, train.Health(nonfinite_section="teacher"), {})
    with pytest.raises(DivergenceError, match="on_nonfinite=skip"):
        train.check_health(scalars, 10, train.Health(nonfinite_section="teacher",
                                                     nonfinite_raises=True), {})


@pytest.mark.parametrize("scalars, first, message", [
    ({"train/loss": np.inf}, {}, "train/loss is inf; lower config.optimizer.learning_rate"),
    ({"dln/spread": np.nan}, {}, "dln/spread is nan; lower config.dln's learning rates"),
    ({"meta/teacher_norm": 4e6}, {"meta/teacher_norm": 3.0}, "max_growth"),
    ({"train/cross_entropy": 2e3}, {"train/cross_entropy": 2.3}, "max_cross_entropy"),
])
def test_a_diverging_value_stops_the_run_in_one_line(scalars, first, message):
    health = train.Health(max_cross_entropy=1e3, max_growth=1e6, nonfinite_section="dln")
    with pytest.raises(DivergenceError, match=message) as error:
        train.check_health(scalars, 10, health, first)
    assert "\n" not in str(error.value)
    # Growth is measured from the first value, recorded when first seen.
    assert train.check_health({"meta/teacher_norm": 2e6}, 10, health, {}) is False
