"""The method interface: the registry, `launch.methods`, plug-ins the driver runs without
naming them, and checkpoints of another state layout."""

import importlib
import os
import re

import jax
import jax.numpy as jnp
import optax
import pytest

from configs import ce_baseline
from l2t_jax import checkpoint, methods, metrics, train
from l2t_jax.errors import ConfigError
from l2t_jax.losses import logits_loss, mean_cross_entropy
from l2t_jax.methods import base, teaching
from launch import methods as launch_methods

REQUIRED = ("ce", "gce", "sce", "l2t-gce", "l2t-dlf", "l2t-dlf-fixed", "l2t-dln",
            "l2t-dln-fixed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def example_config(method: base.Method):
    path, _, arg = method.example.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    config = module.get_config(arg)
    config.method = method.name
    return config


def test_launch_methods_lists_every_registered_method_with_its_example():
    assert set(REQUIRED) <= set(methods.names())
    lines = launch_methods.table().splitlines()
    assert len(lines) == 1 + len(methods.names())
    for name in methods.names():
        method = methods.get(name)
        assert any(line.split()[0] == name and method.example in line for line in lines)


@pytest.mark.parametrize("name", REQUIRED)
def test_every_method_validates_on_its_example_config(name):
    train.validate_config(example_config(methods.get(name)))


def test_unknown_method_is_one_line_naming_the_registered_ones():
    config = ce_baseline.get_config("digits,smoke")
    config.method = "l2t-magic"
    with pytest.raises(ConfigError, match="unknown config.method 'l2t-magic'") as error:
        train.validate_config(config)
    assert "\n" not in str(error.value) and all(n in str(error.value) for n in REQUIRED)


def test_driver_and_launchers_name_no_method():
    pattern = re.compile(r"l2t-dl[fn]|DLN_METHODS|DLF_METHODS|losses import dln|_save_dln")
    names = "|".join(re.escape(n) for n in methods.names())
    literal = re.compile(rf"[\"']({names})[\"']")
    for path in ("l2t_jax/train.py", "l2t_jax/evaluation.py", "launch/plot.py",
                 "launch/train.py", "launch/methods.py"):
        with open(os.path.join(ROOT, path)) as f:
            source = f.read()
        assert not pattern.search(source) and not literal.search(source), path


def _label_smoothing(smoothing, logits, labels):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def test_a_method_registered_from_outside_runs_through_the_driver_and_plot(tmp_path):
    """A plug-in touches nothing of the driver: its module, its config, one register call."""
    drawn = []

    def build(config, splits, rng):
        def finish(finished, workdir, summary):
            path = os.path.join(workdir, "smoothing.txt")
            with open(path, "w") as f:
                f.write(str(config.smoothing.value))
            return {"smoothing": config.smoothing.value}
        return teaching.fixed_loss_plan(config, splits, rng, logits_loss(_label_smoothing),
                                        lambda _: jnp.float32(config.smoothing.value), finish)

    def draw(config, workdir, records, summary):
        drawn.append(summary["smoothing"])
        return []

    if "test-smoothing" not in methods.names():
        methods.register(base.Method(
            "test-smoothing", "label smoothing (a test plug-in)", "configs/ce_baseline.py",
            build, sections=("smoothing",), draw=draw,
            validate=lambda c: base.check_fields([(0 <= c.smoothing.value < 1,
                                                   "config.smoothing.value in [0, 1)")])))
    config = ce_baseline.get_config("digits,smoke")
    config.method = "test-smoothing"
    with pytest.raises(ConfigError, match="needs a config.smoothing section"):
        train.validate_config(config)
    config.smoothing = {"value": 0.1}
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["method"] == "test-smoothing" and summary["smoothing"] == 0.1
    assert (tmp_path / "smoothing.txt").read_text() == "0.1"
    records = metrics.read_metrics(str(tmp_path))
    # The loss it trained on is label-smoothed CE (above CE on the same logits).
    assert all(r["train/loss"] > r["train/cross_entropy"] for r in records)
    methods.get("test-smoothing").draw(config, str(tmp_path), records, summary)
    assert drawn == [0.1]
    assert float(_label_smoothing(0.0, jnp.eye(3), jnp.arange(3))) == pytest.approx(
        float(mean_cross_entropy(jnp.eye(3), jnp.arange(3))), rel=1e-6)


def test_a_checkpoint_of_another_state_layout_stops_with_one_line(tmp_path):
    # What a run of an older l2t_jax left: the method state as a dict with other keys.
    old = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    old.save(20, {"method": {"student": {"w": jnp.ones(3)}, "teacher": None,
                             "teacher_opt": None}, "best": {"step": jnp.asarray(20)}}, [])
    old.close()
    with pytest.raises(ConfigError, match="holds a state of another layout") as error:
        train.train_and_evaluate(ce_baseline.get_config("digits,smoke"), str(tmp_path))
    assert "\n" not in str(error.value)
