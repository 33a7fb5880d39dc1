"""Federated clients: partitions, FedAvg rounds against a Python loop, meshes, runs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import federated as federated_config
from l2t_jax import data, engine, metrics, train
from l2t_jax import mesh as mesh_lib
from l2t_jax.errors import ConfigError
from l2t_jax.losses import cross_entropy_loss
from l2t_jax.methods import federated

LABELS = np.repeat(np.arange(10), 100)


def test_partitions_deal_every_example_once_and_deterministically():
    for kind in data.PARTITIONS:
        partition = data.partition_clients(LABELS, 10, 20, kind=kind, alpha=0.3, seed=3)
        dealt = np.concatenate(partition.indices)
        np.testing.assert_array_equal(np.sort(dealt), np.arange(len(LABELS)))
        again = data.partition_clients(LABELS, 10, 20, kind=kind, alpha=0.3, seed=3)
        assert all(np.array_equal(a, b) for a, b in zip(partition.indices, again.indices))
        for client, indices in enumerate(partition.indices):
            np.testing.assert_array_equal(np.bincount(LABELS[indices], minlength=10),
                                          partition.label_counts[client])
    iid = data.partition_clients(LABELS, 10, 20, kind="iid", seed=3)
    assert set(iid.sizes) == {50}


def test_a_small_dirichlet_alpha_skews_the_clients_labels():
    def dominant_share(alpha):
        counts = data.partition_clients(LABELS, 10, 10, alpha=alpha).label_counts
        return np.mean(counts.max(axis=1) / counts.sum(axis=1))

    assert dominant_share(0.1) > 0.6 > 0.3 > dominant_share(100.0)


def test_a_partition_that_leaves_a_client_empty_is_one_line():
    with pytest.raises(ConfigError, match="leaves client .* without examples; raise "
                                          "config.federated.alpha") as error:
        data.partition_clients(LABELS[:30], 10, 20, alpha=0.01)
    assert "\n" not in str(error.value)


@pytest.fixture(scope="module")
def smoke():
    """The smoke config (4 clients, 2 a round, 3 local steps) and its data."""
    config = federated_config.get_config("digits,smoke")
    return config, data.load_splits(config.data)


def fedavg(config, splits, **fields):
    plan = federated.build_rounds(config, splits, jax.random.PRNGKey(0))
    return dataclasses.replace(plan.phases[0].loop, **fields)


def test_a_round_is_the_size_weighted_mean_of_the_clients_local_training(smoke):
    config, splits = smoke
    loop = fedavg(config, splits, steps_per_call=2)
    state = loop.init(jax.random.PRNGKey(1), splits)
    batches = loop.batches(splits, seed=5, start_step=0)
    new_state, round_metrics = jax.jit(loop.outer_step)(state, batches)
    assert round_metrics["loss"].shape == (2,) and int(new_state.round) == 2

    # The same two rounds as a Python loop over rounds and clients.
    step_fn = engine.make_student_step(loop.model, cross_entropy_loss, loop.tx)
    params, model_state, rng = state.params, state.model_state, state.rng
    x = batches["x"].reshape(2, 2, 3, *batches["x"].shape[2:])  # (K, R, E, B, ...)
    y = batches["y"].reshape(2, 2, 3, -1)
    for r in range(2):
        clients = loop.sampled_clients(5, r)
        sizes = loop.partition.sizes[clients]
        np.testing.assert_allclose(batches["weights"][r], sizes / sizes.sum())
        for k, client in enumerate(clients):  # every slot holds its client's own examples
            own = {row.tobytes() for row in splits.train.x[loop.partition.indices[client]]}
            assert {row.tobytes() for row in x[k, r].reshape(-1, *x.shape[4:])} <= own
        rng, round_rng = jax.random.split(rng)
        trained = []
        for k, client_rng in enumerate(jax.random.split(round_rng, 2)):
            client = engine.StudentState.create(params, client_rng, tx=loop.tx,
                                                model_state=model_state)
            trained.append(engine.unroll(step_fn, None, client,
                                         {"x": x[k, r], "y": y[k, r]})[0])
        weights = batches["weights"][r]
        params = jax.tree_util.tree_map(
            lambda *leaves, w=weights: sum(wk * leaf for wk, leaf in zip(w, leaves)),
            *[client.params for client in trained])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                   atol=1e-6),
                           new_state.params, params)


@pytest.mark.parametrize("build", [federated.build_rounds, federated.build_fedgen],
                         ids=["fedavg", "fedgen"])
def test_the_same_rounds_on_one_device_and_on_a_4x2_mesh(smoke, build):
    config, splits = smoke
    config = config.copy_and_resolve_references()
    config.federated.update(num_clients=8, clients_per_round=4)
    results = []
    for spec in ({"population": 1, "data": 1}, {"population": 4, "data": 2}):
        device_mesh = mesh_lib.make_mesh(spec, jax.devices()[:np.prod(list(spec.values()))])
        loop = dataclasses.replace(build(config, splits, jax.random.PRNGKey(0)).phases[0].loop,
                                   mesh=device_mesh)
        state = loop.init(jax.random.PRNGKey(1), splits)
        state, _ = jax.jit(loop.outer_step)(state, loop.batches(splits, seed=0, start_step=0))
        results.append((state.params, state.generator))
    kernel = jax.tree_util.tree_leaves(results[1])[0]
    assert len(kernel.sharding.device_set) == 8
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                   atol=1e-6), *results)


def test_fedavg_runs_end_to_end_and_resumes_to_the_same_rounds(tmp_path):
    config = federated_config.get_config("digits,smoke")
    summary = train.train_and_evaluate(config, str(tmp_path / "whole"))
    assert summary["clients"] == 4 and 0 <= summary["test_error"] < 90
    config.train.num_steps = 2
    train.train_and_evaluate(config, str(tmp_path / "halves"))
    config.train.num_steps = 4
    train.train_and_evaluate(config, str(tmp_path / "halves"), allow_config_change=True)
    assert (metrics.read_metrics(str(tmp_path / "whole"))
            == metrics.read_metrics(str(tmp_path / "halves")))


@pytest.mark.parametrize("field, value, message", [
    ("clients_per_round", 5, "clients_per_round must be an integer in \\[1, 4\\]"),
    ("alpha", 0.0, "config.federated.alpha must be"),
    ("partition", "labels", "config.federated.partition must be one of"),
])
def test_bad_federated_configs_are_one_line(field, value, message):
    config = federated_config.get_config("digits,smoke")
    config.federated[field] = value
    with pytest.raises(ConfigError, match=message):
        train.validate_config(config)


def test_the_round_clients_must_split_over_the_mesh():
    config = federated_config.get_config("digits,smoke")
    config.mesh.update(population=-1, data=1)  # 8 devices, 2 clients a round
    with pytest.raises(ConfigError, match="clients_per_round 2 does not split over "
                                          "config.mesh.population=8"):
        train.validate_config(config)


def test_fedgen_diversity_term_is_one_for_collapsed_latents_and_lower_for_spread_ones():
    noise = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
    assert float(federated.diversity_loss(noise, jnp.zeros((16, 3)))) == 1.0
    assert float(federated.diversity_loss(noise, noise[:, :3])) < 0.5


def test_fedgen_head_is_the_mlps_read_out_layer(smoke):
    config, splits = smoke
    loop = fedavg(config, splits)
    state = loop.init(jax.random.PRNGKey(1), splits)
    x = splits.train.x[:5]
    logits, sown = loop.model.apply({"params": state.params}, x, mutable="intermediates")
    hidden = sown["intermediates"][f"hidden_{len(loop.model.hidden) - 1}"][0]
    np.testing.assert_allclose(
        federated.head_logits(state.params, hidden, len(loop.model.hidden)), logits,
        rtol=1e-5, atol=1e-6)


def test_fedgen_rounds_add_the_generator_term_and_train_the_generator(smoke):
    config, splits = smoke
    config = config.copy_and_resolve_references()
    config.method = "fedgen"
    plan = federated.build_fedgen(config, splits, jax.random.PRNGKey(0))
    loop = dataclasses.replace(plan.phases[0].loop, steps_per_call=2)
    state = loop.init(jax.random.PRNGKey(1), splits)
    batches = loop.batches(splits, seed=0, start_step=0)
    # Each client's share of each label among the round's clients.
    held = batches["label_weights"].sum(axis=1)
    np.testing.assert_allclose(held[held > 0], 1.0, rtol=1e-6)
    assert batches["gen_noise"].shape == (*batches["gen_y"].shape, config.fedgen.noise_dim)
    new_state, round_metrics = jax.jit(loop.outer_step)(state, batches)
    # No term in round 0 (the generator is untrained), a_1 = 10 * 0.98 in round 1: the
    # loss is then above the cross-entropy by the term.
    np.testing.assert_allclose(round_metrics["fedgen/weight"], [0.0, 9.8], rtol=1e-6)
    np.testing.assert_allclose(round_metrics["loss"][0], round_metrics["cross_entropy"][0])
    assert round_metrics["loss"][1] > round_metrics["cross_entropy"][1] + 1.0
    assert not jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.all(a == b)), new_state.generator, state.generator))


def test_fedgen_needs_an_mlp_student():
    config = federated_config.get_config("digits,smoke")
    config.update(method="fedgen")
    config.student.name = "lenet5"
    with pytest.raises(ConfigError, match="set config.student.name=mlp"):
        train.validate_config(config)


def test_l2t_fedgen_meta_gradient_matches_differences_and_a_loop_float64(x64):
    config = federated_config.get_config("digits,smoke")
    config.update(method="l2t-fedgen")
    config.student.dtype = "float64"
    splits = data.load_splits(config.data)
    loop = dataclasses.replace(
        federated.build_taught(config, splits, jax.random.PRNGKey(0)).phases[0].loop,
        steps_per_call=1)
    server = loop.init(jax.random.PRNGKey(1), splits).replace(round=jnp.asarray(1))
    batches = loop.batches(splits, seed=0, start_step=1)
    clients = {k: batches[k].reshape(2, 3, *batches[k].shape[2:])
               for k in ("x", "y", "gen_y", "gen_noise")}
    teacher = {"theta": jnp.asarray([[0.3]]), "bias": jnp.asarray([0.2])}
    rng = jax.random.PRNGKey(2)
    client_rngs = jax.random.split(rng, 2)

    @jax.jit
    def objective(params):
        return loop.round_objective(params, server, clients, batches["weights"][0],
                                    client_rngs, batches["dev"])[0]

    def loop_objective(params):  # the same round, one client at a time
        multiplier = loop.teacher.weights(params, jnp.asarray([1 / 4]))["multiplier"]
        meta = {"generator": server.generator,
                "weight": multiplier * loop.generator.weight(1)}
        step_fn = engine.make_student_step(loop.model, cross_entropy_loss, loop.tx,
                                           params_loss_fn=loop.generator.client_term(2))
        trained = []
        for k, client_rng in enumerate(client_rngs):
            client = engine.StudentState.create(server.params, client_rng, tx=loop.tx)
            trained.append(engine.unroll(step_fn, meta, client,
                                         {key: v[k] for key, v in clients.items()})[0].params)
        averaged = jax.tree_util.tree_map(
            lambda a, b: batches["weights"][0][0] * a + batches["weights"][0][1] * b, *trained)
        final = engine.StudentState.create(averaged, rng, tx=loop.tx)
        return loop.teacher_update.dev_objective_fn(loop.model, batches["dev"])(None, final)[0]

    grad = jax.jit(jax.grad(objective))(teacher)
    assert float(jnp.abs(grad["theta"][0, 0])) > 1e-6  # the round's weight matters
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                           grad, jax.jit(jax.grad(loop_objective))(teacher))
    eps = 1e-6
    for name in ("theta", "bias"):
        step = jax.tree_util.tree_map(jnp.zeros_like, teacher)
        step[name] = step[name] + eps
        plus = jax.tree_util.tree_map(jnp.add, teacher, step)
        minus = jax.tree_util.tree_map(jnp.subtract, teacher, step)
        difference = (objective(plus) - objective(minus)) / (2 * eps)
        np.testing.assert_allclose(grad[name].sum(), difference, rtol=1e-5)


def test_the_fedgen_paper_setting_runs_a_few_rounds_on_fake_mnist(tmp_path):
    paper = federated_config.get_config("fedgen_mnist")
    f = paper.federated
    assert (paper.data.name, f.num_clients, f.clients_per_round, f.local_steps, f.alpha,
            paper.train.batch_size, paper.train.num_steps) == ("mnist", 20, 10, 20, 0.1, 32, 200)
    config = federated_config.get_config("fedgen_mnist,smoke")
    config.method = "fedgen"
    config.data.update(name="fake_mnist", dev_size=64, meta_dev_size=32)  # no network here
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["steps"] == 4 and 0 <= summary["test_error"] <= 100
