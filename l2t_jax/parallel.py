"""Student populations and SPMD meta-training: population estimator, mesh, shardings, hosts.

A *population* is P students of one architecture (different initialisations, data
orders, augmentation and dropout keys) trained under the same teacher. Their states and
batches are stacked along a leading P axis, and `PopulationEstimator` wraps any engine
estimator in one `jax.vmap` so the teacher gets the population-averaged meta-gradient:

    estimator = PopulationEstimator(engine.FullBackprop())
    result = estimator(step_fn, objective, meta_params, states, batches)  # grad averaged

Multi-device runs put the population on the ``"population"`` axis of a 2-D `Mesh` and the
batch of every inner step on the ``"data"`` axis; `jit_population_meta_gradient` jits
the estimator with those `NamedSharding`s and XLA's GSPMD partitioner inserts the
collectives (the per-step student gradient is summed over ``"data"``, the meta-gradient
averaged over ``"population"``). The teacher's parameters are replicated. The same
program runs on 1 device (a 1 x 1 mesh) and on N, with the same numbers up to the
order of floating-point sums.

Multi-host runs call `initialize_distributed` first; each host then builds only its own
part of the input (`host_population_slice`, `host_batch_slice`) and `global_batches`
assembles the global arrays from the hosts' parts.

Methods hold a `Population` (size and mesh, from ``config.*.population_size`` and
``config.mesh``) that gives them their students, batches and estimator, so one code path
serves a single student (nothing stacked) and a population.

Architectures must match across a population: `jax.vmap` needs every student's
parameters to have the same shapes. Students of different widths or depths are separate
populations (separate calls), whose meta-gradients a method may average itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from l2t_jax import data, engine
from l2t_jax.errors import ConfigError

PyTree = Any

POPULATION_AXIS = "population"
DATA_AXIS = "data"
MESH_AXES = (POPULATION_AXIS, DATA_AXIS)
# The axis of a stacked per-student batch leaf (P, T, B, ...) that holds the examples.
_STACKED_BATCH_AXIS = 2


# --------------------------------------------------------------------------- population


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


def grad_variance(grads: PyTree) -> jax.Array:
    """Total variance of per-student meta-gradients: E ||g_i - mean g||^2 (unbiased).

    The population average of P independent students has total variance this / P: the
    quantity to report when asking whether a population reduces meta-gradient noise.

    Args:
        grads: a gradient pytree whose leaves have a leading P axis, P >= 2.

    Returns:
        Scalar: the sum over coordinates of the across-student variance (ddof=1).
    """
    leaves = jax.tree_util.tree_leaves(grads)
    if leaves[0].shape[0] < 2:
        raise ValueError(f"grad_variance needs P >= 2 students, got {leaves[0].shape[0]}")
    return sum(jnp.sum(jnp.var(g, axis=0, ddof=1)) for g in leaves)


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


# --------------------------------------------------------------------------- mesh


def mesh_shape(spec: Mapping[str, int] | None, num_devices: int) -> tuple[int, int]:
    """The (population, data) sizes a mesh spec asks for on `num_devices` devices.

    Args:
        spec: ``{"population": n, "data": m}`` (a dict or ConfigDict, e.g.
            ``config.mesh``); a size of -1 means "the remaining devices"; a missing
            data axis is 1, a missing population axis is -1 (1 if data is -1). None:
            ``{}``, every device on the population axis.
        num_devices: how many devices the mesh must use, all of them.

    Returns:
        ``(population_size, data_size)`` with product `num_devices`.

    Raises:
        ConfigError: an unknown axis, a size that is not a positive integer or -1, two
            -1s, or sizes that do not factor `num_devices`.
    """
    spec = dict(spec.items()) if spec is not None else {}
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ConfigError(
            f"unknown mesh axis {unknown[0]!r} in config.mesh; the axes are "
            f"{', '.join(MESH_AXES)}"
        )
    data_size = spec.get(DATA_AXIS, 1)
    sizes = {
        POPULATION_AXIS: spec.get(POPULATION_AXIS, 1 if data_size == -1 else -1),
        DATA_AXIS: data_size,
    }
    for axis, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or (
            size < 1 and size != -1
        ):
            raise ConfigError(
                f"config.mesh.{axis} must be a positive integer or -1 (the rest), got {size!r}"
            )
    described = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(
            f"at most one of config.mesh.population, config.mesh.data may be -1 ({described})"
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"config.mesh {described} does not fit {num_devices} devices: "
                f"{num_devices} is not a multiple of {fixed}; choose fixed sizes whose "
                f"product divides {num_devices}"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"config.mesh {described} needs {fixed} devices but {num_devices} are given; "
            "set one axis to -1 to use all devices"
        )
    return int(sizes[POPULATION_AXIS]), int(sizes[DATA_AXIS])


def make_mesh(
    spec: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A 2-D mesh with axes ``("population", "data")`` over all of `devices`.

    Args:
        spec: axis sizes, see `mesh_shape` (default: every device on the population
            axis).
        devices: the devices to use (default `jax.devices()`: every device of every
            host); `jax.make_mesh` orders them for the hardware topology.

    Returns:
        The mesh, with `AxisType.Auto` axes (GSPMD propagates shardings).

    Raises:
        ConfigError: see `mesh_shape`.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(spec, len(devices))
    return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (teacher parameters, averaged results)."""
    return NamedSharding(mesh, P())


def population_sharding(mesh: Mesh) -> NamedSharding:
    """Leading P axis on ``"population"``: stacked student states, per-student outputs.

    A pytree prefix: pass it for a whole stacked state (every leaf has the P axis).
    """
    return NamedSharding(mesh, P(POPULATION_AXIS))


def batch_sharding(mesh: Mesh, shared: bool = False) -> NamedSharding:
    """Stacked batches (P, T, B, ...): P on ``"population"``, the examples B on ``"data"``.

    Args:
        mesh: a mesh with `MESH_AXES`.
        shared: batches shared by all members, (T, B, ...): B on ``"data"`` only, the
            rest replicated.

    Returns:
        The sharding, a pytree prefix for every leaf of the batches.
    """
    spec = P(None, DATA_AXIS) if shared else P(POPULATION_AXIS, None, DATA_AXIS)
    return NamedSharding(mesh, spec)


def data_parallel_step(step_fn: engine.StepFn, mesh: Mesh) -> engine.StepFn:
    """Wraps an inner step so each batch's examples (axis 0) lie on the ``"data"`` axis.

    The constraint makes GSPMD compute each step's forward and backward pass on the
    local examples and sum the student gradient over ``"data"``, instead of gathering the
    batch. Under `jax.vmap(..., spmd_axis_name="population")` the vmapped axis is also
    placed on ``"population"``.

    Args:
        step_fn: ``step(meta_params, state, batch) -> (state, metrics)``.
        mesh: a mesh with `MESH_AXES`.

    Returns:
        The same step with the sharding constraint on every leaf of ``batch``.
    """
    examples = NamedSharding(mesh, P(DATA_AXIS))

    def step(meta_params, state, batch):
        batch = jax.tree_util.tree_map(
            lambda a: jax.lax.with_sharding_constraint(a, examples), batch
        )
        return step_fn(meta_params, state, batch)

    return step


def check_population_shapes(mesh: Mesh, population_size: int, batch_size: int) -> None:
    """Raises a ConfigError unless P and B split evenly over the mesh.

    Args:
        mesh: a mesh with `MESH_AXES`.
        population_size: P, students.
        batch_size: B, examples per inner step.
    """
    population, data_size = mesh.shape[POPULATION_AXIS], mesh.shape[DATA_AXIS]
    if population_size % population:
        raise ConfigError(
            f"population_size {population_size} does not split over config.mesh.population="
            f"{population} devices; make it a multiple of {population}"
        )
    if batch_size % data_size:
        raise ConfigError(
            f"batch_size {batch_size} does not split over config.mesh.data={data_size} "
            f"devices; make it a multiple of {data_size}"
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
    batch_axis = _STACKED_BATCH_AXIS - 1 if estimator.shared_batches else _STACKED_BATCH_AXIS

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


# --------------------------------------------------------------------------- hosts


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins a multi-host JAX run (`jax.distributed.initialize`); a no-op if not asked.

    Call once per process, before anything else touches JAX's devices. Afterwards
    `jax.devices()` lists every host's devices (so `make_mesh` spans them) and
    `jax.local_devices()` this host's.

    Args:
        coordinator_address: ``"host:port"`` of process 0 (every process passes the
            same); ``"auto"`` lets JAX read it, with the process count and id, from the
            cluster (Cloud TPU pods, SLURM, Open MPI); None (with the other two None):
            single-process, nothing is done.
        num_processes: how many processes (hosts) in all.
        process_id: this process's index in [0, num_processes).

    Returns:
        Whether `jax.distributed.initialize` was called.

    Raises:
        ConfigError: inconsistent arguments (a count or id given without an address,
            or an id outside [0, num_processes)).
    """
    if coordinator_address is None:
        if num_processes is not None or process_id is not None:
            raise ConfigError(
                "--num_processes/--process_id need --coordinator_address (host:port of "
                "process 0, or 'auto' on a cluster JAX can detect)"
            )
        return False
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and (
        process_id < 0 or (num_processes is not None and process_id >= num_processes)
    ):
        raise ConfigError(
            f"--process_id must be in [0, --num_processes={num_processes}), got {process_id}"
        )
    if coordinator_address == "auto":
        jax.distributed.initialize(num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def host_slices(
    sharding: jax.sharding.Sharding,
    global_shape: Sequence[int],
    devices: Sequence[jax.Device] | None = None,
) -> tuple[slice, ...]:
    """The part of a global array that this host's devices hold under `sharding`.

    Read from the sharding itself, so it is right whatever the mesh's device order.
    A host loads only this part of its input and hands it to `global_batches`.

    Args:
        sharding: the global array's sharding.
        global_shape: its shape.
        devices: whose part to compute; default the devices of this process
            (`jax.process_index()`).

    Returns:
        One ``slice(start, stop)`` per dimension.

    Raises:
        ValueError: the devices' shards do not form one box (a mesh whose host
            boundaries cut across an axis unevenly).
    """
    global_shape = tuple(global_shape)
    index_map = sharding.devices_indices_map(global_shape)
    if devices is None:
        devices = [d for d in index_map if d.process_index == jax.process_index()]
    regions = {
        tuple(index.indices(dim)[:2] for index, dim in zip(index_map[d], global_shape))
        for d in devices
    }
    box = tuple(
        (min(r[i][0] for r in regions), max(r[i][1] for r in regions))
        for i in range(len(global_shape))
    )
    volume = sum(math.prod(stop - start for start, stop in region) for region in regions)
    if volume != math.prod(stop - start for start, stop in box):
        raise ValueError(f"the devices' shards of {global_shape} under {sharding} are not a box")
    return tuple(slice(start, stop) for start, stop in box)


def host_population_slice(mesh: Mesh, population_size: int) -> slice:
    """Which population members this host trains: ``seeds[host_population_slice(...)]``.

    Args:
        mesh: from `make_mesh`.
        population_size: P, the whole population.

    Returns:
        A slice of ``range(P)``; everything on one host.
    """
    return host_slices(population_sharding(mesh), (population_size,))[0]


def host_batch_slice(mesh: Mesh, batch_size: int) -> slice:
    """Which examples of every inner batch this host feeds: ``batch[..., slice, ...]``.

    Args:
        mesh: from `make_mesh`.
        batch_size: B, the global batch of one step.

    Returns:
        A slice of ``range(B)``; everything when the data axis stays on one host.
    """
    return host_slices(NamedSharding(mesh, P(DATA_AXIS)), (batch_size,))[0]


def global_batches(
    mesh: Mesh,
    local_batches: PyTree,
    *,
    population_size: int | None,
    batch_size: int,
) -> PyTree:
    """Global, sharded batches from each host's part (`jax.make_array_from_process_local_data`).

    Each host passes the batches of its members (`host_population_slice`) restricted
    to its examples (`host_batch_slice`); on one host that is everything and this is a
    `jax.device_put` with `batch_sharding`.

    Args:
        mesh: from `make_mesh`.
        local_batches: this host's leaves (P_host, T, B_host, ...), or (T, B_host, ...)
            for shared batches.
        population_size: P; None for batches shared by all members.
        batch_size: B, the global batch of one step.

    Returns:
        The batches as global `jax.Array`s laid out by `batch_sharding`.
    """
    shared = population_size is None
    sharding = batch_sharding(mesh, shared)

    def assemble(local):
        shape = list(np.shape(local))
        if not shared:
            shape[0] = population_size
        shape[_STACKED_BATCH_AXIS - shared] = batch_size
        return jax.make_array_from_process_local_data(sharding, np.asarray(local), tuple(shape))

    return jax.tree_util.tree_map(assemble, local_batches)


# --------------------------------------------------------------------------- methods


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
