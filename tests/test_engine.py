"""The engine's meta-gradients: finite differences, scan vs Python loop, remat, estimators."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from l2t_jax import engine, optimizers
from l2t_jax.losses import mean_cross_entropy
from l2t_jax.students import build_student

NUM_CLASSES = 5
NUM_FEATURES = 8
T = 12  # the Python-loop references compile every step
BATCH = 8


def weighted_tempered_ce(meta_params, output, batch, state):
    """A smooth loss family with teacher parameters: per-class weights and a temperature."""
    del state
    logits, labels = output.logits, batch["y"]
    weights = jax.nn.softplus(meta_params["class_weight"])[labels]
    scaled = logits * jnp.exp(meta_params["log_temperature"])
    log_p = jax.nn.log_softmax(scaled)
    nll = -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
    return jnp.mean(weights * nll)


def make_problem(optimizer="sgd", dtype=jnp.float32, student="mlp", seed=0):
    """A tiny student, optimizer, stacked batches, dev set and meta-parameters."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(NUM_CLASSES, NUM_FEATURES))

    def sample(n):
        y = rng.integers(0, NUM_CLASSES, size=n)
        x = centers[y] + rng.normal(scale=1.5, size=(n, NUM_FEATURES))
        return jnp.asarray(x, dtype), jnp.asarray(y, jnp.int32)

    xs, ys = sample(T * BATCH)
    batches = {"x": xs.reshape(T, BATCH, NUM_FEATURES), "y": ys.reshape(T, BATCH)}
    dev_x, dev_y = sample(32)
    student_config = ml_collections.ConfigDict(
        {"name": student, "hidden": (16,), "activation": "tanh",
         "dtype": jnp.dtype(dtype).name}
    )
    model = build_student(student_config, NUM_CLASSES)
    opt_config = ml_collections.ConfigDict(
        {"name": optimizer, "learning_rate": {"sgd": 0.3, "momentum": 0.1, "adam": 0.02}[optimizer]}
    )
    tx = optimizers.make_inner_optimizer(opt_config, T)
    state = engine.init_student_state(model, tx, jax.random.PRNGKey(seed), dev_x[:2])
    step_fn = engine.make_student_step(model, weighted_tempered_ce, tx)
    meta_params = {
        "class_weight": jnp.asarray(rng.normal(scale=0.5, size=NUM_CLASSES), dtype),
        "log_temperature": jnp.asarray(0.1, dtype),
    }

    def objective(mp, final_state):
        del mp
        logits, _ = engine.apply_student(
            model, final_state.params, final_state.model_state, dev_x, train=False
        )
        return mean_cross_entropy(logits, dev_y), ()

    return step_fn, objective, meta_params, state, batches


def meta_loss(step_fn, objective, meta_params, state, batches, remat="none"):
    final, _ = engine.unroll(step_fn, meta_params, state, batches, remat=remat)
    return objective(meta_params, final)[0]


def python_loop_meta_loss(step_fn, objective, meta_params, state, batches):
    """The same unroll as a plain Python loop: an independent reference for the scan."""
    for t in range(batches["y"].shape[0]):
        batch = jax.tree_util.tree_map(lambda a, t=t: a[t], batches)
        state, _ = step_fn(meta_params, state, batch)
    return objective(meta_params, state)[0]


def central_differences(f, params, eps):
    """Central finite differences of scalar f over every coordinate of a pytree."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    grads = []
    for i in range(flat.size):
        e = jnp.zeros_like(flat).at[i].set(eps)
        grads.append((f(unravel(flat + e)) - f(unravel(flat - e))) / (2 * eps))
    return unravel(jnp.stack(grads))


@pytest.mark.parametrize("optimizer", optimizers.OPTIMIZER_NAMES)
def test_meta_gradient_matches_central_differences_float64(x64, optimizer):
    step_fn, objective, meta_params, state, batches = make_problem(optimizer, jnp.float64)
    result = jax.jit(
        lambda mp: engine.FullBackprop()(step_fn, objective, mp, state, batches)
    )(meta_params)
    f = jax.jit(lambda mp: meta_loss(step_fn, objective, mp, state, batches))
    numeric = central_differences(f, meta_params, eps=1e-6)
    assert result.value.dtype == jnp.float64
    assert float(jnp.abs(result.grad["log_temperature"])) > 1e-4  # not trivially zero
    chex.assert_trees_all_close(result.grad, numeric, rtol=1e-5, atol=1e-9)
    assert np.isclose(float(result.value), float(f(meta_params)), rtol=1e-12)


def test_scan_matches_python_loop_unroll(x64):
    step_fn, objective, meta_params, state, batches = make_problem("momentum", jnp.float64)
    scan_value, scan_grad = jax.jit(jax.value_and_grad(
        lambda mp: meta_loss(step_fn, objective, mp, state, batches)
    ))(meta_params)
    loop_value, loop_grad = jax.jit(jax.value_and_grad(
        lambda mp: python_loop_meta_loss(step_fn, objective, mp, state, batches)
    ))(meta_params)
    np.testing.assert_allclose(scan_value, loop_value, rtol=1e-12)
    chex.assert_trees_all_close(scan_grad, loop_grad, rtol=1e-10, atol=1e-14)


def test_remat_policies_give_the_same_gradient():
    step_fn, objective, meta_params, state, batches = make_problem("adam")
    # (policy, chunk size): sqrt with sqrt(T) chunks, and with 7 (T = 12 leaves a
    # remainder chunk of 5).
    settings = [("none", None), ("step", None), ("sqrt", None), ("sqrt", 7)]
    results = {}
    for remat, chunk_size in settings:
        estimator = engine.FullBackprop(remat=remat, chunk_size=chunk_size)
        results[remat, chunk_size] = jax.jit(
            lambda mp, estimator=estimator: estimator(step_fn, objective, mp, state, batches)
        )(meta_params)
    reference = results["none", None]
    for setting in settings[1:]:
        chex.assert_trees_all_close(results[setting].grad, reference.grad, rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close(results[setting].state, reference.state, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(results[setting].metrics, reference.metrics, rtol=1e-5)
    assert results["sqrt", 7].metrics["loss"].shape == (T,)


def test_truncated_with_full_window_equals_full_backprop():
    step_fn, objective, meta_params, state, batches = make_problem("sgd")
    full = engine.FullBackprop()(step_fn, objective, meta_params, state, batches)
    for window in (T, T + 5):
        truncated = engine.TruncatedBackprop(window)(
            step_fn, objective, meta_params, state, batches
        )
        chex.assert_trees_all_close(truncated.grad, full.grad, rtol=1e-6)
        np.testing.assert_allclose(truncated.value, full.value, rtol=1e-6)


def test_truncated_window_differentiates_only_the_last_steps():
    step_fn, objective, meta_params, state, batches = make_problem("sgd")
    window = 5
    truncated = jax.jit(lambda mp: engine.TruncatedBackprop(window, remat="sqrt")(
        step_fn, objective, mp, state, batches))(meta_params)
    full = engine.FullBackprop()(step_fn, objective, meta_params, state, batches)
    # Same forward trajectory, different (truncated) gradient.
    np.testing.assert_allclose(truncated.value, full.value, rtol=1e-5)
    chex.assert_trees_all_close(truncated.state, full.state, rtol=1e-5, atol=1e-6)
    assert truncated.metrics["loss"].shape == (T,)
    assert not np.allclose(truncated.grad["class_weight"], full.grad["class_weight"], rtol=1e-3)
    # Reference: run the prefix by hand, then differentiate the window alone.
    head = jax.tree_util.tree_map(lambda a: a[: T - window], batches)
    tail = jax.tree_util.tree_map(lambda a: a[T - window:], batches)
    mid, _ = engine.unroll(step_fn, meta_params, state, head)
    reference = jax.grad(lambda mp: meta_loss(step_fn, objective, mp, mid, tail))(meta_params)
    chex.assert_trees_all_close(truncated.grad, reference, rtol=1e-5, atol=1e-7)


def test_jit_and_eager_agree():
    step_fn, objective, meta_params, state, batches = make_problem("momentum")
    estimator = engine.FullBackprop(remat="step")
    eager = estimator(step_fn, objective, meta_params, state, batches)
    jitted = jax.jit(estimator, static_argnums=(0, 1))(
        step_fn, objective, meta_params, state, batches
    )
    chex.assert_trees_all_close(jitted.grad, eager.grad, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(jitted.state, eager.state, rtol=1e-5, atol=1e-6)


def test_unroll_traces_once_across_calls():
    step_fn, objective, meta_params, state, batches = make_problem("adam")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train(mp, s, b):
        return engine.unroll(step_fn, mp, s, b, remat="sqrt")

    for k in range(3):
        shifted = {"x": batches["x"] + k, "y": batches["y"]}
        state, metrics = train(meta_params, state, shifted)
    assert int(state.step) == 3 * T
    assert metrics["loss"].shape == (T,)


class BatchNormMLP(nn.Module):
    """A tiny float64 student with BatchNorm (running statistics in `batch_stats`)."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(16, dtype=jnp.float64, param_dtype=jnp.float64)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         dtype=jnp.float64, param_dtype=jnp.float64)(x)
        return nn.Dense(NUM_CLASSES, dtype=jnp.float64, param_dtype=jnp.float64)(nn.tanh(x))


def test_batchnorm_state_is_carried_through_the_unroll(x64):
    model = BatchNormMLP()
    rng = np.random.default_rng(0)
    steps, batch = 6, 8
    batches = {
        "x": jnp.asarray(rng.normal(loc=2.0, size=(steps, batch, NUM_FEATURES))),
        "y": jnp.asarray(rng.integers(0, NUM_CLASSES, size=(steps, batch)), jnp.int32),
    }
    tx = optimizers.make_inner_optimizer(
        ml_collections.ConfigDict({"name": "sgd", "learning_rate": 0.1}), steps
    )
    state = engine.init_student_state(model, tx, jax.random.PRNGKey(0), batches["x"][0])
    step_fn = engine.make_student_step(model, weighted_tempered_ce, tx)
    dev_x = batches["x"][0]

    def objective(mp, final_state):
        logits, _ = engine.apply_student(
            model, final_state.params, final_state.model_state, dev_x, train=False
        )
        return mean_cross_entropy(logits, batches["y"][0]), ()

    meta_params = {"class_weight": jnp.zeros(NUM_CLASSES), "log_temperature": jnp.zeros(())}
    scan = jax.jit(
        lambda mp: engine.FullBackprop()(step_fn, objective, mp, state, batches)
    )(meta_params)
    loop_state = state
    jit_step = jax.jit(step_fn)
    for t in range(steps):
        loop_state, _ = jit_step(
            meta_params, loop_state, jax.tree_util.tree_map(lambda a, t=t: a[t], batches)
        )
    chex.assert_trees_all_close(scan.state.model_state, loop_state.model_state, rtol=1e-10)
    # Running statistics moved away from their initial values (mean 0, var 1).
    stats = scan.state.model_state["batch_stats"]["BatchNorm_0"]
    assert float(jnp.abs(stats["mean"]).max()) > 1e-3
    assert float(jnp.abs(stats["var"] - 1).max()) > 1e-3
    loop_grad = jax.jit(jax.grad(
        lambda mp: python_loop_meta_loss(step_fn, objective, mp, state, batches)
    ))(meta_params)
    chex.assert_trees_all_close(scan.grad, loop_grad, rtol=1e-8, atol=1e-12)


def test_bad_engine_config_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="config.engine.remat"):
        engine.make_estimator(ml_collections.ConfigDict({"estimator": "full", "remat": "all"}))
    with pytest.raises(ValueError, match="config.engine.estimator"):
        engine.make_estimator(ml_collections.ConfigDict({"estimator": "es", "remat": "none"}))
    with pytest.raises(ValueError, match="config.engine.window"):
        engine.make_estimator(
            ml_collections.ConfigDict({"estimator": "truncated", "remat": "none", "window": 0})
        )
    estimator = engine.make_estimator(
        ml_collections.ConfigDict({"estimator": "truncated", "remat": "sqrt", "window": 4})
    )
    assert estimator == engine.TruncatedBackprop(4, "sqrt")


def test_each_step_draws_a_fresh_key_for_augmentation():
    step_fn, objective, meta_params, state, batches = make_problem("sgd")
    del step_fn, objective
    model = build_student(ml_collections.ConfigDict({"name": "mlp", "hidden": (16,)}),
                          NUM_CLASSES)
    frozen = optax.sgd(0.0)  # the student never changes: only the augmentation can
    state = state.replace(opt_state=frozen.init(state.params))
    step_fn = engine.make_student_step(
        model, weighted_tempered_ce, frozen,
        augment_fn=lambda key, x: x + jax.random.normal(key, x.shape),
    )
    same_batch = jax.tree_util.tree_map(lambda a: jnp.stack([a[0]] * 4), batches)
    final, metrics = engine.unroll(step_fn, meta_params, state, same_batch)
    assert len(set(np.asarray(metrics["loss"]).round(6).tolist())) == 4
    assert not np.array_equal(final.rng, state.rng)


def test_a_student_state_from_given_parameters_is_an_initialised_one():
    model = build_student(ml_collections.ConfigDict({"name": "mlp", "hidden": (4,)}),
                          NUM_CLASSES)
    tx = optax.adam(0.01)
    stats = {"running": jnp.asarray(1.5), "count": jnp.asarray(3, jnp.int32)}
    state = engine.init_student_state(model, tx, jax.random.PRNGKey(0),
                                      jnp.zeros((2, NUM_FEATURES)), stats)
    chex.assert_trees_all_equal(
        engine.StudentState.create(state.params, state.rng, tx=tx, stats=stats), state)
    carried = engine.StudentState.create(state.params, state.rng, opt_state=state.opt_state,
                                         step=7)
    chex.assert_trees_all_equal(carried.opt_state, state.opt_state)
    assert carried.step.dtype == jnp.int32 and int(carried.step) == 7
    assert carried.stats == {} and carried.model_state == {}
    for optimizer in ({}, {"tx": tx, "opt_state": state.opt_state}):
        with pytest.raises(ValueError, match="needs tx .* or opt_state"):
            engine.StudentState.create(state.params, state.rng, **optimizer)


def test_a_students_floating_stats_take_its_parameters_dtype(x64):
    stats = {"loss": jnp.asarray(0.1, jnp.float32), "count": jnp.asarray(3, jnp.int32)}
    for dtype in (jnp.float64, jnp.float32):
        params = {"w": jnp.ones(3, dtype)}
        created = engine.StudentState.create(params, jax.random.PRNGKey(0),
                                             tx=optax.sgd(0.1), stats=stats)
        assert created.stats["loss"].dtype == dtype
        assert created.stats["count"].dtype == jnp.int32


def test_loss_metrics_are_reported_with_the_step_and_change_nothing_else():
    model = build_student(ml_collections.ConfigDict({"name": "mlp", "hidden": (4,)}),
                          NUM_CLASSES)
    tx = optax.sgd(0.1)
    batch = {"x": jnp.linspace(-1, 1, 3 * NUM_FEATURES).reshape(3, NUM_FEATURES),
             "y": jnp.array([0, 1, 2])}
    state = engine.init_student_state(model, tx, jax.random.PRNGKey(0), batch["x"])
    meta_params = {"class_weight": jnp.zeros(NUM_CLASSES), "log_temperature": jnp.asarray(0.5)}

    def describe(mp, output, seen, s):
        return {"loss/temperature": jnp.exp(mp["log_temperature"]),
                "loss/mean_logit": output.logits.mean()}

    plain = jax.jit(engine.make_student_step(model, weighted_tempered_ce, tx))
    described = jax.jit(engine.make_student_step(model, weighted_tempered_ce, tx,
                                                 loss_metrics_fn=describe))
    plain_state, plain_metrics = plain(meta_params, state, batch)
    new_state, step_metrics = described(meta_params, state, batch)
    chex.assert_trees_all_equal(new_state, plain_state)
    assert set(step_metrics) == set(plain_metrics) | {"loss/temperature", "loss/mean_logit"}
    for name, value in plain_metrics.items():
        assert step_metrics[name] == value
    np.testing.assert_allclose(step_metrics["loss/temperature"], np.exp(0.5), rtol=1e-6)
    logits = model.apply({"params": state.params}, batch["x"], train=False)
    np.testing.assert_allclose(step_metrics["loss/mean_logit"], logits.mean(), rtol=1e-5)
