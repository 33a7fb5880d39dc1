"""The federated methods on Flower: each client a Flower `ClientApp`, the server a `ServerApp`.

The same round as `l2t_jax.methods.federated.FederatedRounds` runs in one program,
split where a deployment splits it. Each SuperNode holds one client (its
``partition-id`` in the node config); every round:

1. The `ServerApp` draws the round's K clients and their PRNG keys
   (`FederatedRounds.sampled_clients`, `round_keys`). It sends each of them a ``train``
   message: the server's model (and FedGen's generator) as a Flower `ArrayRecord`, the
   client's key and the round.
2. The `ClientApp` builds its own batches from its own data
   (`FederatedRounds.client_batches`). It takes the E local steps with the method's own
   jitted `FederatedRounds.local_training`, and replies with its model and its number of
   examples.
3. The server averages the clients by size (`FederatedRounds.averaged`). With FedGen it
   also trains the generator on the clients' heads (`finish_round`).

So Flower's rounds give the in-process simulation's global model, to float tolerance
(`tests/test_flower.py`). Both sides build the method from the same config
(`methods.get(config.method).build`); the data never leaves the client that owns it, apart
from the dev/test arrays the server evaluates on. Supported: ``fedavg`` and ``fedgen``.
``l2t-fedgen``'s meta-gradient runs through the clients' local steps and needs them in one
program, so it is refused.

`run_simulation` runs the apps on Flower's simulation engine (Ray), one process;
`server_app` and `client_app` are the apps a deployment serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from l2t_jax import data, methods
from l2t_jax.errors import ConfigError
from l2t_jax.methods.federated import FederatedRounds, ServerState

# What each federated method sends between server and clients.
SUPPORTED = ("fedavg", "fedgen")
# Seconds the server waits for the SuperNodes to connect, and for a round's replies.
CONNECT_TIMEOUT, ROUND_TIMEOUT = 300.0, 3600.0
_BUILT: dict[str, tuple] = {}


def check_supported(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line `ConfigError` unless `config.method` runs on Flower."""
    if config.method not in SUPPORTED:
        raise ConfigError(f"config.method {config.method!r} does not run on Flower (its "
                          f"round needs every client in one program); choose one of "
                          f"{SUPPORTED}")


def build(config: ml_collections.ConfigDict) -> tuple[FederatedRounds, data.Splits,
                                                      ServerState]:
    """The method's rounds, the data and the server's initial state, as the driver builds
    them from `config` (once per process)."""
    key = config.to_json_best_effort()
    if key not in _BUILT:
        check_supported(config)
        splits = data.load_splits(config.data)
        plan = methods.get(config.method).build(config, splits,
                                                jax.random.PRNGKey(config.seed))
        (phase,) = plan.phases
        loop = phase.loop
        _BUILT[key] = (loop, splits, phase.init({}),
                       jax.jit(loop.local_training), jax.jit(loop.averaged),
                       jax.jit(loop.finish_round))
    return _BUILT[key][:3]


def _jitted(config: ml_collections.ConfigDict) -> tuple[Callable, Callable, Callable]:
    build(config)
    return _BUILT[config.to_json_best_effort()][3:]


def _arrays(tree) -> ArrayRecord:
    """A pytree's leaves, in tree order, as a Flower `ArrayRecord`."""
    return ArrayRecord([np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)])


def _tree(record: ArrayRecord, like):
    """The pytree of `like`'s structure whose leaves `record` holds (see `_arrays`)."""
    leaves = [jnp.asarray(a) for a in record.to_numpy_ndarrays()]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def _sent(state: ServerState):
    """What the server sends a client: its model and, with FedGen, its generator."""
    return {"params": state.params, "model_state": state.model_state,
            "generator": state.generator}


def client_app(config: ml_collections.ConfigDict) -> ClientApp:
    """The clients of `config`'s method as a Flower `ClientApp`.

    A SuperNode's ``partition-id`` (node config) is the client it holds. ``query``
    messages are answered with it; ``train`` messages carry the server's model, the
    client's key (``"rng"``) and the round (``config["round"]``), and are answered with
    the trained model and ``num-examples``.
    """
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return Message(RecordDict({"client": ConfigRecord(
            {"partition-id": int(context.node_config["partition-id"])})}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        loop, splits, initial = build(config)
        local_training, _, _ = _jitted(config)
        client = int(context.node_config["partition-id"])
        round_index = int(message.content["config"]["round"])
        received = _tree(message.content["arrays"], _sent(initial))
        server = initial.replace(round=jnp.asarray(round_index, jnp.int32), **received)
        rng = jnp.asarray(message.content["rng"].to_numpy_ndarrays()[0])
        meta_params = None
        if loop.generator is not None:
            meta_params = {"generator": server.generator, "weight": loop.term_weight(server)}
        batches = loop.client_batches(splits, config.seed, round_index, client)
        trained, metrics = local_training(server, meta_params, rng, batches)
        return Message(RecordDict({
            "arrays": _arrays({"params": trained.params, "model_state": trained.model_state}),
            "metrics": MetricRecord({
                "num-examples": int(loop.partition.sizes[client]),
                "train_loss": float(jnp.mean(metrics["loss"]))}),
        }), reply_to=message)

    return app


def server_app(config: ml_collections.ConfigDict, outcome: dict) -> ServerApp:
    """The server of `config`'s method as a Flower `ServerApp`.

    It runs ``config.train.num_steps`` rounds, then leaves the final `ServerState` in
    ``outcome["state"]`` and each round's mean client train loss in
    ``outcome["train_loss"]``.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        del context
        loop, _, state = build(config)
        _, averaged, finish_round = _jitted(config)
        nodes = _client_nodes(grid, loop.partition.num_clients)
        losses = []
        for round_index in range(config.train.num_steps):
            sampled = loop.sampled_clients(config.seed, round_index)
            rng, client_rngs, generator_rng = loop.round_keys(state)
            sent = _arrays(_sent(state))
            messages = [Message(RecordDict({
                "arrays": sent, "rng": ArrayRecord([np.asarray(client_rngs[slot])]),
                "config": ConfigRecord({"round": round_index})}),
                message_type="train", dst_node_id=nodes[int(client)])
                for slot, client in enumerate(sampled)]
            replies = {reply.metadata.src_node_id: reply
                       for reply in grid.send_and_receive(messages, timeout=ROUND_TIMEOUT)}
            missing = [int(c) for c in sampled if nodes[int(c)] not in replies
                       or replies[nodes[int(c)]].has_error()]
            if missing:
                raise RuntimeError(f"round {round_index}: clients {missing} did not reply")
            like = {"params": state.params, "model_state": state.model_state}
            trained = [_tree(replies[nodes[int(c)]].content["arrays"], like) for c in sampled]
            stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trained)
            weights = loop.round_weights(sampled)
            new_state = averaged(state, stacked["params"], stacked["model_state"],
                                 weights["weights"])
            state, _ = finish_round(state, new_state, stacked["params"],
                                    weights.get("label_weights"), generator_rng, rng)
            losses.append(float(np.mean([
                replies[nodes[int(c)]].content["metrics"]["train_loss"] for c in sampled])))
        outcome.update(state=state, train_loss=losses)

    return app


def _client_nodes(grid: Grid, num_clients: int) -> dict[int, int]:
    """``{client: node id}``: waits for the SuperNodes and asks each which client it holds."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(node_ids)} of {num_clients} SuperNodes connected "
                               f"within {CONNECT_TIMEOUT:g} s")
        time.sleep(0.2)
        node_ids = list(grid.get_node_ids())
    questions = [Message(RecordDict({"client": ConfigRecord({})}), message_type="query",
                         dst_node_id=node) for node in node_ids]
    nodes = {}
    for reply in grid.send_and_receive(questions, timeout=CONNECT_TIMEOUT):
        nodes[int(reply.content["client"]["partition-id"])] = reply.metadata.src_node_id
    if sorted(nodes) != list(range(num_clients)):
        raise RuntimeError(f"the SuperNodes hold clients {sorted(nodes)}, not each of "
                           f"0..{num_clients - 1} once")
    return nodes


def run_simulation(config: ml_collections.ConfigDict) -> dict:
    """Runs `config`'s method on Flower's simulation engine, one SuperNode per client.

    Returns:
        ``{"state": the final ServerState, "train_loss": per round}``.
    """
    from flwr.simulation import run_simulation as flower_simulation

    check_supported(config)
    outcome = {}
    flower_simulation(server_app(config, outcome), client_app(config),
                      num_supernodes=config.federated.num_clients,
                      backend_config={"client_resources": {"num_cpus": 1}})
    if "state" not in outcome:
        raise RuntimeError("the Flower run ended without finishing its rounds (see its log)")
    return outcome

