"""Populations and SPMD: averaged meta-gradients, sharded = single device, checkpoints, hosts.

Runs on the 8 fake CPU devices that conftest.py sets up.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.population_variance import grad_variance
from l2t_jax import data, engine
from l2t_jax import mesh as mesh_lib
from l2t_jax import population as population_lib
from l2t_jax.checkpoint import Checkpointer
from l2t_jax.errors import ConfigError
from l2t_jax.losses import mean_cross_entropy
from l2t_jax.students import build_student
from launch import distributed

NUM_CLASSES = 3
NUM_FEATURES = 6
T = 4
BATCH = 8
POPULATION = 8


def weighted_tempered_ce(meta_params, output, batch, state):
    """A smooth teacher-controlled loss: per-class weights and a temperature."""
    del state
    logits, labels = output.logits, batch["y"]
    weights = jax.nn.softplus(meta_params["class_weight"])[labels]
    scaled = logits * jnp.exp(meta_params["log_temperature"])
    return jnp.mean(weights * optax.softmax_cross_entropy_with_integer_labels(scaled, labels))


@functools.cache
def make_population(population=POPULATION, dtype="float32", momentum=0.0):
    """A tiny MLP student, its step, a dev objective, P students and their own batches.

    Cached: tests that share a problem share its compiled initialisation.
    """
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(NUM_CLASSES, NUM_FEATURES))

    def sample(*shape):
        y = rng.integers(0, NUM_CLASSES, size=shape)
        x = centers[y] + rng.normal(scale=1.5, size=shape + (NUM_FEATURES,))
        return jnp.asarray(x, dtype), jnp.asarray(y, jnp.int32)

    xs, ys = sample(population, T, BATCH)
    dev_x, dev_y = sample(16)
    model = build_student(
        ml_collections.ConfigDict({"name": "mlp", "hidden": (8,), "activation": "tanh",
                                   "dtype": dtype}),
        NUM_CLASSES,
    )
    tx = optax.sgd(0.3, momentum=momentum or None)
    step_fn = engine.make_student_step(model, weighted_tempered_ce, tx)

    def objective(meta_params, final):
        del meta_params
        logits, _ = engine.apply_student(
            model, final.params, final.model_state, dev_x, train=False
        )
        error = jnp.mean(logits.argmax(-1) != dev_y)
        return mean_cross_entropy(logits, dev_y), {"dev_error": error}

    states = jax.jit(lambda rngs: population_lib.init_population(model, tx, rngs, dev_x[:1]))(
        jax.random.split(jax.random.PRNGKey(1), population)
    )
    meta_params = {
        "class_weight": jnp.asarray(rng.normal(scale=0.5, size=NUM_CLASSES), dtype),
        "log_temperature": jnp.asarray(0.1, dtype),
    }
    return model, tx, step_fn, objective, meta_params, states, {"x": xs, "y": ys}


def member(tree, i):
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def test_init_population_stacks_independent_students():
    model, tx, *_ = make_population()
    sample_x = jnp.zeros((1, NUM_FEATURES))
    rngs = jax.random.split(jax.random.PRNGKey(3), 3)
    stats = {"loss": jnp.ones(())}
    states = jax.jit(lambda r: population_lib.init_population(model, tx, r, sample_x, stats))(rngs)
    single = jax.jit(lambda r: engine.init_student_state(model, tx, r, sample_x, stats))
    for i in range(3):
        chex.assert_trees_all_close(member(states, i), single(rngs[i]))
    kernels = states.params["Dense_0"]["kernel"]
    assert kernels.shape == (3, NUM_FEATURES, 8)
    assert not np.allclose(kernels[0], kernels[1])  # different initialisations


@pytest.mark.parametrize(
    "estimator", [engine.FullBackprop(), engine.TruncatedBackprop(window=2, remat="step")],
    ids=["full", "truncated"],
)
def test_population_gradient_is_the_mean_of_single_student_gradients(x64, estimator):
    population = 3
    _, _, step_fn, objective, meta_params, states, batches = make_population(
        population, "float64", momentum=0.5
    )
    result = jax.jit(
        lambda mp, s, b: population_lib.PopulationEstimator(estimator)(step_fn, objective, mp, s, b)
    )(meta_params, states, batches)
    single = jax.jit(lambda mp, s, b: estimator(step_fn, objective, mp, s, b))
    singles = [
        single(meta_params, member(states, i), member(batches, i)) for i in range(population)
    ]
    grads = [s.grad for s in singles]
    mean_grad = jax.tree_util.tree_map(lambda *g: sum(g) / population, *grads)
    assert result.grad["log_temperature"].dtype == jnp.float64
    chex.assert_trees_all_close(result.grad, mean_grad, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(result.value, np.mean([s.value for s in singles]), rtol=1e-12)
    # The students really differ, so the average is not trivially any one of them.
    assert abs(float(grads[0]["log_temperature"] - grads[1]["log_temperature"])) > 1e-4
    for i, one in enumerate(singles):
        chex.assert_trees_all_close(member(result.state, i), one.state, rtol=1e-10)
        chex.assert_trees_all_close(member(result.aux, i), one.aux)
    assert result.metrics["loss"].shape == (population, T)


def test_per_student_shared_batches_and_grad_variance():
    _, _, step_fn, objective, meta_params, states, batches = make_population(2)
    shared = member(batches, 0)
    estimator = engine.FullBackprop()
    per_student = jax.jit(
        lambda mp, s, b: population_lib.PopulationEstimator(estimator, shared_batches=True)
        .per_student(step_fn, objective, mp, s, b)
    )(meta_params, states, shared)
    single = jax.jit(lambda mp, s: estimator(step_fn, objective, mp, s, shared))
    grads = []
    for i in range(2):
        one = single(meta_params, member(states, i))
        chex.assert_trees_all_close(member(per_student.grad, i), one.grad, rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close(member(per_student.state, i), one.state, rtol=1e-5,
                                    atol=1e-7)
        grads.append(jax.flatten_util.ravel_pytree(one.grad)[0])
    flat = np.stack(grads)
    assert not np.allclose(flat[0], flat[1])  # different initialisations, same data
    np.testing.assert_allclose(
        grad_variance(per_student.grad), flat.var(axis=0, ddof=1).sum(), rtol=1e-5
    )
    averaged = population_lib.average_population(per_student)
    np.testing.assert_allclose(averaged.value, per_student.value.mean(), rtol=1e-6)
    assert averaged.metrics["loss"].shape == (2, T)


@pytest.fixture(scope="module")
def sharding_problem():
    """The problem, its 1-device reference result, and mesh shape -> jitted (cached)."""
    problem = make_population()
    _, _, step_fn, objective, meta_params, states, batches = problem
    estimator = population_lib.PopulationEstimator(engine.FullBackprop())
    single = jax.jit(lambda mp, s, b: estimator(step_fn, objective, mp, s, b))
    # Committed to one device, so the reference runs there without any collective.
    reference = single(*jax.device_put((meta_params, states, batches), jax.devices()[0]))

    @functools.cache
    def on_mesh(shape):
        mesh = mesh_lib.make_mesh({"population": shape[0], "data": shape[1]})
        return mesh, population_lib.jit_population_meta_gradient(
            estimator, step_fn, objective, mesh)

    return problem, reference, on_mesh


@pytest.mark.parametrize("shape", [(2, 4), (4, 2), (8, 1), (1, 8)])
def test_sharded_meta_gradient_equals_single_device(sharding_problem, shape):
    (_, _, _, _, meta_params, states, batches), reference, on_mesh = sharding_problem
    assert len(reference.grad["class_weight"].sharding.device_set) == 1
    mesh, meta_gradient = on_mesh(shape)
    batches = jax.device_put(batches, mesh_lib.batch_sharding(mesh))
    # Each device holds POPULATION / shape[0] students' batches, BATCH / shape[1] examples.
    assert batches["x"].addressable_shards[0].data.shape == (
        POPULATION // shape[0], T, BATCH // shape[1], NUM_FEATURES)
    result = meta_gradient(meta_params, states, batches)
    chex.assert_trees_all_close(result.grad, reference.grad, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(result.state, reference.state, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(result.metrics, reference.metrics, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(result.aux, reference.aux)
    np.testing.assert_allclose(result.value, reference.value, rtol=1e-6)
    assert result.grad["class_weight"].sharding.is_fully_replicated
    kernel = result.state.params["Dense_0"]["kernel"]
    assert kernel.sharding.spec == P("population")
    assert kernel.addressable_shards[0].data.shape[0] == POPULATION // shape[0]
    if shape == (2, 4):
        # All-reduces of the student gradient over "data" in the forward and backward
        # loops (the batch is never gathered), then the meta-gradient's over "population".
        hlo = meta_gradient.lower(meta_params, states, batches).compile().as_text()
        assert hlo.count("all-reduce(") >= 3
        assert "all-gather" not in hlo


def test_population_that_does_not_split_over_the_mesh_is_a_config_error():
    _, _, step_fn, objective, meta_params, states, batches = make_population(2)
    mesh = mesh_lib.make_mesh({"population": 4, "data": 2})
    fn = population_lib.jit_population_meta_gradient(
        population_lib.PopulationEstimator(engine.FullBackprop()), step_fn, objective, mesh
    )
    with pytest.raises(ConfigError, match="population_size 2 .* multiple of 4"):
        fn(meta_params, states, batches)
    with pytest.raises(ConfigError, match="batch_size 8 .* multiple of 3"):
        mesh_lib.check_population_shapes(
            mesh_lib.make_mesh({"data": 3}, jax.devices()[:3]), 3, 8
        )


def test_checkpoint_written_on_8_devices_restores_on_1(tmp_path, sharding_problem):
    (_, _, _, _, meta_params, states, batches), reference, on_mesh = sharding_problem
    mesh, meta_gradient = on_mesh((2, 4))
    sharded = {
        "students": jax.device_put(reference.state, mesh_lib.population_sharding(mesh)),
        "teacher": jax.device_put(meta_params, mesh_lib.replicated(mesh)),
    }
    assert len(sharded["students"].params["Dense_0"]["kernel"].sharding.device_set) == 8
    writer = Checkpointer(str(tmp_path))
    writer.save(7, sharded, [])
    writer.close()

    one_device = jax.devices()[0]
    template = jax.device_put(
        {"students": states, "teacher": jax.tree_util.tree_map(jnp.zeros_like, meta_params)},
        one_device,
    )
    reader = Checkpointer(str(tmp_path))
    restored, step, _ = reader.restore_or(template)
    reader.close()
    assert step == 7
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(sharded))
    for leaf in jax.tree_util.tree_leaves(restored):
        assert leaf.sharding.device_set == {one_device}
    # ... and a state living on one device can go straight back to the mesh.
    resumed = meta_gradient(restored["teacher"], restored["students"], batches)
    assert resumed.state.step.sharding.spec == P("population")
    np.testing.assert_array_equal(resumed.state.step, 2 * T)


def test_mesh_specs_factor_the_device_count():
    assert mesh_lib.mesh_shape({"population": 2, "data": 4}, 8) == (2, 4)
    assert mesh_lib.mesh_shape({"population": -1, "data": 2}, 8) == (4, 2)
    assert mesh_lib.mesh_shape({"data": -1}, 8) == (1, 8)
    assert mesh_lib.mesh_shape(None, 8) == (8, 1)
    assert mesh_lib.mesh_shape(ml_collections.ConfigDict({"population": 1}), 1) == (1, 1)
    mesh = mesh_lib.make_mesh({"population": 4, "data": -1})
    assert dict(mesh.shape) == {"population": 4, "data": 2}
    assert mesh.devices.size == 8


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"population": 3, "data": -1}, "8 is not a multiple of 3"),
        ({"population": 2, "data": 2}, "needs 4 devices but 8"),
        ({"population": 4, "data": 4}, "needs 16 devices but 8"),
        ({"population": -1, "data": -1}, "at most one"),
        ({"population": 0}, "config.mesh.population must be a positive integer or -1"),
        ({"data": 2.0}, "config.mesh.data must be"),
        ({"model": 2}, "unknown mesh axis 'model'"),
    ],
)
def test_bad_mesh_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        mesh_lib.make_mesh(spec)


def test_population_batches_stack_each_seeds_data_order():
    rng = np.random.default_rng(0)
    split = data.ArraySplit(
        x=rng.normal(size=(20, 3)).astype(np.float32), y=np.arange(20, dtype=np.int32) % 4,
        y_clean=np.arange(20, dtype=np.int32) % 4,
    )
    batches = population_lib.population_batches(
        split, [5, 6, 7], start_step=2, num_steps=3, batch_size=4
    )
    assert batches["x"].shape == (3, 3, 4, 3)
    for i, seed in enumerate([5, 6, 7]):
        own = data.stacked_batches(split, seed=seed, start_step=2, num_steps=3, batch_size=4)
        np.testing.assert_array_equal(batches["y"][i], own["y"])
        np.testing.assert_array_equal(batches["x"][i], own["x"])
    assert not np.array_equal(batches["y"][0], batches["y"][1])


def test_initialize_distributed_is_a_no_op_unless_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    assert distributed.initialize_distributed() is False
    assert calls == []
    assert distributed.initialize_distributed("10.0.0.1:1234", 4, 2) is True
    assert calls[-1] == (("10.0.0.1:1234", 4, 2), {"heartbeat_timeout_seconds": 100})
    assert distributed.initialize_distributed("auto", heartbeat_timeout=7) is True
    assert calls[-1] == ((None, None, None), {"heartbeat_timeout_seconds": 7})
    with pytest.raises(ConfigError, match="need --coordinator_address"):
        distributed.initialize_distributed(num_processes=2, process_id=0)
    with pytest.raises(ConfigError, match=r"--process_id must be in \[0, --num_processes=2\)"):
        distributed.initialize_distributed("h:1", 2, 2)
    with pytest.raises(ConfigError, match="--num_processes must be >= 1"):
        distributed.initialize_distributed("h:1", 0, 0)
    with pytest.raises(ConfigError, match="--heartbeat_timeout must be >= 1"):
        distributed.initialize_distributed("h:1", 2, 0, heartbeat_timeout=0)
    assert len(calls) == 2


def test_host_slices_single_process_and_a_subset_of_devices():
    mesh = mesh_lib.make_mesh({"population": 2, "data": 4})
    # One process holds everything.
    assert mesh_lib.host_population_slice(mesh, 8) == slice(0, 8)
    assert mesh_lib.host_batch_slice(mesh, 16) == slice(0, 16)
    sharding = mesh_lib.batch_sharding(mesh)
    assert mesh_lib.host_slices(sharding, (8, T, 16, 3)) == (
        slice(0, 8), slice(0, T), slice(0, 16), slice(0, 3))
    # A "host" owning the first mesh row holds the first half of the population and,
    # since the data axis lies within the row, every example.
    first_row = list(mesh.devices[0])
    assert mesh_lib.host_slices(sharding, (8, T, 16, 3), first_row) == (
        slice(0, 4), slice(0, T), slice(0, 16), slice(0, 3))
    # A "host" owning the first mesh column: all members, a quarter of each batch.
    first_column = list(mesh.devices[:, 0])
    assert mesh_lib.host_slices(sharding, (8, T, 16, 3), first_column)[::2] == (
        slice(0, 8), slice(0, 4))
    with pytest.raises(ValueError, match="not a box"):
        mesh_lib.host_slices(sharding, (8, T, 16, 3), [mesh.devices[0, 0], mesh.devices[1, 1]])


def test_global_batches_on_one_host_place_the_whole_input():
    mesh = mesh_lib.make_mesh({"population": 4, "data": 2})
    _, _, _, _, _, _, batches = make_population()
    local = jax.device_get(batches)
    placed = mesh_lib.global_batches(mesh, local, population_size=POPULATION, batch_size=BATCH)
    assert placed["x"].sharding == NamedSharding(mesh, P("population", None, "data"))
    np.testing.assert_array_equal(np.asarray(placed["x"]), local["x"])
    shared = mesh_lib.global_batches(
        mesh, member(local, 0), population_size=None, batch_size=BATCH
    )
    assert shared["y"].sharding.spec == P(None, "data")
    np.testing.assert_array_equal(np.asarray(shared["y"]), local["y"][0])
