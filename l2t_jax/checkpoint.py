"""Orbax checkpoints of the whole training state, so a killed run resumes exactly."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from l2t_jax.errors import ConfigError

# The config a run writes into its workdir, beside its checkpoints.
RUN_CONFIG_FILE = "config.json"


class Checkpointer:
    """Saves a state pytree at given steps and restores the latest one.

    Writes are asynchronous (training continues while orbax writes) and atomic: a
    checkpoint directory appears under its final name only when complete, so a kill
    during a write leaves the previous checkpoint as the latest.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        """Opens (or creates) the checkpoint directory.

        Args:
            directory: where checkpoints live, one sub-directory per step.
            max_to_keep: how many of the newest checkpoints to keep.
        """
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def restore_or(self, state: Any) -> tuple[Any, int]:
        """Restores the latest checkpoint, or keeps `state` if there is none.

        Args:
            state: a template with the right structure, shapes and dtypes (the freshly
                initialised state).

        Returns:
            ``(state, step)``: the restored state and its step, or ``(state, 0)``.

        Raises:
            ConfigError: the checkpoint holds a state of another layout (written by an
                older version of the library, or by another method), in one line.
        """
        step = self.latest_step()
        if step is None:
            return state, 0
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
        try:
            restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except ValueError as e:
            if "tree structures do not match" not in str(e):
                raise
            raise ConfigError(
                f"the checkpoint at step {step} in {self._manager.directory} holds a state "
                "of another layout (written by an older l2t_jax or by another method); "
                "resume it with the version that wrote it, or start a new --workdir"
            ) from None
        return restored, step

    def save(self, step: int, state: Any) -> None:
        """Starts writing `state` as checkpoint `step` (returns before it is on disk)."""
        self._manager.save(step, args=ocp.args.StandardSave(state))

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def save_params(params, path: str) -> None:
    """Writes a parameter pytree of nested dicts to ``.npz`` (keys joined by ``/``)."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    np.savez(path, **flat)


def load_params(path: str) -> dict:
    """Reads what `save_params` wrote, as nested dicts of numpy arrays."""
    with np.load(path) as f:
        return traverse_util.unflatten_dict(dict(f), sep="/")
