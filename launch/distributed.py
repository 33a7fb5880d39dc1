"""Multi-host runs: the `jax.distributed.initialize` flags of the launchers, checked, and
a lost process turned into one line and a prompt exit of the others."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import jax
from absl import logging

from l2t_jax.errors import ConfigError
from launch import cli

# JAX's default: a process silent this long counts as dead, and the others stop.
DEFAULT_HEARTBEAT_TIMEOUT = 100


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
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
        heartbeat_timeout: seconds after which a process that stopped answering
            counts as dead; the others then stop (`stop_together`).

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
    if heartbeat_timeout < 1:
        raise ConfigError(f"--heartbeat_timeout must be >= 1 second, got {heartbeat_timeout}")
    jax.distributed.initialize(
        None if coordinator_address == "auto" else coordinator_address, num_processes,
        process_id, heartbeat_timeout_seconds=heartbeat_timeout)
    return True


@contextlib.contextmanager
def stop_together(joined: bool) -> Iterator[None]:
    """Ends this process at once, in one line, when another process of the run is lost.

    A process that dies or stops answering makes the others' next collective fail
    (within the heartbeat timeout). Exiting normally would then wait at JAX's shutdown
    barrier for the lost process and abort with pages of C++ log, so this process
    reports the cause and exits with `cli.FAILED` without running exit handlers; the
    checkpoints already written are complete (orbax renames them into place), and
    rerunning every process resumes from the newest.

    Args:
        joined: whether this is a multi-host run (`initialize_distributed`'s result);
            otherwise nothing is caught.
    """
    if not joined:
        yield
        return
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        print(f"error: process {jax.process_index()} of {jax.process_count()}: another "
              f"process of this multi-host run stopped or cannot be reached ({lines[0][:200]}); "
              "rerun every process with the same command to resume from the newest "
              "checkpoint in --workdir", file=sys.stderr, flush=True)
        logging.flush()
        os._exit(cli.FAILED)


