"""The loss sees the student's whole output and the batch: named activations and a frozen
target model, with exact meta-gradients (finite differences, scan vs loop, remat)."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from test_engine import central_differences, meta_loss, python_loop_meta_loss

from l2t_jax import engine, optimizers
from l2t_jax.errors import ConfigError
from l2t_jax.losses import mean_cross_entropy
from l2t_jax.students import build_student

C, F, T, B = 4, 6, 4, 8  # T: few steps, as the Python-loop references compile each one


def distillation_loss(meta_params, output, batch, state):
    """CE + w * T^2 KL(target || student at temperature T) + v * mean(hidden_0^2).

    Reads the student's sown activation and the target model's logits, both of which
    the meta-gradient must see.
    """
    del state
    tau = jnp.exp(meta_params["log_temperature"])
    target = jax.nn.log_softmax(batch["target"].logits / tau)
    student = jax.nn.log_softmax(output.logits / tau)
    kl = jnp.mean(jnp.sum(jnp.exp(target) * (target - student), -1)) * tau ** 2
    hidden = output.activations["hidden_0"]
    return (mean_cross_entropy(output.logits, batch["y"])
            + jax.nn.softplus(meta_params["kd_weight"]) * kl
            + meta_params["activation_weight"] * jnp.mean(hidden ** 2))


def jitter(key, x):
    return x + 0.3 * jax.random.normal(key, x.shape, x.dtype)


def mlp(hidden, dtype):
    return build_student(ml_collections.ConfigDict(
        {"name": "mlp", "hidden": hidden, "activation": "tanh",
         "dtype": jnp.dtype(dtype).name}), C)


def target_problem(dtype=jnp.float64, loss_fn=distillation_loss):
    """A student whose loss reads its activations and a frozen, differently shaped target.

    Returns the step, objective, meta-parameters, student, batches and target model.
    """
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(C, F))
    y = rng.integers(0, C, size=T * B + 16)
    x = jnp.asarray(centers[y] + rng.normal(size=(len(y), F)), dtype)
    y = jnp.asarray(y, jnp.int32)
    batches = {"x": x[:T * B].reshape(T, B, F), "y": y[:T * B].reshape(T, B)}
    dev_x, dev_y = x[T * B:], y[T * B:]
    model, target_model = mlp((10,), dtype), mlp((12, 12), dtype)
    tx = optimizers.make_inner_optimizer(
        ml_collections.ConfigDict({"name": "momentum", "learning_rate": 0.2}), T)
    state = engine.init_student_state(model, tx, jax.random.PRNGKey(1), dev_x[:2])
    target = engine.TargetModel(target_model, target_model.init(jax.random.PRNGKey(2), dev_x[:2]))
    step_fn = engine.make_student_step(model, loss_fn, tx, jitter, activations=("hidden_0",),
                                       target=target)
    meta_params = {"kd_weight": jnp.asarray(0.3, dtype),
                   "log_temperature": jnp.asarray(0.4, dtype),
                   "activation_weight": jnp.asarray(0.05, dtype)}

    def objective(mp, final):
        del mp
        logits, _ = engine.apply_student(model, final.params, final.model_state, dev_x,
                                         train=False)
        return mean_cross_entropy(logits, dev_y), ()

    return step_fn, objective, meta_params, state, batches, target


def test_meta_gradient_through_activations_and_a_target_matches_differences_float64(x64):
    step_fn, objective, meta_params, state, batches, _ = target_problem()
    result = jax.jit(lambda mp: engine.FullBackprop()(step_fn, objective, mp, state,
                                                     batches))(meta_params)
    f = jax.jit(lambda mp: meta_loss(step_fn, objective, mp, state, batches))
    numeric = central_differences(f, meta_params, eps=1e-6)
    for name in meta_params:  # every term of the loss reaches the dev objective
        assert float(jnp.abs(result.grad[name])) > 1e-5, name
    chex.assert_trees_all_close(result.grad, numeric, rtol=1e-5, atol=1e-10)


def test_scan_loop_and_every_remat_policy_agree_with_activations_and_a_target(x64):
    step_fn, objective, meta_params, state, batches, _ = target_problem()
    loop = jax.jit(jax.grad(
        lambda mp: python_loop_meta_loss(step_fn, objective, mp, state, batches)))(meta_params)
    for remat in engine.REMAT_POLICIES:
        grad = jax.jit(jax.grad(
            lambda mp, remat=remat: meta_loss(step_fn, objective, mp, state, batches, remat)
        ))(meta_params)
        chex.assert_trees_all_close(grad, loop, rtol=1e-10, atol=1e-14)


def test_target_model_runs_frozen_on_the_student_s_augmented_batch():
    seen = []

    def record(meta_params, output, batch, state):
        del meta_params, state
        seen.append((batch["x"], batch["target"].logits))
        return mean_cross_entropy(output.logits, batch["y"])

    step_fn, _, meta_params, state, batches, target = target_problem(jnp.float32, record)
    batch = jax.tree_util.tree_map(lambda a: a[0], batches)
    x, target_logits = jax.jit(lambda b: (step_fn(meta_params, state, b), seen[-1])[1])(batch)
    # The target's output is the target model's on the batch the loss sees ...
    np.testing.assert_allclose(target_logits, target.model.apply(target.variables, x),
                               rtol=1e-5, atol=1e-6)
    # ... and that batch is the augmented one, not the raw inputs.
    assert float(jnp.abs(x - batch["x"]).max()) > 1e-3


def test_activations_are_collected_only_when_asked_and_unknown_names_are_errors():
    model = mlp((10,), jnp.float32)
    x = jnp.ones((2, F))
    variables = model.init(jax.random.PRNGKey(0), x)
    state = engine.init_student_state(model, optax.sgd(0.1), jax.random.PRNGKey(0), x)
    assert "intermediates" not in state.model_state  # never carried or checkpointed
    plain, _ = engine.student_output(model, variables["params"], {}, x, train=True)
    asked, _ = engine.student_output(model, variables["params"], {}, x, train=True,
                                     activations=("hidden_0",))
    assert plain.activations == {} and asked.activations["hidden_0"].shape == (2, 10)
    np.testing.assert_array_equal(plain.logits, asked.logits)
    with pytest.raises(ConfigError, match="exposes no activation 'group_1'"):
        engine.student_output(model, variables["params"], {}, x, train=False,
                              activations=("group_1",))
