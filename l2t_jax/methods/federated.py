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

``fedgen`` (Zhu, Hong & Zhou 2021) adds a server-side conditional generator
G(noise, y) -> latent feature of the width of the network's last hidden layer. Each
client adds a_r * CE(head(G(noise, y~)), y~) to its local cross-entropy, where head is its
own last Dense layer and y~ is drawn uniformly from the labels the round's clients hold;
a_r = max(a_min, a_0 * decay^r) (10, 0.98, 1e-4), and 0 in round 0, while G is untrained.
After local training the server trains G (Adam, 50 steps a round) so that the clients'
heads, each weighted by its share of label y among the round's clients, classify G's
output as y, plus FedGen's diversity term exp(-mean(d_noise * d_latent)); then it
averages the clients. FedGen's code also adds a latent KL term (each client's output on a
real example against its head on G(y) of the example's label): it is not in the paper
and is not kept here. The generator is a two-layer MLP without BatchNorm.

Each client draws its batches from its own endless stream of its examples
(`data.stream_indices`, seeded by ``[seed, client]``), advanced by E * B examples per
round whether or not it was sampled; the generated labels and noise of its FedGen term
are drawn from ``[seed, round, client]``: stateless, so a resumed run sees the same data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from l2t_jax import config_checks as checks
from l2t_jax import data, engine, mesh, optimizers, plots, students, teachers
from l2t_jax.errors import ConfigError
from l2t_jax.losses import cross_entropy_loss
from l2t_jax.methods import base, teaching

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
    generator: engine.PyTree = None
    generator_opt_state: engine.PyTree = None
    teacher: engine.PyTree = None
    teacher_opt_state: engine.PyTree = None


class Generator(nn.Module):
    """FedGen's conditional generator: (noise, label) -> a latent feature.

    Attributes:
        num_classes: C (labels are one-hot encoded).
        latent_dim: the width of the clients' last hidden layer.
        hidden: the hidden layer's width.
    """

    num_classes: int
    latent_dim: int
    hidden: int = 256

    @nn.compact
    def __call__(self, noise: jax.Array, labels: jax.Array) -> jax.Array:
        """(B, noise_dim), (B,) -> (B, latent_dim)."""
        h = jnp.concatenate([noise, jax.nn.one_hot(labels, self.num_classes, dtype=noise.dtype)],
                            axis=-1)
        return nn.Dense(self.latent_dim)(nn.relu(nn.Dense(self.hidden)(h)))


def diversity_loss(noise: jax.Array, latents: jax.Array) -> jax.Array:
    """FedGen's diversity term: exp(-mean_ij(d2(noise_i, noise_j) * d1(latent_i, latent_j)))
    with d2 the mean squared and d1 the mean absolute difference; lower when distinct
    noise gives distinct latents."""
    latent_distance = jnp.mean(jnp.abs(latents[:, None] - latents[None]), axis=-1)
    noise_distance = jnp.mean((noise[:, None] - noise[None]) ** 2, axis=-1)
    return jnp.exp(jnp.mean(-noise_distance * latent_distance))


def head_logits(params: engine.PyTree, latents: jax.Array, depth: int) -> jax.Array:
    """An MLP's read-out layer (`students.mlp.MLP`, `depth` hidden layers) on latents."""
    head = params[f"Dense_{depth}"]
    return latents @ head["kernel"] + head["bias"]


@dataclasses.dataclass(frozen=True)
class GeneratorTraining:
    """FedGen's server side and the weight of its term in the clients' loss.

    Attributes:
        module: the generator.
        tx: its optimizer (Adam).
        steps: its updates per round.
        batch_size: generated examples per update.
        noise_dim: the generator's noise width.
        diversity: the diversity term's weight (FedGen's eta).
        weight: a_r as a function of the round (an int32 scalar).
    """

    module: Generator
    tx: optax.GradientTransformation
    steps: int
    batch_size: int
    noise_dim: int
    diversity: float
    weight: Callable[[jax.Array], jax.Array]

    def init(self, rng: jax.Array) -> tuple[engine.PyTree, engine.PyTree]:
        params = self.module.init(rng, jnp.zeros((1, self.noise_dim)),
                                  jnp.zeros((1,), jnp.int32))["params"]
        return params, self.tx.init(params)

    def client_term(self, depth: int) -> engine.ParamsLossFn:
        """a_r * CE(head(G(noise, y~)), y~) on the batch's ``gen_noise``, ``gen_y``."""
        def term(meta_params, params, batch, state):
            del state
            latents = self.module.apply({"params": meta_params["generator"]},
                                        batch["gen_noise"], batch["gen_y"])
            logits = head_logits(params, latents, depth)
            return meta_params["weight"] * jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(logits, batch["gen_y"]))
        return term

    def train(self, params, opt_state, heads, label_weights, rng, depth: int):
        """`steps` Adam updates of the generator against the round's client heads.

        Args:
            params: the generator's parameters.
            opt_state: their optimizer state.
            heads: the K clients' parameters (stacked), whose read-out layers are used.
            label_weights: (K, C) each client's share of each label in the round.
            rng: PRNG key of the generated labels and noise.
            depth: the clients' hidden layers.

        Returns:
            ``(params, opt_state, metrics)``.
        """
        held = label_weights.sum(axis=0) > 0

        def loss_fn(generator, key):
            label_key, noise_key = jax.random.split(key)
            labels = jax.random.categorical(
                label_key, jnp.where(held, 0.0, -jnp.inf), shape=(self.batch_size,))
            noise = jax.random.normal(noise_key, (self.batch_size, self.noise_dim))
            latents = self.module.apply({"params": generator}, noise, labels)
            per_client = jax.vmap(lambda client: optax.softmax_cross_entropy_with_integer_labels(
                head_logits(client, latents, depth), labels))(heads)  # (K, B)
            weights = label_weights[:, labels]  # (K, B)
            teacher = jnp.mean(jnp.sum(weights * per_client, axis=0))
            diversity = diversity_loss(noise, latents)
            return teacher + self.diversity * diversity, (teacher, diversity)

        def update(carry, key):
            generator, state = carry
            (_, (teacher, diversity)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                generator, key)
            updates, state = self.tx.update(grads, state, generator)
            return (optax.apply_updates(generator, updates), state), (teacher, diversity)

        (params, opt_state), (teacher, diversity) = jax.lax.scan(
            update, (params, opt_state), jax.random.split(rng, self.steps))
        return params, opt_state, {"fedgen/generator_loss": teacher[-1],
                                   "fedgen/diversity": diversity[-1]}


@dataclasses.dataclass(frozen=True)
class FederatedRounds:
    """The rounds of federated averaging, with FedGen's generator or without
    (`base.EvaluatedLoop`).

    Attributes:
        model: the clients' (and server's) Flax network.
        tx: each client's local optimizer, fresh every round.
        partition: which train examples each client holds.
        clients_per_round: K.
        local_steps: E, local steps per client and round.
        batch_size: B, a client's local batch.
        steps_per_call: rounds per jitted call (the driver's log interval).
        mesh: the device mesh of the clients; None: one device.
        generator: FedGen's generator training; None: FedAvg.
        teacher: the loss teacher that scales FedGen's term each round from the round
            fraction (`teachers.WeightTeacher`, one weight ``"multiplier"``); None:
            the hand-set schedule.
        teacher_update: how the loss teacher learns (its objective reads ``"dev"``).
        total_rounds: the run's rounds (the teacher's feature is the round fraction).
    """

    model: nn.Module
    tx: optax.GradientTransformation
    partition: data.Partition
    clients_per_round: int
    local_steps: int
    batch_size: int
    steps_per_call: int
    mesh: Mesh | None = None
    generator: GeneratorTraining | None = None
    teacher: teachers.WeightTeacher | None = None
    teacher_update: teaching.TeacherUpdate | None = None
    total_rounds: int = 1

    def init(self, rng: jax.Array, splits: data.Splits) -> ServerState:
        """The server's initial model and generator (replicated on the mesh)."""
        model_rng, generator_rng = jax.random.split(rng)
        student = engine.init_student_state(self.model, self.tx, model_rng,
                                            splits.train.x[:1])
        state = ServerState(student.params, student.model_state, student.rng,
                            jnp.zeros((), jnp.int32))
        if self.generator is not None:
            generator, opt_state = self.generator.init(generator_rng)
            state = state.replace(generator=generator, generator_opt_state=opt_state)
        if self.teacher is not None:
            teacher = self.teacher.init(None)
            state = state.replace(teacher=teacher,
                                  teacher_opt_state=self.teacher_update.tx.init(teacher))
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
            of round r is its k-th sampled client, whose size share is its weight. With
            a generator also the clients' generated ``gen_y`` (K, R * E, B) and
            ``gen_noise`` (K, R * E, B, noise_dim) and the round's ``label_weights``
            (R, K, C): each client's share of each label. On a mesh the client arrays
            are global arrays laid out by `mesh.batch_sharding`, each host having built
            only its clients' part of its examples.
        """
        rounds = range(start_step, start_step + self.steps_per_call)
        sampled = np.stack([self.sampled_clients(seed, r) for r in rounds])  # (R, K)
        slots = slice(None)
        examples = slice(None)
        if self.mesh is not None:
            slots = mesh.host_population_slice(self.mesh, self.clients_per_round)
            examples = mesh.host_batch_slice(self.mesh, self.batch_size)
        local = [[self.client_batches(splits, seed, r, int(client)) for client in clients[slots]]
                 for r, clients in zip(rounds, sampled)]
        # (R, K_host, E, B, ...) -> (K_host, R * E, B_host, ...)
        local = {key: np.stack([np.stack([own[key] for own in slots_of_round])
                                for slots_of_round in local]) for key in local[0][0]}
        local = {k: np.swapaxes(v, 0, 1)[:, :, :, examples] for k, v in local.items()}
        local = {k: v.reshape(v.shape[0], -1, *v.shape[3:]) for k, v in local.items()}
        per_round = [self.round_weights(clients) for clients in sampled]
        shared = {k: np.stack([w[k] for w in per_round]) for k in per_round[0]}
        if self.mesh is not None:
            local = mesh.global_batches(self.mesh, local,
                                        population_size=self.clients_per_round,
                                        batch_size=self.batch_size)
        if self.teacher is not None:
            shared["dev"] = {"x": splits.meta_dev.x, "y": splits.meta_dev.y}
        return {**local, **shared}

    def client_batches(self, splits: data.Splits, seed: int, round_index: int,
                       client: int) -> dict:
        """What client `client` trains on in round `round_index`: ``x`` (E, B, ...) and
        ``y`` (E, B) from its own stream, and with a generator its FedGen term's labels
        ``gen_y`` (E, B), drawn uniformly from the labels the round's clients hold, and
        noise ``gen_noise`` (E, B, noise_dim). A client computes them alone (Flower)."""
        own = self.partition.indices[client]
        per_round = self.local_steps * self.batch_size
        index = own[data.stream_indices(len(own), (seed, client), round_index * per_round,
                                        per_round)].reshape(self.local_steps, self.batch_size)
        batches = {"x": splits.train.x[index], "y": splits.train.y[index]}
        if self.generator is not None:
            clients = self.sampled_clients(seed, round_index)
            held = np.flatnonzero(self.partition.label_counts[clients].sum(axis=0))
            rng = np.random.default_rng([seed, round_index, client])
            batches["gen_y"] = rng.choice(held, index.shape).astype(np.int32)
            batches["gen_noise"] = rng.standard_normal(
                (*index.shape, self.generator.noise_dim), np.float32)
        return batches

    def outer_step(self, state: ServerState, batches: dict):
        """`steps_per_call` rounds of local training and weighted averaging."""
        num_clients = self.clients_per_round
        client_keys = [k for k in ("x", "y", "gen_y", "gen_noise") if k in batches]
        shared_keys = [k for k in ("weights", "label_weights") if k in batches]

        def per_round(a):  # (K, R * E, B, ...) -> (R, K, E, B, ...)
            a = a.reshape(num_clients, self.steps_per_call, self.local_steps, *a.shape[2:])
            return jnp.moveaxis(a, 1, 0)

        inputs = ({k: per_round(batches[k]) for k in client_keys},
                  {k: batches[k] for k in shared_keys})

        def one_round(server: ServerState, round_inputs):
            client_batches, shared = round_inputs
            if self.mesh is not None:
                client_batches = jax.lax.with_sharding_constraint(
                    client_batches, mesh.batch_sharding(self.mesh))
            rng, client_rngs, generator_rng = self.round_keys(server)
            metrics = {}
            if self.teacher is None:
                weight = None if self.generator is None else self.term_weight(server)
                new_server, clients, round_metrics = self.train_clients(
                    server, weight, client_batches, shared["weights"], client_rngs)
            else:
                new_server, clients, round_metrics, metrics = self.taught_round(
                    server, client_batches, shared["weights"], client_rngs, batches["dev"])
            metrics.update(jax.tree_util.tree_map(jnp.mean, round_metrics))
            new_server, generator_metrics = self.finish_round(
                server, new_server, clients.params, shared.get("label_weights"),
                generator_rng, rng)
            return new_server, {**metrics, **generator_metrics}

        return jax.lax.scan(one_round, state, inputs)

    def round_keys(self, server: ServerState) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(next server key, the clients' keys (K, 2), the generator's key)`` of the
        round that starts at `server`."""
        rng, round_rng, generator_rng = jax.random.split(server.rng, 3)
        return rng, jax.random.split(round_rng, self.clients_per_round), generator_rng

    def averaged(self, server: ServerState, client_params, client_model_state,
                 weights: jax.Array) -> ServerState:
        """The server after the round's local training: the clients' (stacked) parameters
        and model state averaged with `weights` (K,), its round counter advanced."""
        def average(stacked):
            return jnp.tensordot(weights.astype(stacked.dtype), stacked, axes=1)

        return server.replace(params=jax.tree_util.tree_map(average, client_params),
                              model_state=jax.tree_util.tree_map(average, client_model_state),
                              round=server.round + 1)

    def round_weights(self, sampled: np.ndarray) -> dict:
        """The server's weights of a round's clients `sampled` (K,): ``weights`` (K,),
        each client's share of their examples, and with a generator ``label_weights``
        (K, C), each client's share of each label among them."""
        sizes = self.partition.sizes[sampled].astype(np.float32)
        weights = {"weights": sizes / sizes.sum()}
        if self.generator is not None:
            counts = self.partition.label_counts[sampled].astype(np.float32)
            weights["label_weights"] = counts / np.maximum(counts.sum(axis=0), 1)
        return weights

    def finish_round(self, server: ServerState, averaged: ServerState, client_params,
                     label_weights: jax.Array | None, generator_rng: jax.Array,
                     rng: jax.Array) -> tuple[ServerState, dict]:
        """The round's end on the server: its next key and, with a generator, FedGen's
        generator trained on the round's clients' heads (`client_params`, stacked)."""
        averaged = averaged.replace(rng=rng)
        if self.generator is None:
            return averaged, {}
        generator, opt_state, metrics = self.generator.train(
            server.generator, server.generator_opt_state, client_params, label_weights,
            generator_rng, len(self.model.hidden))
        return averaged.replace(generator=generator, generator_opt_state=opt_state), metrics

    def term_weight(self, server: ServerState, multiplier: jax.Array = 1.0) -> jax.Array:
        """a_r of the FedGen term in round ``server.round``, times `multiplier`; 0 in
        round 0 (the generator is untrained)."""
        weight = multiplier * self.generator.weight(server.round)
        return jnp.where(server.round > 0, weight, 0.0)

    def train_clients(self, server: ServerState, weight: jax.Array | None,
                      client_batches: dict, weights: jax.Array, client_rngs: jax.Array):
        """One round's local training of the K clients and their weighted average.

        Args:
            server: the server's state at the round's start.
            weight: the FedGen term's weight; None without a generator.
            client_batches: the clients' batches, (K, E, B, ...).
            weights: (K,) the clients' size shares.
            client_rngs: (K, 2) the clients' PRNG keys (`round_keys`).

        Returns:
            ``(server, clients, metrics)``: the server with the averaged model, the
            trained clients (stacked) and their metrics (K, E); differentiable in
            `weight`.
        """
        meta_params = None
        if self.generator is not None:
            meta_params = {"generator": server.generator, "weight": weight}

        def local_training(client_rng, own_batches):
            return self.local_training(server, meta_params, client_rng, own_batches)

        clients, metrics = jax.vmap(local_training)(client_rngs, client_batches)
        server = self.averaged(server, clients.params, clients.model_state, weights)
        if weight is not None:
            metrics = {**metrics, "fedgen/weight": jnp.broadcast_to(
                weight, (self.clients_per_round, self.local_steps))}
        return server, clients, metrics

    def local_training(self, server: ServerState, meta_params, client_rng: jax.Array,
                       own_batches: dict) -> tuple[engine.StudentState, dict]:
        """One client's E local steps from the server's model (`client_batches`).

        Args:
            server: the server's state (its model; its generator, if any).
            meta_params: ``{"generator", "weight"}`` of the FedGen term; None without.
            client_rng: the client's PRNG key for the round.
            own_batches: its batches, (E, B, ...).

        Returns:
            ``(client, metrics)``: the trained client and its per-step metrics.
        """
        params_loss_fn = None
        if self.generator is not None:
            params_loss_fn = self.generator.client_term(len(self.model.hidden))
        step_fn = engine.make_student_step(self.model, cross_entropy_loss, self.tx,
                                           params_loss_fn=params_loss_fn)
        client = engine.StudentState.create(server.params, client_rng, tx=self.tx,
                                            model_state=server.model_state)
        return engine.unroll(step_fn, meta_params, client, own_batches)

    def round_objective(self, teacher_params, server: ServerState, client_batches: dict,
                        weights: jax.Array, client_rngs: jax.Array, dev: dict):
        """The server's dev objective after one round under the loss teacher's weight.

        Returns:
            ``(value, (server, clients, metrics, aux))``, for `jax.value_and_grad` in
            `teacher_params`: exact through the K clients' E local steps and the
            average.
        """
        new_server, clients, metrics = self.train_clients(
            server, self.taught_weight(teacher_params, server), client_batches, weights,
            client_rngs)
        value, aux = self.server_objective(new_server, dev)
        return value, (new_server, clients, metrics, aux)

    def taught_weight(self, teacher_params, server: ServerState) -> jax.Array:
        """The FedGen term's weight in round ``server.round`` under the loss teacher: a_r
        times its multiplier at the round fraction."""
        features = jnp.stack([server.round / self.total_rounds]).astype(jnp.float32)
        multiplier = self.teacher.weights(teacher_params, features)["multiplier"]
        return self.term_weight(server, multiplier)

    def server_objective(self, server: ServerState, dev: dict):
        """``(value, aux)``: the loss teacher's objective of the server's model on the
        dev arrays (`TeacherUpdate.dev_objective_fn`)."""
        return self.teacher_update.dev_objective_fn(self.model, dev)(None, self.student(server))

    def taught_round(self, server: ServerState, client_batches: dict, weights: jax.Array,
                     client_rngs: jax.Array, dev: dict):
        """A round whose FedGen weight the loss teacher sets, and the teacher's update
        by the exact meta-gradient of the round's dev objective (`round_objective`)."""
        (value, (new_server, clients, metrics, aux)), grad = jax.value_and_grad(
            self.round_objective, has_aux=True)(server.teacher, server, client_batches,
                                                weights, client_rngs, dev)
        teacher, opt_state, meta_metrics = self.teacher_update.apply(
            server.teacher, server.teacher_opt_state,
            engine.MetaGradient(value, grad, None, {}, aux))
        new_server = new_server.replace(teacher=teacher, teacher_opt_state=opt_state)
        return new_server, clients, metrics, meta_metrics

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


def generator_training(config: ml_collections.ConfigDict, num_classes: int,
                       latent_dim: int) -> GeneratorTraining:
    """FedGen's generator and client-term weight, from ``config.fedgen``."""
    g = config.fedgen

    def weight(round_index):
        return jnp.maximum(g.weight_min, g.weight_init * g.weight_decay ** round_index)

    return GeneratorTraining(
        module=Generator(num_classes, latent_dim, g.hidden),
        tx=optax.adam(g.learning_rate), steps=g.steps, batch_size=g.batch_size,
        noise_dim=g.noise_dim, diversity=g.diversity, weight=weight)


def build_rounds(config: ml_collections.ConfigDict, splits: data.Splits, rng: jax.Array,
                 generator: GeneratorTraining | None = None, **fields) -> base.Plan:
    """One phase: the rounds, the server's model evaluated as the reported student.

    Args:
        config: the experiment config.
        splits: the data.
        rng: the run's PRNG key.
        generator: FedGen's generator; None: FedAvg.
        **fields: further `FederatedRounds` fields (the loss teacher).
    """
    f = config.federated
    partition = client_partition(config, splits)
    loop = FederatedRounds(
        model=students.build_student(config.student, splits.num_classes),
        tx=optimizers.make_inner_optimizer(config.optimizer, f.local_steps),
        partition=partition, clients_per_round=f.clients_per_round,
        local_steps=f.local_steps, batch_size=config.train.batch_size,
        steps_per_call=config.train.log_every, mesh=client_mesh(config), generator=generator,
        total_rounds=config.train.num_steps, **fields)
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


def build_fedgen(config: ml_collections.ConfigDict, splits: data.Splits,
                 rng: jax.Array) -> base.Plan:
    """FedAvg's rounds with FedGen's generator."""
    generator = generator_training(config, splits.num_classes, config.student.hidden[-1])
    return build_rounds(config, splits, rng, generator)


def build_taught(config: ml_collections.ConfigDict, splits: data.Splits,
                 rng: jax.Array) -> base.Plan:
    """FedGen's rounds with a loss teacher scaling the generator term's weight."""
    generator = generator_training(config, splits.num_classes, config.student.hidden[-1])
    # The weight scales FedGen's term inside the round: no loss family of its own.
    teacher = teachers.WeightTeacher(
        family=None, names=("multiplier",), initial=(1.0,),
        bounds=(tuple(config.teacher.multiplier_range),), num_classes=splits.num_classes,
        num_features=1)
    return build_rounds(config, splits, rng, generator, teacher=teacher,
                        teacher_update=teaching.teacher_update(config, "teacher"))


def draw_clients(config: ml_collections.ConfigDict, workdir: str, records: list[dict],
                 summary: dict) -> list[str]:
    """``clients.png``: every client's examples by label (the run's partition)."""
    del config, records
    source = os.path.join(workdir, PARTITION_FILE)
    if not os.path.exists(source):
        return []
    with open(source) as f:
        counts = np.asarray(json.load(f)["label_counts"])
    path = os.path.join(workdir, "clients.png")
    plots.plot_clients(counts, path, plots.run_title(summary) if summary else "clients")
    return [path]


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


def validate_fedgen(config: ml_collections.ConfigDict) -> None:
    """`validate`, then ``config.fedgen`` and a student whose last layer FedGen feeds."""
    validate(config)
    if config.student.name != "mlp":
        raise ConfigError(f"fedgen's generator feeds an MLP's read-out layer; set "
                          f"config.student.name=mlp (got {config.student.name!r})")
    g = config.fedgen
    base.check_fields([
        *(checks.integer(f"config.fedgen.{field}", g[field])
          for field in ("hidden", "noise_dim", "steps", "batch_size")),
        checks.number("config.fedgen.learning_rate", g.learning_rate, above=0),
        checks.number("config.fedgen.diversity", g.diversity, at_least=0),
        checks.number("config.fedgen.weight_init", g.weight_init, at_least=0),
        checks.number("config.fedgen.weight_decay", g.weight_decay, above=0, at_most=1),
        checks.number("config.fedgen.weight_min", g.weight_min, at_least=0),
    ])


def validate_taught(config: ml_collections.ConfigDict) -> None:
    """`validate_fedgen`, then the loss teacher's section."""
    validate_fedgen(config)
    low, high = config.teacher.multiplier_range
    base.check_fields([
        *teaching.teacher_update_checks(config, "teacher"),
        (0 <= low < 1 < high, "config.teacher.multiplier_range must be (low, high) with "
                              f"0 <= low < 1 < high (1: FedGen's schedule), got {(low, high)}"),
    ])


base.register(
    base.Method(
        name="fedavg",
        description="federated averaging: K of N clients train locally each round, the "
                    "server averages them by size",
        example="configs/federated.py:mnist_5k",
        build=build_rounds,
        sections=("federated",),
        validate=validate,
        draw=draw_clients,
    ),
    base.Method(
        name="fedgen",
        description="FedAvg plus FedGen's server-side generator of latent features, "
                    "a term of every client's loss",
        example="configs/federated.py:mnist_5k",
        build=build_fedgen,
        sections=("federated", "fedgen"),
        validate=validate_fedgen,
        draw=draw_clients,
    ),
    base.Method(
        name="l2t-fedgen",
        description="FedGen with its term's weight scaled each round by a loss teacher, "
                    "trained by exact meta-gradients through the round",
        example="configs/federated.py:mnist_5k",
        build=build_taught,
        sections=("federated", "fedgen", "teacher"),
        validate=validate_taught,
        draw=draw_clients,
    ),
)
