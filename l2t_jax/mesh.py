"""Device meshes, shardings and hosts for populations of students.

A 2-D `Mesh` with axes ``("population", "data")``: stacked students lie on
``"population"``, the examples of every inner batch on ``"data"``; teacher parameters
are replicated. On several hosts each host builds only its own part of the input
(`host_population_slice`, `host_batch_slice`) and `global_batches` assembles the global
arrays from the hosts' parts (the processes join with `jax.distributed.initialize`,
called by `launch/train.py`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from l2t_jax import engine
from l2t_jax.errors import ConfigError

PyTree = Any

POPULATION_AXIS = "population"
DATA_AXIS = "data"
MESH_AXES = (POPULATION_AXIS, DATA_AXIS)
# The axis of a stacked per-student batch leaf (P, T, B, ...) that holds the examples.
STACKED_BATCH_AXIS = 2

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


def describe_host_share(mesh: Mesh, population_size: int, batch_size: int) -> str:
    """One line naming the members and batch examples this process builds and trains.

    Args:
        mesh: from `make_mesh`.
        population_size: P, the whole population.
        batch_size: B, the global batch of one step.

    Returns:
        E.g. ``"process 1 of 2: population members [4, 8) of 8, examples [0, 24) of
        each batch of 24"``.
    """
    members = host_population_slice(mesh, population_size)
    examples = host_batch_slice(mesh, batch_size)
    return (f"process {jax.process_index()} of {jax.process_count()}: population members "
            f"[{members.start}, {members.stop}) of {population_size}, examples "
            f"[{examples.start}, {examples.stop}) of each batch of {batch_size}")


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
        shape[STACKED_BATCH_AXIS - shared] = batch_size
        return jax.make_array_from_process_local_data(sharding, np.asarray(local), tuple(shape))

    return jax.tree_util.tree_map(assemble, local_batches)


def to_host(tree: PyTree) -> PyTree:
    """Numpy copies of a pytree's arrays, whole on every process.

    An array that spans other hosts' devices is gathered from them
    (`multihost_utils.process_allgather`), so in a multi-host run every process must
    call this with the same tree at the same point; on one host it is `jax.device_get`.

    Args:
        tree: arrays (global `jax.Array`s, local ones or numpy).

    Returns:
        The same tree of numpy arrays.
    """
    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(jax.device_get(leaf))

    return jax.tree_util.tree_map(fetch, tree)
