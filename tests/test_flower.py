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


def test_flower_rounds_give_the_in_process_global_model():
    # FedGen: FedAvg's round plus the generator sent to the clients and trained on the
    # server from their heads.
    config = tiny("fedgen")
    outcome = flower.run_simulation(config)
    expected, metrics = in_process(config)
    assert int(outcome["state"].round) == 2
    for got, want in zip(jax.tree_util.tree_leaves((outcome["state"].params,
                                                    outcome["state"].generator)),
                         jax.tree_util.tree_leaves((expected.params, expected.generator))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outcome["train_loss"], metrics["loss"], rtol=1e-5)


def test_l2t_fedgen_is_refused_on_flower_in_one_line():
    with pytest.raises(ConfigError, match="does not run on Flower"):
        flower.check_supported(tiny("l2t-fedgen"))
