"""Multi-host start-up: the `jax.distributed.initialize` flags of the launchers, checked."""

from __future__ import annotations

import jax

from l2t_jax.errors import ConfigError


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


