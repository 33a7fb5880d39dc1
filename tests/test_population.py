"""Student populations in the methods: P = 1 unchanged, averaged gradients, mesh = 1 device.

Runs on the 8 fake CPU devices that conftest.py sets up.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from configs import l2t_dlf, l2t_dln
from l2t_jax import data, engine, metrics, teachers, train
from l2t_jax import mesh as mesh_lib
from l2t_jax import population as population_lib
from l2t_jax.errors import ConfigError
from l2t_jax.losses import dln as dln_lib
from l2t_jax.methods import dlf
from l2t_jax.methods.dlf import EpisodicTeacherTraining
from l2t_jax.methods.dln import DLNTeaching, dln_student_loss
from l2t_jax.methods.teaching import TeacherUpdate
from l2t_jax.students import build_student
from l2t_jax.teachers.lstm import CoordinateLSTM

C = 4
FEATURES = 3
POPULATION = 3


def member(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def as_dtype(tree, dtype):
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def toy_splits(dtype):
    rng = np.random.default_rng(0)

    def split(m):
        y = rng.integers(0, C, m).astype(np.int32)
        x = (rng.normal(size=(m, FEATURES)) + y[:, None]).astype(dtype)
        return data.ArraySplit(x, y, y)

    return data.Splits("toy", C, (FEATURES,), split(40), split(20), split(20))


def tiny_mlp(dtype):
    return build_student(ml_collections.ConfigDict(
        dict(name="mlp", hidden=(6,), activation="tanh", dtype=jnp.dtype(dtype).name)), C)


def tiny_dlf(dtype, population=population_lib.SINGLE_STUDENT):
    """An episodic DLF method on toy data; the teacher's optimizer is SGD 1 (new = old - g)."""
    model = tiny_mlp(dtype)
    return EpisodicTeacherTraining(
        model=model, tx=optax.sgd(0.3),
        teacher=teachers.DLFTeacher("state_gate", C, teachers.NUM_FEATURES, combine=True),
        update=TeacherUpdate(engine.FullBackprop(), optax.sgd(1.0), "smoothed_error"),
        steps_per_call=4, batch_size=5,
        stats_builder=lambda x, y: teachers.make_stats_fn(model, x, y, dev_every=2),
        restart="fixed", feature_dev_size=8, population=population)


def tiny_dln(dtype, population=population_lib.SINGLE_STUDENT):
    """An L2T-DLN method on toy data; the teacher's optimizer is SGD 1."""
    return DLNTeaching(
        model=tiny_mlp(dtype), tx=optax.sgd(0.1), teacher=CoordinateLSTM(hidden=8),
        update=TeacherUpdate(engine.FullBackprop(), optax.sgd(1.0), "cross_entropy"),
        steps_per_call=3, batch_size=5, val_batch_size=7, dln_step_size=1e-2, total_steps=9,
        num_classes=C, num_snapshots=4, population=population)


def dln_state(method, splits, dtype):
    phi = dln_lib.init_dln(jax.random.PRNGKey(2), hidden=5, depth=2)
    state = as_dtype(method.init(jax.random.PRNGKey(3), splits, phi), dtype)
    # A non-zero memory, so every LSTM weight matters.
    state = state.replace(teacher_memory=jax.tree_util.tree_map(
        lambda a: 0.3 * jnp.sin(jnp.arange(a.size, dtype=dtype).reshape(a.shape)),
        state.teacher_memory))
    return state


def teacher_gradient(old, new):
    """The gradient an SGD-1 teacher step applied, flattened."""
    return ravel_pytree(old)[0] - ravel_pytree(new)[0]


def test_population_size_one_is_the_single_student_path():
    splits = toy_splits(np.float32)
    method = tiny_dlf(jnp.float32)
    state = method.init(jax.random.PRNGKey(0), splits)
    batches = method.batches(splits, seed=0, start_step=0)
    assert batches["train"]["x"].shape == (4, 5, FEATURES)  # nothing stacked
    new, step_metrics = jax.jit(method.outer_step)(state, batches)
    # What one episode did before populations existed: the estimator on the one
    # start, then the guarded step.
    loss_fn = dlf.make_dlf_loss_fn(method.teacher, method.steps_per_call)
    step_fn = engine.make_student_step(
        method.model, loss_fn, method.tx,
        stats_fn=method.stats_builder(batches["feature_dev"]["x"], batches["feature_dev"]["y"]))

    @jax.jit
    def reference(state):
        result = method.update.estimator(
            step_fn, method.update.dev_objective_fn(method.model, batches["dev"]),
            state.teacher_params, state.start, batches["train"])
        return method.update.apply(state.teacher_params, state.teacher_opt_state, result)

    teacher, _, meta = reference(state)
    # Not bit-equal: XLA may fuse the two programs' float32 sums differently.
    chex.assert_trees_all_close(new.teacher_params, teacher, rtol=1e-6, atol=1e-7)
    assert float(step_metrics["meta/dev_error"]) == float(meta["meta/dev_error"])


def test_dlf_population_gradient_is_the_mean_of_its_students(x64):
    splits = toy_splits(np.float64)
    method = tiny_dlf(jnp.float64, population_lib.Population(POPULATION))
    single = dataclasses.replace(method, population=population_lib.SINGLE_STUDENT)
    state = as_dtype(method.init(jax.random.PRNGKey(0), splits), jnp.float64)
    batches = method.batches(splits, seed=0, start_step=0)
    assert batches["train"]["x"].shape == (POPULATION, 4, 5, FEATURES)
    # Member 0 reads the single run's data order; the others their own.
    own = single.batches(splits, seed=0, start_step=0)["train"]
    np.testing.assert_array_equal(batches["train"]["x"][0], own["x"])
    assert not np.array_equal(batches["train"]["x"][1], own["x"])
    new, step_metrics = jax.jit(method.outer_step)(state, batches)
    assert step_metrics["loss"].shape == (POPULATION, 4)
    single_step = jax.jit(single.outer_step)
    grads, dev_errors = [], []
    for i in range(POPULATION):
        one, one_metrics = single_step(
            state.replace(start=member(state.start, i)),
            {**batches, "train": member(batches["train"], i)})
        grads.append(teacher_gradient(state.teacher_params, one.teacher_params))
        dev_errors.append(float(one_metrics["meta/dev_error"]))
    np.testing.assert_allclose(teacher_gradient(state.teacher_params, new.teacher_params),
                               np.mean(grads, axis=0), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(step_metrics["meta/dev_error"], np.mean(dev_errors), rtol=1e-6)
    assert not np.allclose(grads[0], grads[1], rtol=1e-3)  # the members really differ


def test_dln_population_gradients_are_the_means_of_its_students(x64):
    splits = toy_splits(np.float64)
    method = tiny_dln(jnp.float64, population_lib.Population(POPULATION))
    single = dataclasses.replace(method, population=population_lib.SINGLE_STUDENT)
    state = dln_state(method, splits, jnp.float64)
    batches = method.batches(splits, seed=0, start_step=0)
    # One program for the meta-gradients and the outer step (which recomputes them):
    # XLA compiles their shared work once.
    m, (new, _) = jax.jit(lambda s, b: (method.meta_gradients(s, b), method.outer_step(s, b)))(
        state, batches)
    single_gradients = jax.jit(single.meta_gradients)
    members = [(state.replace(student=member(state.student, i)),
                {**batches, "train": member(batches["train"], i)}) for i in range(POPULATION)]
    singles = [single_gradients(*args) for args in members]
    # Stage A: the hypergradient and its objective are the members' means.
    np.testing.assert_allclose(m.hypergrad, np.mean([s.hypergrad for s in singles], axis=0),
                               rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(m.result_a.value, np.mean([s.result_a.value for s in singles]),
                               rtol=1e-12)
    assert not np.allclose(singles[0].hypergrad, singles[1].hypergrad, rtol=1e-3)

    # Stage B: at the shared proposal phi'(psi) (from the averaged hypergradient), the
    # teacher's gradient is the mean of every member's own, and each member trains on.
    flat_phi, unravel = ravel_pytree(state.loss_params)
    step_fn = engine.make_student_step(method.model, dln_student_loss, method.tx)
    objective = method.update.dev_objective_fn(method.model, batches["val"])

    def member_value(psi, student, train_batches):
        steps, _ = method.teacher(psi, m.hypergrad, state.teacher_memory)
        proposal = unravel(flat_phi - method.dln_step_size * steps)
        final, _ = engine.unroll(step_fn, proposal, student, train_batches)
        return objective(None, final)[0], final

    member_grad = jax.jit(jax.grad(member_value, has_aux=True))
    references = [member_grad(state.teacher_params, s.student, b["train"]) for s, b in members]
    np.testing.assert_allclose(ravel_pytree(m.result_b.grad)[0],
                               np.mean([ravel_pytree(g)[0] for g, _ in references], axis=0),
                               rtol=1e-8, atol=1e-16)
    for i, (_, final) in enumerate(references):
        chex.assert_trees_all_close(member(new.student.params, i), final.params,
                                    rtol=1e-10)
    # The reported student is member 0.
    chex.assert_trees_all_equal(method.student(new), member(new.student, 0))


@pytest.mark.parametrize("tiny", [tiny_dlf, tiny_dln], ids=["l2t-dlf", "l2t-dln"])
def test_same_teacher_update_on_one_device_and_on_a_2x4_mesh(tiny):
    splits = toy_splits(np.float32)
    meshes = [mesh_lib.make_mesh({"population": 1, "data": 1}, jax.devices()[:1]),
              mesh_lib.make_mesh({"population": 2, "data": 4})]
    results = []
    for mesh in meshes:
        # B = 8 examples per step split over the data axis, P = 2 over the population.
        method = dataclasses.replace(tiny(jnp.float32, population_lib.Population(2, mesh)),
                                     batch_size=8)
        if tiny is tiny_dlf:
            state = method.init(jax.random.PRNGKey(0), splits)
        else:
            state = dln_state(method, splits, jnp.float32)
            state = state.replace(**method.population.place(
                {}, {"teacher_memory": state.teacher_memory})[1])
        results.append((state, *jax.jit(method.outer_step)(state, method.batches(splits, 0, 0))))
    (start, ref_state, ref_metrics), (_, new_state, new_metrics) = results
    students = "start" if tiny is tiny_dlf else "student"
    chex.assert_trees_all_close(new_state.teacher_params, ref_state.teacher_params, rtol=1e-5,
                                atol=1e-7)
    chex.assert_trees_all_close(new_metrics, ref_metrics, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(getattr(new_state, students), getattr(ref_state, students),
                                rtol=1e-5, atol=1e-6)
    assert not np.allclose(ravel_pytree(ref_state.teacher_params)[0],
                           ravel_pytree(start.teacher_params)[0])  # the teacher moved
    kernel = getattr(new_state, students).params["Dense_0"]["kernel"]
    assert kernel.sharding.spec == P("population") and len(kernel.sharding.device_set) == 8


@pytest.mark.parametrize("module", [l2t_dlf, l2t_dln], ids=["l2t-dlf", "l2t-dln"])
def test_smoke_config_with_a_population_of_two_on_the_mesh_runs_end_to_end(tmp_path, module):
    config = module.get_config("digits,noisy,smoke")
    config.train.update(num_steps=10, eval_every=10, checkpoint_every=10)
    if module is l2t_dlf:
        config.teacher.update(population_size=2, num_episodes=2)
    else:
        config.dln.population_size = 2
        config.train.batch_size = 24  # splits over a data axis of 4
    config.mesh.update(population=-1, data=4)
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert 0 <= summary["test_error"] <= 100
    records = metrics.read_metrics(
        str(tmp_path / dlf.TEACHER_DIR) if module is l2t_dlf else str(tmp_path))
    assert records[-1]["step"] == (20 if module is l2t_dlf else 10)
    assert all(r["meta/nonfinite"] == 0 and r["meta/grad_norm"] > 0 for r in records)
    # Resuming from the checkpoints written on the mesh continues the run (the L2T-DLF
    # teaching phase once failed here: mesh-placed teacher, single-device student).
    config.train.num_steps = 20  # a longer run, on purpose
    resumed = train.train_and_evaluate(config, str(tmp_path), allow_config_change=True)
    assert resumed["steps"] == 20 and metrics.read_metrics(str(tmp_path))[-1]["step"] == 20


@pytest.mark.parametrize("module, section, values, message", [
    (l2t_dlf, "teacher", {"population_size": 0}, "population_size must be an integer >= 1"),
    (l2t_dln, "dln", {"population_size": -1}, "population_size must be an integer >= 1"),
    (l2t_dln, "mesh", {"population": 1, "data": -1},
     "batch_size 25 does not split over config.mesh.data=8"),
    (l2t_dlf, "mesh", {"population": 3, "data": -1}, "does not fit 8 devices"),
])
def test_bad_population_configs_are_rejected(module, section, values, message):
    config = module.get_config("digits,smoke")
    config[section].update(values)
    with pytest.raises(ConfigError, match=message):
        train.validate_config(config)


def test_population_needs_a_phase_that_trains_one():
    config = l2t_dlf.get_config("digits,smoke")
    config.method = "l2t-dlf-fixed"
    config.teacher.population_size = 2
    with pytest.raises(ConfigError, match="applies to the teacher's episodes"):
        train.validate_config(config)
