"""Offline distillation: loss terms, target models, loss teachers, meta-gradients, runs."""

import json
import os

import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_engine import central_differences, meta_loss, python_loop_meta_loss

from configs import distill
from l2t_jax import data, engine, methods, metrics, optimizers, teachers, train
from l2t_jax.errors import ConfigError
from l2t_jax.losses import mean_cross_entropy
from l2t_jax.losses.distill import (
    attention_distance,
    attention_map,
    attention_transfer,
    kd_divergence,
    kd_loss,
)
from l2t_jax.methods import distill as distill_methods
from l2t_jax.methods import dlf
from l2t_jax.methods.teaching import TeacherUpdate
from l2t_jax.students import build_student

C = 3


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kd_divergence_is_the_per_example_kl_averaged_over_the_batch_times_t_squared():
    rng = np.random.default_rng(0)
    student, target = rng.normal(size=(2, 5, 4)) * 3
    for temperature in (1.0, 4.0):
        p, q = _softmax(target / temperature), _softmax(student / temperature)
        per_example = np.sum(p * np.log(p / q), axis=-1)  # summed over classes
        np.testing.assert_allclose(kd_divergence(student, target, temperature),
                                   temperature**2 * per_example.mean(), rtol=1e-5)
    assert float(kd_divergence(target, target, 4.0)) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_mixes_cross_entropy_and_the_kd_term():
    rng = np.random.default_rng(1)
    student, target = jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, size=6))
    ce = mean_cross_entropy(student, labels)
    kd = kd_divergence(student, target, 4.0)
    np.testing.assert_allclose(kd_loss(0.0, 4.0, student, target, labels), ce, rtol=1e-6)
    np.testing.assert_allclose(kd_loss(0.9, 4.0, student, target, labels),
                               0.1 * ce + 0.9 * kd, rtol=1e-6)


def test_attention_maps_are_normalised_channel_means_of_squares():
    rng = np.random.default_rng(2)
    activation = rng.normal(size=(2, 3, 4, 5))
    energy = (activation**2).mean(-1).reshape(2, -1)
    expected = energy / np.linalg.norm(energy, axis=-1, keepdims=True)
    np.testing.assert_allclose(attention_map(jnp.asarray(activation)), expected, rtol=1e-5)
    # 1-D networks' (B, L, C) activations; a zero map stays zero (no NaN).
    zero = jnp.zeros((2, 7, 3))
    assert attention_map(zero).shape == (2, 7)
    assert np.all(np.isfinite(attention_map(zero)))
    assert np.all(np.isfinite(jax.grad(  # a stage all ReLU-dead has a finite gradient
        lambda a: attention_distance(a, jnp.ones((2, 7, 4))))(zero)))

    student, target = activation, rng.normal(size=(2, 3, 4, 8))  # channels may differ
    distance = np.mean((attention_map(student) - attention_map(target)) ** 2)
    np.testing.assert_allclose(attention_distance(student, target), distance, rtol=1e-5)
    np.testing.assert_allclose(
        attention_transfer({"a": 10.0, "b": 2.0}, {"a": student, "b": target},
                           {"a": target, "b": target}), 10.0 * distance, rtol=1e-5)
    with pytest.raises(ValueError, match="equal spatial shapes"):
        attention_distance(student, rng.normal(size=(2, 2, 4, 5)))


def _config(method, arg="mnist1d,smoke"):
    config = distill.get_config(arg)
    config.method = method
    return config


def test_untaught_loss_teacher_is_the_hand_set_loss():
    config = _config("l2t-at-kd")
    config.student.update(name="cnn1d", channels=4)
    config.distill.stages = ("conv_0", "conv_2")
    teacher = distill_methods.loss_teacher(config, C)
    assert teacher.names == ("alpha", "temperature", "beta_conv_0", "beta_conv_2")
    params = teacher.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(3)
    output = engine.ModelOutput(jnp.asarray(rng.normal(size=(4, C)), jnp.float32),
                                {"conv_0": jnp.ones((4, 6, 2)), "conv_2": jnp.ones((4, 2, 2))})
    target = engine.ModelOutput(jnp.asarray(rng.normal(size=(4, C)), jnp.float32),
                                {"conv_0": jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32),
                                 "conv_2": jnp.asarray(rng.normal(size=(4, 2, 5)), jnp.float32)})
    batch = {"y": jnp.asarray([0, 1, 2, 0]), "target": target}
    hand_set = distill_methods.distillation_family(True, ("conv_0", "conv_2"))(
        {k: jnp.float32(v) for k, v in distill_methods.hand_set_weights(config).items()},
        output, batch)
    expected = kd_loss(0.9, 4.0, output.logits, target.logits, batch["y"]) + 1e3 * (
        attention_distance(output.activations["conv_0"], target.activations["conv_0"])
        + attention_distance(output.activations["conv_2"], target.activations["conv_2"]))
    np.testing.assert_allclose(hand_set, expected, rtol=1e-5)
    for features in (jnp.zeros(teachers.NUM_FEATURES), jnp.ones(teachers.NUM_FEATURES)):
        np.testing.assert_allclose(teacher.student_loss(params, features, output, batch),
                                   hand_set, rtol=1e-5)


def unroll_data(rng: np.random.Generator, steps: int) -> tuple:
    """``(xs, ys, dev_x, dev_y)``: `steps` float64 batches of 4 length-12 signals, and a
    dev set of 10."""
    xs = jnp.asarray(rng.normal(size=(steps, 4, 12)))
    ys = jnp.asarray(rng.integers(0, C, size=(steps, 4)))
    return xs, ys, jnp.asarray(rng.normal(size=(10, 12))), jnp.asarray(rng.integers(0, C, 10))


def check_weight_teacher_meta_gradient(model, teacher, rng: np.random.Generator, data: tuple,
                                       **step_kwargs) -> None:
    """A loss teacher's exact meta-gradient through a float64 unroll of `model` (momentum
    SGD, the dev-error feature refreshed every 2 steps, features differentiated): it
    matches central differences and the gradient of a Python-loop unroll, and every
    weight the teacher sets has one.

    Args:
        model: a float64 student.
        teacher: a `teachers.WeightTeacher`; its parameters are moved off the untaught
            start by `rng`, so that the features matter.
        rng: the test's generator (after `unroll_data`).
        data: `unroll_data`'s batches and dev set.
        **step_kwargs: what the loss reads (`engine.make_student_step`'s activations,
            target, self_target).
    """
    xs, ys, dev_x, dev_y = data
    steps = xs.shape[0]
    params = teacher.init(jax.random.PRNGKey(0), jnp.float64)
    params = jax.tree_util.tree_map(
        lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape)), params)
    tx = optimizers.make_inner_optimizer(
        ml_collections.ConfigDict({"name": "momentum", "learning_rate": 0.1}), steps)
    stats = jax.tree_util.tree_map(lambda s: s.astype(jnp.float64), teachers.initial_stats(C))
    state = engine.init_student_state(model, tx, jax.random.PRNGKey(2), dev_x[:1], stats)
    step_fn = engine.make_student_step(
        model, dlf.make_dlf_loss_fn(teacher, steps, features_grad=True), tx,
        stats_fn=teachers.make_stats_fn(model, dev_x, dev_y, dev_every=2), **step_kwargs)
    objective = TeacherUpdate(engine.FullBackprop(), None).dev_objective_fn(
        model, {"x": dev_x, "y": dev_y})
    batches = {"x": xs, "y": ys}

    result = jax.jit(lambda p: engine.FullBackprop()(
        step_fn, objective, p, state, batches))(params)
    grad = jax.flatten_util.ravel_pytree(result.grad)[0]
    assert float(jnp.abs(result.grad["bias"]).min()) > 1e-8  # every weight has a gradient
    value = jax.jit(lambda p: meta_loss(step_fn, objective, p, state, batches))
    numeric = central_differences(value, params, eps=1e-6)
    # atol: 1e-7 of the largest component (differences across ReLU kinks of the tiny
    # entries; the loop comparison below is the exact one).
    np.testing.assert_allclose(grad, jax.flatten_util.ravel_pytree(numeric)[0], rtol=1e-5,
                               atol=1e-7 * float(jnp.abs(grad).max()))
    loop = jax.jit(jax.grad(
        lambda p: python_loop_meta_loss(step_fn, objective, p, state, batches)))(params)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(loop)[0], grad, rtol=1e-9,
                               atol=1e-13)


def test_l2t_at_kd_meta_gradient_matches_differences_and_a_loop_float64(x64):
    # Every weight a distillation loss teacher sets (alpha, T, a beta per stage), on a
    # 1-D CNN student reading a frozen 1-D CNN target model's logits and feature maps.
    rng = np.random.default_rng(4)
    data = unroll_data(rng, steps=6)

    def cnn(channels):
        return build_student(ml_collections.ConfigDict(
            {"name": "cnn1d", "channels": channels, "dtype": "float64"}), C)

    model, target_model = cnn(3), cnn(5)
    stages = ("conv_0", "conv_2")
    config = _config("l2t-at-kd")
    config.distill.stages = stages
    target = engine.TargetModel(target_model,
                                target_model.init(jax.random.PRNGKey(1), data[2][:1]), stages)
    check_weight_teacher_meta_gradient(model, distill_methods.loss_teacher(config, C), rng,
                                       data, activations=stages, target=target)


@pytest.mark.parametrize("method, field, value, message", [
    ("at", None, None, "at needs a student with feature maps"),
    ("kd", "distill.alpha", 1.5, "config.distill.alpha must be in"),
    ("l2t-kd", "distill.temperature", 20.0, "inside config.distill.temperature_range"),
    ("kd", "target.num_steps", 15, "config.target.num_steps must be a positive multiple"),
    ("l2t-kd", "teacher.online_window", 0, "config.teacher.online_window must be >= 1"),
])
def test_bad_distillation_config_is_rejected_in_one_line(method, field, value, message):
    config = _config(method)
    if field:
        section, key = field.split(".")
        config[section][key] = value
    with pytest.raises(ConfigError, match=message):
        train.validate_config(config)


def test_distillation_needs_a_target_section():
    config = _config("kd")
    del config.target
    with pytest.raises(ConfigError, match="needs a config.target section"):
        methods.validate(config)


def _summary_fields(summary):
    return {k: summary[k] for k in ("test_error", "best_dev_error", "best_step",
                                    "final_test_error")}


def test_kd_trains_its_target_first_reuses_a_trained_one_and_resumes_exactly(
        tmp_path, monkeypatch):
    # A kd run without a target trains it first (in WORKDIR/target); the kd-target run
    # of the same seed is the same network, so a run restoring it gets the same student.
    reference = train.train_and_evaluate(_config("kd"), str(tmp_path / "kd"))
    target_metrics = metrics.read_metrics(str(tmp_path / "kd" / distill_methods.TARGET_DIR))
    assert target_metrics[-1]["step"] == 20

    target_dir = str(tmp_path / "kd_target")
    target_summary = train.train_and_evaluate(_config("kd-target"), target_dir)
    assert metrics.read_metrics(target_dir) == target_metrics
    config = _config("kd")
    config.target.workdir = target_dir
    reused = train.train_and_evaluate(config, str(tmp_path / "reused"))
    assert _summary_fields(reused) == _summary_fields(reference)
    assert metrics.read_metrics(target_dir) == target_metrics  # restored, not retrained
    assert not os.path.exists(tmp_path / "reused" / distill_methods.TARGET_DIR)
    other = _config("kd")
    other.target.model.channels = 7  # another network than the run in target_dir
    other.target.workdir = target_dir
    with pytest.raises(ConfigError, match="trained .* not config.target.model"):
        train.train_and_evaluate(other, str(tmp_path / "other"))
    with open(os.path.join(target_dir, train.SUMMARY_FILE)) as f:
        assert json.load(f)["method"] == "kd-target" == target_summary["method"]
    assert target_summary["student"] == "cnn1d"  # the network it trained

    # Killed in the student's phase (after the target's and the student's first
    # checkpoint): the resumed run restores both and finishes as the uninterrupted one.
    crashed = str(tmp_path / "crashed")
    original = data.stacked_batches
    calls = []

    def crash_in_the_students_second_call(*args, **kwargs):
        calls.append(kwargs["start_step"])
        if len(calls) == 4:  # target: 0, 10; student: 0, then this one
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(data, "stacked_batches", crash_in_the_students_second_call)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train_and_evaluate(_config("kd"), crashed)
    monkeypatch.setattr(data, "stacked_batches", original)
    resumed = train.train_and_evaluate(_config("kd"), crashed)
    assert _summary_fields(resumed) == _summary_fields(reference)
    assert metrics.read_metrics(crashed) == metrics.read_metrics(str(tmp_path / "kd"))


def test_l2t_kd_runs_end_to_end_and_draws_its_weights(tmp_path):
    # One episode (the target model read in it), then online teaching.
    config = _config("l2t-kd", "mnist1d,noisy,smoke")
    config.teacher.update(num_episodes=1, episode_steps=10, checkpoint_every=1)
    summary = train.train_and_evaluate(config, str(tmp_path))
    episodes = metrics.read_metrics(str(tmp_path / dlf.TEACHER_DIR))
    assert [r["step"] for r in episodes] == [10]
    assert all(r["meta/grad_norm"] > 0 for r in episodes)
    records = metrics.read_metrics(str(tmp_path))
    assert all(r["meta/nonfinite"] == 0 and r["meta/grad_norm"] > 0
               for r in records if "meta/grad_norm" in r)
    learned = dict(np.load(tmp_path / dlf.TEACHER_PARAMS_FILE))
    assert np.abs(learned["theta"]).max() > 0  # the loss teacher moved off the hand-set
    paths = methods.get("l2t-kd").draw(config, str(tmp_path), records, summary)
    assert [os.path.basename(p) for p in paths] == ["distill_weights.png"]
    assert os.path.getsize(paths[0]) > 0


def test_paper_setting_runs_a_few_steps_on_fake_cifar(tmp_path):
    # WRN target -> its own architecture with Moonshine's depthwise-separable blocks,
    # with AT + KD (the papers' set-up, at smoke size).
    config = _config("at-kd", "fake_cifar10,moonshine,smoke")
    assert config.student.conv == "dconv" and config.student.depth == config.target.model.depth
    # One call of 10 steps each for the target and the student, and evaluation batches of
    # the dev split's size (64): each network's eval program is compiled once, not once
    # for dev and once for the 256 test images.
    config.train.update(num_steps=10, batch_size=8, eval_batch_size=64)
    config.target.num_steps = 10
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["steps"] == 10 and np.isfinite(summary["test_error"])
    records = metrics.read_metrics(str(tmp_path))
    assert np.isfinite(records[-1]["train/loss"])
