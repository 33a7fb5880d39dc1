"""Federated learning in one program: clients as a stacked, vmapped, sharded axis.

``fedavg`` (McMahan et al. 2017): the train split is partitioned into N clients
(`l2t_jax.data.partition_clients`: Dirichlet(alpha) over labels, or IID). Each round,
K of the N clients (drawn without replacement from ``[seed, round]``) start from the
server's model, take E local steps of batch B under cross-entropy with a fresh local
optimizer, and the server replaces its model by their average weighted by client size
(parameters and BatchNorm statistics alike). The K clients of a round are one stacked
pytree axis, vmapped and laid out on the mesh's ``"population"`` axis (each batch's
examples on ``"data"``), so the same config runs on one device and on many with the same
numbers up to the order of floating-point sums; in a multi-host run each host builds only
its clients' batches. A driver step is one round: ``config.train.num_steps`` rounds,
``config.train.log_every`` rounds per jitted call (a `lax.scan` over rounds).

Each client draws its batches from its own endless stream of its examples
(`data.stream_indices`, seeded by ``[seed, client]``), advanced by E * B examples per
round whether or not it was sampled: stateless, so a resumed run sees the same data.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from l2t_jax import config_checks as checks
from l2t_jax import data, engine, mesh, optimizers, students
from l2t_jax.errors import ConfigError
from l2t_jax.losses import cross_entropy_loss
from l2t_jax.methods import base

# The run's client partition (sizes and label counts), written beside the metrics.
PARTITION_FILE = "partition.json"


@flax.struct.dataclass
class ServerState:
    """The server's model between rounds.

    Attributes:
        params: the global model's parameters.
        model_state: its other Flax collections (averaged BatchNorm statistics).
        rng: PRNG key; each round's clients get keys folded from it.
        round: rounds done (int32).
    """

    params: engine.PyTree
    model_state: engine.PyTree
    rng: jax.Array
    round: jax.Array


@dataclasses.dataclass(frozen=True)
class FedAvg:
    """The rounds of federated averaging (`base.EvaluatedLoop`).

    Attributes:
        model: the clients' (and server's) Flax network.
        tx: each client's local optimizer, fresh every round.
        partition: which train examples each client holds.
        clients_per_round: K.
        local_steps: E, local steps per client and round.
        batch_size: B, a client's local batch.
        steps_per_call: rounds per jitted call (the driver's log interval).
        mesh: the device mesh of the clients; None: one device.
    """

    model: nn.Module
    tx: optax.GradientTransformation
    partition: data.Partition
    clients_per_round: int
    local_steps: int
    batch_size: int
    steps_per_call: int
    mesh: Mesh | None = None

    def init(self, rng: jax.Array, splits: data.Splits) -> ServerState:
        """The server's initial model (replicated on the mesh)."""
        student = engine.init_student_state(self.model, self.tx, rng, splits.train.x[:1])
        state = ServerState(student.params, student.model_state, student.rng,
                            jnp.zeros((), jnp.int32))
        if self.mesh is not None:
            state = jax.device_put(state, mesh.replicated(self.mesh))
        return state

    def sampled_clients(self, seed: int, round_index: int) -> np.ndarray:
        """The K clients of round `round_index` (sorted client ids)."""
        rng = np.random.default_rng([seed, round_index])
        return np.sort(rng.choice(self.partition.num_clients, self.clients_per_round,
                                  replace=False))

    def batches(self, splits: data.Splits, seed: int, start_step: int) -> dict:
        """The clients' batches and weights of the rounds of one call.

        Returns:
            ``{"x": (K, R * E, B, ...), "y": (K, R * E, B), "weights": (R, K)}``: slot k
            of round r is its k-th sampled client, whose size share is its weight. On a
            mesh ``x`` and ``y`` are global arrays laid out by `mesh.batch_sharding`,
            each host having built only its clients' part of its examples.
        """
        rounds = range(start_step, start_step + self.steps_per_call)
        sampled = np.stack([self.sampled_clients(seed, r) for r in rounds])  # (R, K)
        slots = slice(None)
        examples = slice(None)
        if self.mesh is not None:
            slots = mesh.host_population_slice(self.mesh, self.clients_per_round)
            examples = mesh.host_batch_slice(self.mesh, self.batch_size)
        per_round = self.local_steps * self.batch_size
        index = np.stack([
            np.stack([
                self.partition.indices[client][data.stream_indices(
                    len(self.partition.indices[client]), (seed, int(client)),
                    r * per_round, per_round)]
                for client in clients[slots]])
            for r, clients in zip(rounds, sampled)
        ])  # (R, K_host, E * B)
        index = index.reshape(len(rounds), index.shape[1], self.local_steps, self.batch_size)
        index = index.transpose(1, 0, 2, 3)[..., examples]  # (K_host, R, E, B_host)
        index = index.reshape(index.shape[0], -1, index.shape[-1])
        local = {"x": splits.train.x[index], "y": splits.train.y[index]}
        sizes = self.partition.sizes[sampled].astype(np.float32)
        weights = sizes / sizes.sum(axis=1, keepdims=True)
        if self.mesh is not None:
            local = mesh.global_batches(self.mesh, local,
                                        population_size=self.clients_per_round,
                                        batch_size=self.batch_size)
        return {**local, "weights": weights}

    def outer_step(self, state: ServerState, batches: dict):
        """`steps_per_call` rounds of local training and weighted averaging."""
        step_fn = engine.make_student_step(self.model, cross_entropy_loss, self.tx)
        num_clients = self.clients_per_round

        def per_round(a):  # (K, R * E, B, ...) -> (R, K, E, B, ...)
            a = a.reshape(num_clients, self.steps_per_call, self.local_steps, *a.shape[2:])
            return jnp.moveaxis(a, 1, 0)

        inputs = ({"x": per_round(batches["x"]), "y": per_round(batches["y"])},
                  batches["weights"])

        def one_round(server: ServerState, round_inputs):
            client_batches, weights = round_inputs
            if self.mesh is not None:
                client_batches = jax.lax.with_sharding_constraint(
                    client_batches, mesh.batch_sharding(self.mesh))
            rng, round_rng = jax.random.split(server.rng)

            def local_training(client_rng, own_batches):
                client = engine.StudentState.create(server.params, client_rng, tx=self.tx,
                                                    model_state=server.model_state)
                return engine.unroll(step_fn, None, client, own_batches)

            client_rngs = jax.random.split(round_rng, num_clients)
            clients, metrics = jax.vmap(local_training)(client_rngs, client_batches)

            def average(stacked):
                return jnp.tensordot(weights.astype(stacked.dtype), stacked, axes=1)

            server = ServerState(jax.tree_util.tree_map(average, clients.params),
                                 jax.tree_util.tree_map(average, clients.model_state),
                                 rng, server.round + 1)
            return server, jax.tree_util.tree_map(jnp.mean, metrics)

        return jax.lax.scan(one_round, state, inputs)

    def student(self, state: ServerState) -> engine.StudentState:
        """The server's model, to evaluate."""
        return engine.StudentState.create(state.params, state.rng, tx=self.tx,
                                          model_state=state.model_state, step=state.round)


def client_mesh(config: ml_collections.ConfigDict) -> Mesh | None:
    """The clients' mesh from ``config.mesh`` (None: every size 1, one device).

    Raises:
        ConfigError: a bad mesh, or K or B that does not split over it.
    """
    spec = config.get("mesh")
    if spec is None or all(v == 1 for v in dict(spec.items()).values()):
        return None
    device_mesh = mesh.make_mesh(spec)
    clients, population = config.federated.clients_per_round, device_mesh.shape[
        mesh.POPULATION_AXIS]
    if clients % population:
        raise ConfigError(f"config.federated.clients_per_round {clients} does not split over "
                          f"config.mesh.population={population} devices; make it a multiple "
                          f"of {population}")
    mesh.check_population_shapes(device_mesh, clients, config.train.batch_size)
    return device_mesh


def client_partition(config: ml_collections.ConfigDict, splits: data.Splits) -> data.Partition:
    """The train split's partition into ``config.federated``'s clients."""
    f = config.federated
    return data.partition_clients(splits.train.y, splits.num_classes, f.num_clients,
                                  kind=f.partition, alpha=f.alpha, seed=f.partition_seed)


def build_fedavg(config: ml_collections.ConfigDict, splits: data.Splits,
                 rng: jax.Array) -> base.Plan:
    """One phase: the rounds, the server's model evaluated as the reported student."""
    f = config.federated
    partition = client_partition(config, splits)
    loop = FedAvg(
        model=students.build_student(config.student, splits.num_classes),
        tx=optimizers.make_inner_optimizer(config.optimizer, f.local_steps),
        partition=partition, clients_per_round=f.clients_per_round,
        local_steps=f.local_steps, batch_size=config.train.batch_size,
        steps_per_call=config.train.log_every, mesh=client_mesh(config))
    phase = base.Phase("", loop, base.student_schedule(config),
                       lambda finished: loop.init(rng, splits))

    def finish(finished, workdir, summary):
        del finished, summary
        with open(os.path.join(workdir, PARTITION_FILE), "w") as out:
            json.dump({"sizes": partition.sizes.tolist(),
                       "label_counts": partition.label_counts.tolist()}, out)
        return {"clients": partition.num_clients, "alpha": f.alpha,
                "partition": f.partition}

    return base.Plan((phase,), finish)


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.federated`` and that the clients split over ``config.mesh``."""
    f = config.federated
    base.check_fields([
        checks.integer("config.federated.num_clients", f.num_clients),
        checks.integer("config.federated.clients_per_round", f.clients_per_round,
                       maximum=f.num_clients, note=" (at most config.federated.num_clients)"),
        checks.integer("config.federated.local_steps", f.local_steps),
        checks.one_of("config.federated.partition", f.partition, data.PARTITIONS),
        checks.number("config.federated.alpha", f.alpha, above=0,
                      note=" (the Dirichlet concentration; smaller is more skewed)"),
        checks.integer("config.federated.partition_seed", f.partition_seed, minimum=0),
    ])
    if data.split_sizes(config.data)["train"] < f.num_clients:
        raise ConfigError(f"config.federated.num_clients ({f.num_clients}) exceeds the "
                          "train split's examples; lower it")
    client_mesh(config)


base.register(base.Method(
    name="fedavg",
    description="federated averaging: K of N clients train locally each round, the "
                "server averages them by size",
    example="configs/federated.py:mnist_5k",
    build=build_fedavg,
    sections=("federated",),
    validate=validate,
))
