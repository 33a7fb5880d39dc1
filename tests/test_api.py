"""The public API from outside the library: a standard L2T-DLF meta-gradient by hand."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from l2t_jax import engine, objectives, teachers
from l2t_jax.errors import ConfigError
from l2t_jax.methods import dlf
from l2t_jax.methods.teaching import TeacherUpdate
from l2t_jax.students import build_student

C, T, B = 3, 6, 5


def test_a_dlf_meta_gradient_from_given_parameters_with_the_public_api():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(C, 4))

    def sample(n):
        y = rng.integers(0, C, size=n)
        return jnp.asarray(centers[y] + rng.normal(size=(n, 4)), jnp.float32), jnp.asarray(y)

    xs, ys = sample(T * B)
    batches = {"x": xs.reshape(T, B, 4), "y": ys.reshape(T, B)}
    dev = dict(zip(("x", "y"), sample(12)))
    model = build_student(ml_collections.ConfigDict({"name": "mlp", "hidden": (6,)}), C)
    tx = optax.sgd(0.5)
    # The user's own parameters (here a plain init), not the library's initialiser.
    params = model.init(jax.random.PRNGKey(0), dev["x"][:1], train=False)["params"]
    state = engine.StudentState.create(params, jax.random.PRNGKey(1), tx=tx,
                                       stats=teachers.initial_stats(C))
    subset = ("iteration_fraction", "dev_error")
    teacher = teachers.DLFTeacher("state_gate", C, dlf.feature_size(subset), combine=True)
    step_fn = engine.make_student_step(
        model, dlf.make_dlf_loss_fn(teacher, T, feature_subset=subset), tx,
        stats_fn=teachers.make_stats_fn(model, dev["x"], dev["y"], dev_every=2),
        loss_metrics_fn=dlf.make_dlf_metrics_fn(teacher, T, feature_subset=subset))
    objective = objectives.dev_objective_fn(model, dev)
    result = jax.jit(lambda p: engine.FullBackprop()(step_fn, objective, p, state, batches))(
        teacher.init(jax.random.PRNGKey(2)))

    assert teacher.num_features == 2
    assert float(jnp.abs(result.grad["W2"]).max()) > 0  # the gate's loss gets a gradient
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(result.grad))
    gate = np.asarray(result.metrics["dlf/gate"])  # h_t at every step
    assert gate.shape == (T,) and np.all(np.abs(gate) < 1)
    np.testing.assert_allclose(result.metrics["dlf/mix"], 0.5)  # the untaught a_t
    # The teaching methods' dev objective is this one (no estimator or optimizer needed).
    for name, sharpness in (("smoothed_error", 50.0), ("cross_entropy", 10.0)):
        update = TeacherUpdate(engine.FullBackprop(), optax.sgd(1.0), name, sharpness)
        ours = objectives.dev_objective_fn(model, dev, name, sharpness)(None, result.state)
        theirs = update.dev_objective_fn(model, dev)(None, result.state)
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1]["dev_error"], theirs[1]["dev_error"])
    with pytest.raises(ConfigError, match="config.teacher.objective 'accuracy'"):
        objectives.dev_objective_fn(model, dev, "accuracy")
