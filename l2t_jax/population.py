"""Student populations: P students trained under one teacher in one vmapped program.

A *population* is P students of one architecture (different initialisations, data
orders, augmentation and dropout keys) trained under the same teacher. Their states and
batches are stacked along a leading P axis, and `PopulationEstimator` wraps any engine
estimator in one `jax.vmap` so the teacher gets the population-averaged meta-gradient:

    estimator = PopulationEstimator(engine.FullBackprop())
    result = estimator(step_fn, objective, meta_params, states, batches)  # grad averaged

On a device mesh (`l2t_jax.mesh`) the population lies on the ``"population"`` axis and
the batch of every inner step on the ``"data"`` axis; `jit_population_meta_gradient`
jits the estimator with those shardings and XLA's GSPMD partitioner inserts the
collectives. The same program runs on 1 device and on N, with the same numbers up to
the order of floating-point sums.

Methods hold a `Population` (size and mesh, from ``config.*.population_size`` and
``config.mesh``) that gives them their students, batches and estimator, so one code path
serves a single student (nothing stacked) and a population.

Architectures must match across a population: `jax.vmap` needs every student's
parameters to have the same shapes. Students of different widths or depths are separate
populations (separate calls), whose meta-gradients a method may average itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from l2t_jax import data, engine
from l2t_jax.mesh import (
    POPULATION_AXIS,
    STACKED_BATCH_AXIS,
    batch_sharding,
    check_population_shapes,
    data_parallel_step,
    global_batches,
    host_batch_slice,
    host_population_slice,
    population_sharding,
    replicated,
)

PyTree = Any

def init_population(
    model: nn.Module,
    tx: optax.GradientTransformation,
    rngs: jax.Array,
    sample_x: jax.Array,
    stats: PyTree | None = None,
) -> engine.StudentState:
    """Initialises P students of one architecture, stacked along a leading axis.

    Args:
        model: the Flax student (shared by every member).
        tx: the inner optimizer.
        rngs: P PRNG keys, (P, 2) (or (P,) typed keys); member i is
            `engine.init_student_state(model, tx, rngs[i], sample_x, stats)`.
        sample_x: one input batch fixing the input shape.
        stats: initial running statistics, the same for every member.

    Returns:
        A `StudentState` whose every leaf has a leading P axis.
    """
    return jax.vmap(lambda rng: engine.init_student_state(model, tx, rng, sample_x, stats))(
        rngs
    )


def population_batches(
    split: data.ArraySplit,
    seeds: Sequence[int],
    *,
    start_step: int,
    num_steps: int,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """The training batches of steps `start_step ..` for one student per data-order seed.

    Args:
        split: the split to draw from (usually `Splits.train`).
        seeds: one data-order seed per member (see `data.stacked_batches`); on a
            multi-host run, only this host's members (`host_population_slice`).
        start_step: first global step.
        num_steps: T.
        batch_size: B.

    Returns:
        ``{"x": (P, T, B, ...), "y": (P, T, B)}`` numpy arrays, P = len(seeds).
    """
    per_member = [
        data.stacked_batches(
            split, seed=seed, start_step=start_step, num_steps=num_steps, batch_size=batch_size
        )
        for seed in seeds
    ]
    return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *per_member)


def average_population(result: engine.MetaGradient) -> engine.MetaGradient:
    """Averages the value and gradient of a stacked per-student result over its P axis.

    Args:
        result: a `MetaGradient` whose every leaf has a leading P axis (as from
            `PopulationEstimator.per_student`).

    Returns:
        The same with ``value`` and ``grad`` averaged over P; ``state``, ``metrics``
        (P, T) and ``aux`` stay stacked per student.
    """
    return result._replace(
        value=jnp.mean(result.value, axis=0),
        grad=jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), result.grad),
    )


@dataclasses.dataclass(frozen=True)
class PopulationEstimator:
    """The meta-gradient averaged over a population of students, in one vmapped program.

    An `engine.Estimator` in which ``state`` and ``batches`` are stacked along a
    leading P axis (one student each) and ``meta_params`` is shared: the teacher
    gradient is the mean of the P students' meta-gradients, i.e. the gradient of the
    mean objective. Each student runs exactly as under the wrapped estimator alone.

    Attributes:
        estimator: the per-student estimator (`engine.FullBackprop`,
            `engine.TruncatedBackprop`, ...).
        shared_batches: all members read the same batches (T, B, ...) instead of their
            own (P, T, B, ...); then only initialisation and rng keys differ.
        mesh: set (by `jit_population_meta_gradient`) to pin the layout under `jax.jit`
            on a mesh with `MESH_AXES`: the vmapped axis is the mesh's population axis
            and the examples of every inner batch are constrained to its data axis.
            None: no constraint (one device, or let XLA choose).
    """

    estimator: engine.Estimator
    shared_batches: bool = False
    mesh: Mesh | None = None

    def per_student(
        self,
        step_fn: engine.StepFn,
        objective: engine.Objective,
        meta_params: PyTree,
        state: engine.StudentState,
        batches: PyTree,
    ) -> engine.MetaGradient:
        """Every student's own meta-gradient, stacked (nothing averaged).

        Args and returns as `__call__`, except that ``value`` is (P,) and every ``grad``
        leaf has a leading P axis (for `grad_variance`; `average_population` then gives
        what `__call__` returns).
        """
        if self.mesh is not None:
            step_fn = data_parallel_step(step_fn, self.mesh)

        def one(student, student_batches):
            return self.estimator(step_fn, objective, meta_params, student, student_batches)

        return jax.vmap(
            one,
            in_axes=(0, None if self.shared_batches else 0),
            spmd_axis_name=None if self.mesh is None else POPULATION_AXIS,
        )(state, batches)

    def __call__(
        self,
        step_fn: engine.StepFn,
        objective: engine.Objective,
        meta_params: PyTree,
        state: engine.StudentState,
        batches: PyTree,
    ) -> engine.MetaGradient:
        """The population-averaged meta-gradient.

        Args:
            step_fn: the per-student inner step (see `engine.make_student_step`).
            objective: the per-student ``objective(meta_params, final_state)``.
            meta_params: the teacher's parameters, shared by all members.
            state: the students, every leaf stacked along a leading P axis.
            batches: per-student batches, leaves (P, T, B, ...) (or (T, B, ...) with
                `shared_batches`).

        Returns:
            A `MetaGradient` with ``value`` and ``grad`` averaged over the P students,
            and ``state``, ``metrics`` (P, T) and ``aux`` stacked per student.
        """
        return average_population(
            self.per_student(step_fn, objective, meta_params, state, batches)
        )


def jit_population_meta_gradient(
    estimator: PopulationEstimator,
    step_fn: engine.StepFn,
    objective: engine.Objective,
    mesh: Mesh,
    *,
    donate_state: bool = False,
) -> Callable[[PyTree, engine.StudentState, PyTree], engine.MetaGradient]:
    """Jits a population meta-gradient with the mesh's shardings.

    In: ``meta_params`` replicated, ``state`` on ``"population"``, ``batches`` on
    ``"population"`` and ``"data"`` (`batch_sharding`). Out: ``value`` and ``grad``
    replicated, ``state``, ``metrics`` and ``aux`` on ``"population"``. Inputs laid out
    otherwise (numpy arrays, a state restored onto one device) are moved on call.

    Args:
        estimator: the population estimator; its `mesh` is set to `mesh`.
        step_fn: the per-student inner step.
        objective: the per-student objective; arrays it closes over are replicated.
        mesh: from `make_mesh`.
        donate_state: donate the input states' buffers (the caller replaces them with
            ``result.state``).

    Returns:
        ``fn(meta_params, state, batches) -> MetaGradient`` (population-averaged), with
        ``fn.lower(...)`` as for a jitted function (e.g. to read the compiled HLO).

    Raises:
        ConfigError: (on call) P or B does not split evenly over the mesh.
    """
    estimator = dataclasses.replace(estimator, mesh=mesh)
    students = population_sharding(mesh)
    batch_axis = STACKED_BATCH_AXIS - 1 if estimator.shared_batches else STACKED_BATCH_AXIS

    def meta_gradient(meta_params, state, batches):
        return estimator(step_fn, objective, meta_params, state, batches)

    out_shardings = engine.MetaGradient(
        value=replicated(mesh), grad=replicated(mesh), state=students, metrics=students,
        aux=students,
    )
    in_shardings = (replicated(mesh), students, batch_sharding(mesh, estimator.shared_batches))
    jitted = jax.jit(
        meta_gradient,
        in_shardings=in_shardings,
        out_shardings=out_shardings,
        donate_argnums=(1,) if donate_state else (),
    )

    def check(state, batches):
        # Before jit: its own error for an indivisible sharding does not name the config.
        population_size = jax.tree_util.tree_leaves(state)[0].shape[0]
        batch_size = jax.tree_util.tree_leaves(batches)[0].shape[batch_axis]
        check_population_shapes(mesh, population_size, batch_size)

    def call(meta_params, state, batches):
        check(state, batches)
        # jit rejects arrays committed to another layout (e.g. restored onto one
        # device); device_put moves them, and is free for arrays already in place.
        return jitted(*jax.device_put((meta_params, state, batches), in_shardings))

    def lower(meta_params, state, batches):
        check(state, batches)
        return jitted.lower(meta_params, state, batches)

    call.lower = lower
    return call


def member_seeds(seed: int, population_size: int) -> list[int]:
    """One data-order seed per member: member 0 keeps `seed`, the others derive from it.

    Member 0 therefore sees the batches a single student run with `seed` sees; member
    i > 0 draws from ``SeedSequence([seed, i])``, so populations of different runs do
    not share orders (``seed + i`` would: run 0's member 1 would be run 1's member 0).

    Args:
        seed: the run's data-order seed.
        population_size: P.

    Returns:
        P integer seeds.
    """
    derived = [int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
               for i in range(1, population_size)]
    return [seed, *derived]


def member_rngs(rng: jax.Array, population_size: int) -> jax.Array:
    """One PRNG key per member: member 0 keeps `rng`, member i gets ``fold_in(rng, i)``.

    Args:
        rng: a PRNG key (may be traced).
        population_size: P.

    Returns:
        (P, 2) keys, for `init_population`.
    """
    return jnp.stack([rng] + [jax.random.fold_in(rng, i) for i in range(1, population_size)])


@dataclasses.dataclass(frozen=True)
class Population:
    """How many students a method trains under one teacher, and on which mesh.

    A method holds one and asks it for its students, batches and estimator, so the
    single-student path (``size=1``, no mesh: nothing stacked) and the population path
    are one piece of code. Stacked, every student leaf and training-batch leaf has a
    leading P axis; member 0 is the student a single run with the same rng and seed
    would start from (`member_rngs`, `member_seeds`).

    Attributes:
        size: P, students per teacher update.
        mesh: from `make_mesh`; None: one device. With a mesh the students are stacked
            even when P = 1 (the data axis may still split each batch).
    """

    size: int = 1
    mesh: Mesh | None = None

    @property
    def stacked(self) -> bool:
        """Whether states and batches carry the leading P axis."""
        return self.size > 1 or self.mesh is not None

    def estimator(self, estimator: engine.Estimator) -> engine.Estimator:
        """`estimator` itself, or `PopulationEstimator` around it (on the mesh)."""
        return PopulationEstimator(estimator, mesh=self.mesh) if self.stacked else estimator

    def vmap(self, fn: Callable) -> Callable:
        """`fn` over one student, mapped over the members when stacked."""
        return jax.vmap(fn) if self.stacked else fn

    def init_students(
        self,
        model: nn.Module,
        tx: optax.GradientTransformation,
        rng: jax.Array,
        sample_x: jax.Array,
        stats: PyTree | None = None,
    ) -> engine.StudentState:
        """The students: `engine.init_student_state` or `init_population` (`member_rngs`)."""
        if not self.stacked:
            return engine.init_student_state(model, tx, rng, sample_x, stats)
        return init_population(model, tx, member_rngs(rng, self.size), sample_x, stats)

    def batches(
        self, split: data.ArraySplit, seed: int, *, start_step: int, num_steps: int,
        batch_size: int,
    ) -> PyTree:
        """The training batches: (T, B, ...), or stacked (P, T, B, ...) per `member_seeds`.

        On a mesh each host builds only its members' share of its examples and the
        result is a global array laid out by `batch_sharding` (`global_batches`).
        """
        if not self.stacked:
            return data.stacked_batches(split, seed=seed, start_step=start_step,
                                        num_steps=num_steps, batch_size=batch_size)
        seeds = member_seeds(seed, self.size)
        if self.mesh is None:
            return population_batches(split, seeds, start_step=start_step,
                                      num_steps=num_steps, batch_size=batch_size)
        local = population_batches(split, seeds[host_population_slice(self.mesh, self.size)],
                                   start_step=start_step, num_steps=num_steps,
                                   batch_size=batch_size)
        examples = host_batch_slice(self.mesh, batch_size)
        local = jax.tree_util.tree_map(lambda a: a[:, :, examples], local)
        return global_batches(self.mesh, local, population_size=self.size,
                              batch_size=batch_size)

    def first(self, tree: PyTree) -> PyTree:
        """Member 0 of stacked students (the one a method reports); `tree` otherwise."""
        return jax.tree_util.tree_map(lambda a: a[0], tree) if self.stacked else tree

    def place(self, students: PyTree, shared: PyTree) -> tuple[PyTree, PyTree]:
        """Puts a method's initial state on the mesh (outside jit); a no-op without one.

        The students go on ``"population"``, everything else is replicated, so that
        the jitted outer step and a checkpoint restored into this template agree on
        the devices.

        Args:
            students: the stacked students.
            shared: the rest of the state (teacher, optimizer state, ...).

        Returns:
            ``(students, shared)`` as placed.
        """
        if self.mesh is None:
            return students, shared
        return (jax.device_put(students, population_sharding(self.mesh)),
                jax.device_put(shared, replicated(self.mesh)))


# The default of every method: one student, one device, nothing stacked.
SINGLE_STUDENT = Population()
