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

With ``l2t-fedgen`` the server sends the loss teacher's weight of the FedGen term in step
1, and a second exchange gives the teacher its exact meta-gradient. The server
differentiates its dev objective with respect to the averaged model and sends each
client its share of that cotangent (its averaging weight times it). The client answers
a ``train.meta_gradient`` message with the vector-Jacobian product of its local training
with respect to the weight: it trains again from the same start, key and batches. The
sum over the clients is the derivative of the objective with respect to the weight, and
the teacher's own vector-Jacobian product turns it into the gradient of its parameters.
This is the gradient the one program takes by `jax.value_and_grad` through the round.

So Flower's rounds give the in-process simulation's global model, generator and loss
teacher, to float tolerance (`tests/test_flower.py`). Both sides build the method from the
same config (`methods.get(config.method).build`); the data never leave the client that
owns them, apart from the dev/test arrays the server evaluates on.

`run_simulation` runs the apps on Flower's simulation engine (Ray), one process;
`server_app` and `client_app` are the apps a deployment serves.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from l2t_jax import data, engine, methods
from l2t_jax.errors import ConfigError
from l2t_jax.methods.federated import FederatedRounds, ServerState

# What each federated method sends between server and clients.
SUPPORTED = ("fedavg", "fedgen", "l2t-fedgen")
# Seconds the server waits for the SuperNodes to connect, and for a round's replies.
CONNECT_TIMEOUT, ROUND_TIMEOUT = 300.0, 3600.0
_BUILT: dict[str, tuple] = {}


def check_supported(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line `ConfigError` unless `config.method` runs on Flower."""
    if config.method not in SUPPORTED:
        raise ConfigError(f"config.method {config.method!r} does not run on Flower (it is "
                          f"not a federated method); choose one of {SUPPORTED}")


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
        _BUILT[key] = (loop, splits, phase.init({}), _Programs(loop))
    return _BUILT[key][:3]


class _Programs:
    """The jitted pieces of a round that the apps call (compiled once per process)."""

    def __init__(self, loop: FederatedRounds):
        self.local_training = jax.jit(loop.local_training)
        self.averaged = jax.jit(loop.averaged)
        self.finish_round = jax.jit(loop.finish_round)

        def weight_vjp(server, weight, rng, batches, cotangent):
            def trained(w):
                client, _ = loop.local_training(
                    server, {"generator": server.generator, "weight": w}, rng, batches)
                return {"params": client.params, "model_state": client.model_state}

            return jax.vjp(trained, weight)[1](cotangent)[0]

        self.weight_vjp = jax.jit(weight_vjp)
        if loop.teacher is not None:
            self.objective_grad = jax.jit(jax.value_and_grad(
                lambda model, server, dev: loop.server_objective(server.replace(**model), dev),
                has_aux=True))
            self.taught_weight = jax.jit(lambda teacher, server: jax.vjp(
                lambda t: loop.taught_weight(t, server), teacher))
            self.apply = jax.jit(loop.teacher_update.apply)


def _programs(config: ml_collections.ConfigDict) -> _Programs:
    build(config)
    return _BUILT[config.to_json_best_effort()][3]


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
    messages are answered with it. ``train`` messages carry the server's model
    (``"arrays"``), the client's key and the FedGen term's weight (``"keys"``) and the
    round (``config["round"]``); they are answered with the trained model and
    ``num-examples``. ``train.meta_gradient`` messages carry the same and a cotangent of
    the client's trained model; they are answered with its product with the
    derivative of the trained model with respect to the weight (``"d_weight"``).
    """
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return Message(RecordDict({"client": ConfigRecord(
            {"partition-id": int(context.node_config["partition-id"])})}), reply_to=message)

    def received(message: Message, context: Context):
        """The round as the server sent it: the server's state, the client's key and
        batches, and the FedGen term's weight (None without a generator)."""
        loop, splits, initial = build(config)
        client = int(context.node_config["partition-id"])
        round_index = int(message.content["config"]["round"])
        server = initial.replace(round=jnp.asarray(round_index, jnp.int32),
                                 **_tree(message.content["arrays"], _sent(initial)))
        rng, *weight = [jnp.asarray(a) for a in message.content["keys"].to_numpy_ndarrays()]
        batches = loop.client_batches(splits, config.seed, round_index, client)
        return client, server, rng, batches, (weight[0] if weight else None)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        loop, _, _ = build(config)
        client, server, rng, batches, weight = received(message, context)
        meta_params = None
        if weight is not None:
            meta_params = {"generator": server.generator, "weight": weight}
        trained, metrics = _programs(config).local_training(server, meta_params, rng, batches)
        return Message(RecordDict({
            "arrays": _arrays({"params": trained.params, "model_state": trained.model_state}),
            "metrics": MetricRecord({
                "num-examples": int(loop.partition.sizes[client]),
                "train_loss": float(jnp.mean(metrics["loss"]))}),
        }), reply_to=message)

    @app.train("meta_gradient")
    def meta_gradient(message: Message, context: Context) -> Message:
        _, server, rng, batches, weight = received(message, context)
        like = {"params": server.params, "model_state": server.model_state}
        cotangent = _tree(message.content["cotangent"], like)
        derivative = _programs(config).weight_vjp(server, weight, rng, batches, cotangent)
        return Message(RecordDict({"d_weight": ArrayRecord([np.asarray(derivative)])}),
                       reply_to=message)

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
        loop, splits, state = build(config)
        programs = _programs(config)
        dev = {"x": splits.meta_dev.x, "y": splits.meta_dev.y}
        nodes = _client_nodes(grid, loop.partition.num_clients)
        losses = []
        for round_index in range(config.train.num_steps):
            sampled = loop.sampled_clients(config.seed, round_index)
            rng, client_rngs, generator_rng = loop.round_keys(state)
            weight = weight_vjp = None
            if loop.teacher is not None:
                weight, weight_vjp = programs.taught_weight(state.teacher, state)
            elif loop.generator is not None:
                weight = loop.term_weight(state)

            round_ = _Round(grid, [nodes[int(c)] for c in sampled], round_index,
                            _arrays(_sent(state)), client_rngs, weight)
            replies = round_.ask("train")
            like = {"params": state.params, "model_state": state.model_state}
            trained = [_tree(reply.content["arrays"], like) for reply in replies]
            stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trained)
            weights = loop.round_weights(sampled)
            new_state = programs.averaged(state, stacked["params"], stacked["model_state"],
                                          weights["weights"])
            if loop.teacher is not None:
                (value, aux), cotangent = programs.objective_grad(
                    {"params": new_state.params, "model_state": new_state.model_state},
                    new_state, dev)
                derivatives = round_.ask("train.meta_gradient", [
                    {"cotangent": _arrays(jax.tree_util.tree_map(lambda g, w=w: w * g,
                                                                 cotangent))}
                    for w in weights["weights"]])
                d_weight = sum(jnp.asarray(reply.content["d_weight"].to_numpy_ndarrays()[0])
                               for reply in derivatives)
                teacher, opt_state, _ = programs.apply(
                    state.teacher, state.teacher_opt_state,
                    engine.MetaGradient(value, weight_vjp(d_weight)[0], None, {}, aux))
                new_state = new_state.replace(teacher=teacher, teacher_opt_state=opt_state)
            state, _ = programs.finish_round(state, new_state, stacked["params"],
                                             weights.get("label_weights"), generator_rng, rng)
            losses.append(float(np.mean([r.content["metrics"]["train_loss"] for r in replies])))
        outcome.update(state=state, train_loss=losses)

    return app


class _Round:
    """One round's exchanges with its clients' SuperNodes."""

    def __init__(self, grid: Grid, nodes: list[int], round_index: int, sent: ArrayRecord,
                 client_rngs: jax.Array, weight: jax.Array | None):
        self.grid, self.nodes, self.round_index = grid, nodes, round_index
        self.sent, self.client_rngs, self.weight = sent, client_rngs, weight

    def ask(self, message_type: str, extra: list[dict] | None = None) -> list[Message]:
        """Sends every client of the round the server's state, its key, the round and the
        FedGen weight (with `extra[slot]`'s records); returns the replies in slot order."""
        messages = []
        for slot, node in enumerate(self.nodes):
            keys = [self.client_rngs[slot]] + ([] if self.weight is None else [self.weight])
            content = {"arrays": self.sent, "keys": ArrayRecord([np.asarray(k) for k in keys]),
                       "config": ConfigRecord({"round": self.round_index}),
                       **(extra[slot] if extra else {})}
            messages.append(Message(RecordDict(content), message_type=message_type,
                                    dst_node_id=node))
        replies = {reply.metadata.src_node_id: reply
                   for reply in self.grid.send_and_receive(messages, timeout=ROUND_TIMEOUT)}
        missing = [n for n in self.nodes if n not in replies or replies[n].has_error()]
        if missing:
            raise RuntimeError(f"round {self.round_index}: {len(missing)} clients did not "
                               f"reply (nodes {missing})")
        return [replies[node] for node in self.nodes]


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

