"""Noise-robust losses (GCE, SCE) and the loss teacher that sets GCE's q (`l2t-gce`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_dlf import dlf_problem
from test_engine import central_differences, meta_loss, python_loop_meta_loss

from configs import robust
from l2t_jax import engine, methods, metrics, teachers, train
from l2t_jax.errors import ConfigError
from l2t_jax.losses import mean_cross_entropy
from l2t_jax.losses.robust import generalized_cross_entropy, symmetric_cross_entropy
from l2t_jax.methods import dlf
from l2t_jax.methods import robust as robust_methods

C = 4


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(16, C)), jnp.float32),
            jnp.asarray(rng.integers(0, C, size=16)))


def test_gce_is_ce_as_q_goes_to_zero_and_mae_at_one():
    logits, labels = _batch()
    p_true = jax.nn.softmax(logits)[jnp.arange(16), labels]
    np.testing.assert_allclose(generalized_cross_entropy(1.0, logits, labels),
                               jnp.mean(1 - p_true), rtol=1e-6)
    np.testing.assert_allclose(generalized_cross_entropy(1e-4, logits, labels),
                               mean_cross_entropy(logits, labels), rtol=1e-3)
    np.testing.assert_allclose(generalized_cross_entropy(0.7, logits, labels),
                               jnp.mean((1 - p_true ** 0.7) / 0.7), rtol=1e-6)


def test_sce_is_alpha_ce_plus_beta_times_reverse_ce_with_log_zero_clipped():
    logits, labels = _batch(1)
    p = jax.nn.softmax(logits)
    one_hot = jax.nn.one_hot(labels, C)
    # -sum_k p_k log q_k with log 0 -> A = -4 and log 1 = 0.
    reverse = -jnp.sum(p * jnp.where(one_hot > 0, 0.0, -4.0), -1)
    expected = 0.1 * mean_cross_entropy(logits, labels) + 1.0 * jnp.mean(reverse)
    np.testing.assert_allclose(symmetric_cross_entropy(0.1, 1.0, -4.0, logits, labels),
                               expected, rtol=1e-6)


def test_untaught_gce_teacher_is_the_hand_set_loss_at_every_state():
    config = robust.get_config("digits,smoke")
    teacher = robust_methods.gce_teacher(config, C)
    params = teacher.init(jax.random.PRNGKey(0))
    logits, labels = _batch(2)
    for features in (jnp.zeros(teachers.NUM_FEATURES), jnp.ones(teachers.NUM_FEATURES)):
        np.testing.assert_allclose(teacher.weights(params, features)["q"], 0.7, rtol=1e-6)
        np.testing.assert_allclose(teacher.student_loss(params, features,
                                                        engine.ModelOutput(logits),
                                                        {"y": labels}),
                                   generalized_cross_entropy(0.7, logits, labels), rtol=1e-6)


def test_l2t_gce_meta_gradient_matches_differences_and_a_loop_float64(x64):
    # The L2T-DLF machinery (features, stats, scan, estimator) with the GCE teacher.
    config = robust.get_config("digits,smoke")
    teacher = robust_methods.gce_teacher(config, C)
    # 8 steps (the dev error refreshed once): the Python loop below compiles every step.
    step_fn, objective, params, state, batches = dlf_problem(
        "static", jnp.float64, features_grad=True, teacher=teacher, steps=8)
    result = jax.jit(lambda p: engine.FullBackprop(remat="sqrt")(
        step_fn, objective, p, state, batches))(params)

    value = jax.jit(lambda p: meta_loss(step_fn, objective, p, state, batches))
    grad = jax.flatten_util.ravel_pytree(result.grad)[0]
    assert float(jnp.abs(grad).max()) > 1e-6
    numeric = central_differences(value, params, eps=1e-6)  # every coordinate
    np.testing.assert_allclose(grad, jax.flatten_util.ravel_pytree(numeric)[0], rtol=1e-5,
                               atol=1e-10)
    loop = jax.jit(jax.grad(
        lambda p: python_loop_meta_loss(step_fn, objective, p, state, batches)))(params)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(loop)[0], grad, rtol=1e-9,
                               atol=1e-13)


@pytest.mark.parametrize("field, value, message", [
    ("gce.q", 1.5, "config.gce.q must be in"),
    ("sce.log_zero", 1.0, "config.sce.log_zero must be < 0"),
])
def test_bad_robust_config_is_rejected(field, value, message):
    config = robust.get_config("digits,smoke")
    config.method = field.split(".")[0]
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ConfigError, match=message):
        train.validate_config(config)


def test_l2t_gce_needs_its_sections():
    config = robust.get_config("digits,smoke")
    config.method = "l2t-gce"
    del config.gce
    with pytest.raises(ConfigError, match="needs a config.gce section"):
        methods.validate(config)


@pytest.mark.parametrize("method", ["gce", "l2t-gce"])
def test_robust_methods_run_end_to_end(tmp_path, method):
    config = robust.get_config("digits,noisy,smoke")
    config.method = method
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["method"] == method and 0 <= summary["test_error"] < 60
    records = metrics.read_metrics(str(tmp_path))
    assert records[-1]["step"] == config.train.num_steps
    if method == "l2t-gce":
        episodes = metrics.read_metrics(str(tmp_path / dlf.TEACHER_DIR))
        assert [r["step"] for r in episodes] == [10, 20, 30]
        assert all(r["meta/nonfinite"] == 0 and r["meta/grad_norm"] > 0 for r in episodes)
        learned = np.load(tmp_path / dlf.TEACHER_PARAMS_FILE)
        assert np.abs(learned["theta"]).max() > 0  # the teacher moved off the hand-set q
