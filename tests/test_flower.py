"""The federated methods through Flower: the same rounds as the in-process simulation."""

import jax
import numpy as np
import pytest

from configs import federated as federated_config
from l2t_jax import data, flower, methods
from l2t_jax.errors import ConfigError


def tiny(method: str):
    """2 rounds, 3 clients (one SuperNode each), 2 of them a round."""
    config = federated_config.get_config("digits,smoke")
    config.method = method
    config.federated.update(num_clients=3, clients_per_round=2)
    config.train.update(num_steps=2, log_every=2, eval_every=2, checkpoint_every=2)
    return config


def in_process(config):
    """The same rounds as one program (`FederatedRounds.outer_step`)."""
    splits = data.load_splits(config.data)
    (phase,) = methods.get(config.method).build(config, splits,
                                                jax.random.PRNGKey(config.seed)).phases
    state, metrics = jax.jit(phase.loop.outer_step)(
        phase.init({}), phase.loop.batches(splits, config.seed, 0))
    return state, metrics


def test_flower_rounds_give_the_in_process_global_model_generator_and_teacher():
    # l2t-fedgen: FedAvg's round, FedGen's generator sent to the clients and trained on
    # the server from their heads, and the loss teacher's meta-gradient from the clients'
    # vector-Jacobian products.
    config = tiny("l2t-fedgen")
    outcome = flower.run_simulation(config)
    expected, metrics = in_process(config)
    got, want = outcome["state"], expected
    assert int(got.round) == 2
    for name in ("params", "generator", "teacher"):
        for a, b in zip(jax.tree_util.tree_leaves(getattr(got, name)),
                        jax.tree_util.tree_leaves(getattr(want, name))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)
    # The teacher moved (round 1's term has a weight, so a meta-gradient).
    assert not np.allclose(got.teacher["theta"], 0.0)
    np.testing.assert_allclose(outcome["train_loss"], metrics["loss"], rtol=1e-5)


def test_a_method_that_is_not_federated_is_refused_on_flower_in_one_line():
    config = tiny("fedavg")
    config.method = "ce"
    with pytest.raises(ConfigError, match="does not run on Flower"):
        flower.check_supported(config)
