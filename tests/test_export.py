"""Learned losses leave their runs: `l2t_jax.export`, the `transfer` method, the example."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import l2t_dlf, l2t_dln
from l2t_jax import checkpoint, export, train
from l2t_jax import workdir as run_workdir
from l2t_jax.errors import ConfigError
from l2t_jax.losses import dln as dln_lib
from l2t_jax.methods import dlf, transfer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dlf_config():
    config = l2t_dlf.get_config("digits,noisy,smoke")
    config.teacher.update(num_episodes=2, episode_steps=10)
    return config


@pytest.fixture(scope="module")
def dlf_run(tmp_path_factory):
    """A finished l2t-dlf run: its workdir and summary."""
    workdir = str(tmp_path_factory.mktemp("dlf"))
    return workdir, train.train_and_evaluate(dlf_config(), workdir)


def batch(num_classes=10, size=6):
    logits = jax.random.normal(jax.random.PRNGKey(1), (size, num_classes))
    return logits, jnp.arange(size) % num_classes


def test_a_dlf_loss_is_restored_from_the_checkpoint_and_computes_the_taught_loss(dlf_run):
    workdir, _ = dlf_run
    loss = export.load(workdir)
    saved = checkpoint.load_params(os.path.join(workdir, dlf.TEACHER_PARAMS_FILE))
    same = jax.tree_util.tree_map(np.array_equal, saved, loss.params)
    assert all(jax.tree_util.tree_leaves(same))
    assert loss.method == "l2t-dlf" and loss.num_steps == 20 and loss.num_classes == 10

    logits, labels = batch()
    stats = {"train_loss": jnp.float32(0.7), "dev_error": jnp.float32(0.25)}
    # The reference: the teacher's loss at s_t = (t / n, batch error, CE / log C, dev error).
    teacher = dlf.build_teacher(loss.config, 10)
    error = float(jnp.mean(jnp.argmax(logits, -1) != labels))
    features = jnp.array([5 / 40, error, 0.7 / math.log(10), 0.25])
    expected = teacher.loss(loss.params, features, logits, labels)
    got = jax.jit(lambda z, y: loss(z, y, step=5, num_steps=40, stats=stats))(logits, labels)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Without stats they are the batch's own; without a step, the end of training.
    ce = float(jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(6), labels]))
    features = jnp.array([1.0, error, ce / math.log(10), error])
    np.testing.assert_allclose(loss(logits, labels), teacher.loss(loss.params, features,
                                                                  logits, labels), rtol=1e-5)
    grads = jax.grad(lambda z: loss(z, labels, step=3))(logits)
    assert grads.shape == logits.shape and bool(jnp.all(jnp.isfinite(grads)))


def test_a_transfer_onto_the_source_setting_reproduces_the_source_student(dlf_run, tmp_path):
    workdir, source = dlf_run
    config = dlf_config()
    config.update(method="transfer", loss_from=workdir)
    summary = train.train_and_evaluate(config, str(tmp_path))
    for field in ("test_error", "best_dev_error", "final_test_error", "best_step"):
        assert summary[field] == source[field], field
    assert summary["loss_method"] == "l2t-dlf"
    with open(tmp_path / transfer.SOURCE_FILE) as f:
        assert json.load(f)["dataset"] == "digits"


def test_a_damaged_final_checkpoint_is_never_exported(dlf_run, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(dlf_run[0], workdir)
    final = os.path.join(workdir, train.CHECKPOINT_DIR, "20")
    os.remove(os.path.join(final, checkpoint.STATE_ITEM, "_METADATA"))
    with pytest.raises(ConfigError, match="checkpoint"):
        export.load(workdir)


def test_a_frozen_dln_exports_as_its_loss_network(tmp_path):
    config = l2t_dln.get_config("digits,smoke")
    config.method = "l2t-dln-fixed"
    train.train_and_evaluate(config, str(tmp_path))
    loss = export.load(str(tmp_path))
    assert not loss.initial_stats
    logits, labels = batch()
    np.testing.assert_allclose(loss(logits, labels, step=7),
                               dln_lib.dln_loss(loss.params, logits, labels), rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"method": "transfer"}, "needs --config.loss_from"),
    ({"loss_from": "/tmp"}, "set --config.method=transfer"),
])
def test_bad_transfer_configs_are_one_line_errors(overrides, message):
    config = dlf_config()
    config.update(overrides)
    with pytest.raises(ConfigError, match=message):
        train.validate_config(config)


def test_a_transfer_from_an_unfinished_run_is_refused_before_anything_is_written(tmp_path):
    source, workdir = tmp_path / "source", tmp_path / "run"
    config = dlf_config()
    config.update(method="transfer", loss_from=str(source))
    with pytest.raises(ConfigError, match="no config.json"):
        train.train_and_evaluate(config, str(workdir))
    run_workdir.record(str(source), dlf_config())  # started, never finished
    with pytest.raises(ConfigError, match="holds no finished run"):
        train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


def test_the_example_trains_a_plain_flax_model_on_the_exported_loss(dlf_run):
    env = {**os.environ, "PYTHONPATH": REPO}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "train_with_learned_loss.py"),
         f"--workdir={dlf_run[0]}", "--steps=200"],
        capture_output=True, text=True, env=env, timeout=300, check=True)
    error = float(result.stdout.strip().splitlines()[-1].split("test error ")[1].rstrip("%"))
    assert error < 50.0  # chance is 90%
