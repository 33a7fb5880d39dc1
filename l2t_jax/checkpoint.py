"""Orbax checkpoints of the whole training state, so a killed run resumes exactly.

Each checkpoint is one step directory holding two orbax items: ``default`` (the state
pytree; orbax's name for a single item, so checkpoints written before the records were
added restore through the same manager) and ``records`` (the run's metric records up to
that step and a digest of state and records taken when saving). A restore recomputes the
digest, so damage that orbax reads without complaint (bytes changed in a data file) is
caught as surely as files that no longer read; a damaged checkpoint is moved aside and
the next older one is tried.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils

from l2t_jax import mesh
from l2t_jax import workdir as run_workdir
from l2t_jax.errors import ConfigError

# Where damaged checkpoints go, beside the checkpoint directory (kept, not deleted).
DAMAGED_DIR = "damaged_checkpoints"
# The two orbax items of a checkpoint.
STATE_ITEM = "default"
RECORDS_ITEM = "records"
# Free space kept beyond twice a checkpoint's size (metrics and events are written too).
_SPACE_MARGIN = 1 << 20
# Orbax's per-step metadata file; it names the items the step was saved with.
_STEP_METADATA_FILE = "_CHECKPOINT_METADATA"


class _Damaged(Exception):
    """A checkpoint that does not restore, or restores to other values than were saved."""


class Checkpointer:
    """Saves a state pytree with its metric records at given steps; restores the latest.

    Writes are asynchronous (training continues while orbax writes) and atomic: a
    checkpoint directory appears under its final name only when complete, so a kill
    during a write leaves the previous checkpoint as the latest. Restores are verified
    against a digest saved with the checkpoint.
    """

    def __init__(self, directory: str, max_to_keep: int = 2):
        """Opens (or creates) the checkpoint directory.

        Args:
            directory: where checkpoints live, one sub-directory per step.
            max_to_keep: how many of the newest checkpoints to keep.
        """
        self._directory = os.path.abspath(directory)
        # Handlers given up front (not inferred at the first save or restore) so that the
        # state's metadata reads before anything was restored.
        self._manager = ocp.CheckpointManager(
            self._directory,
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                RECORDS_ITEM: ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def restore_or(self, state: Any) -> tuple[Any, int, list[dict] | None]:
        """Restores the newest intact checkpoint, or keeps `state` if there is none.

        A checkpoint that does not restore or whose digest differs is logged in one
        warning line, moved to ``DAMAGED_DIR`` beside the checkpoint directory, and the
        next older one is tried.

        Args:
            state: a template with the right structure, shapes and dtypes (the freshly
                initialised state).

        Returns:
            ``(state, step, records)``: the restored state, its step and the metric
            records saved with it; ``(state, 0, [])`` without checkpoints. `records` is
            None for a checkpoint written before records were saved (restored
            unverified, with a warning).

        Raises:
            ConfigError: the checkpoint holds a state of another layout (written by an
                older version of the library, or by another method), or no checkpoint
                is intact; in one line.
        """
        abstract = jax.tree_util.tree_map(
            lambda leaf: np.asarray(leaf) if _host_local(leaf)
            else ocp.utils.to_shape_dtype_struct(leaf), state)
        steps = sorted(self._manager.all_steps(), reverse=True)
        for step in steps:
            try:
                restored, records = self._restore_step(step, abstract)
            except _Damaged as e:
                self._quarantine(step, str(e))
                continue
            restored = jax.tree_util.tree_map(  # back onto each process's own device
                lambda leaf, like: jax.device_put(leaf, like.sharding) if _host_local(like)
                else leaf, restored, state)
            return restored, step, records
        if steps:
            raise ConfigError(
                f"no intact checkpoint in {self._directory}: all were damaged and moved "
                f"to {self._damaged_dir()}; run again to start from step 0, or use a new "
                "--workdir"
            )
        return state, 0, []

    def save(self, step: int, state: Any, records: list[dict]) -> None:
        """Starts writing checkpoint `step` (returns before it is on disk).

        Args:
            step: the global step of `state`.
            state: the pytree to save.
            records: the run's metric records up to `step` (JSON-able dicts), saved
                with the state so that a resume rewrites ``metrics.jsonl`` from them.
        """
        # A copy: the caller goes on appending to its list while orbax writes.
        records = [dict(r) for r in records]
        payload = {"digest": _digest(state, records), "records": records}
        self._check_space(state, payload)
        state = jax.tree_util.tree_map(
            lambda leaf: np.asarray(leaf) if _host_local(leaf) else leaf, state)
        self._manager.save(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardSave(state),
            RECORDS_ITEM: ocp.args.JsonSave(payload),
        }))

    def _check_space(self, state: Any, payload: dict) -> None:
        """Refuses to start a checkpoint the disk cannot hold (orbax would fail in its
        writer threads, with a traceback each, and leave a half-written directory).

        Raises:
            OSError: ``ENOSPC``, when the free space is under twice the checkpoint's size
                plus `_SPACE_MARGIN` (the previous checkpoint is kept).
        """
        size = sum(getattr(leaf, "nbytes", 8) for leaf in jax.tree_util.tree_leaves(state))
        size += len(json.dumps(payload))
        free = shutil.disk_usage(self._manager.directory).free
        if free < 2 * size + _SPACE_MARGIN:
            raise OSError(errno.ENOSPC, f"a checkpoint of {size:,} bytes needs more than the "
                          f"{free:,} bytes free; free some space and rerun to resume",
                          str(self._manager.directory))

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def _restore_step(self, step: int, abstract: Any) -> tuple[Any, list[dict] | None]:
        """Restores and verifies checkpoint `step`; raises `_Damaged` if it is."""
        self._check_layout(step, abstract)
        legacy = self._is_legacy(step)
        args = {STATE_ITEM: ocp.args.StandardRestore(abstract)}
        if not legacy:
            args[RECORDS_ITEM] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
            payload = {"records": None, "digest": None} if legacy else restored[RECORDS_ITEM]
            records, digest = payload["records"], payload["digest"]
        # Whatever orbax or tensorstore raise on missing, truncated or garbled files.
        except Exception as e:
            raise _Damaged(f"it does not restore: {_summary(e)}") from e
        if legacy:
            logging.warning(
                "the checkpoint at step %d in %s predates verified checkpoints: restored "
                "unverified, with the metrics in metrics.jsonl", step, self._directory,
            )
        elif _digest(restored[STATE_ITEM], records) != digest:
            raise _Damaged("its contents differ from what was saved")
        return restored[STATE_ITEM], records

    def _check_layout(self, step: int, abstract: Any) -> None:
        """Raises ConfigError if checkpoint `step` holds a state of another layout.

        Compared from the saved metadata, before restoring: another layout is a wrong
        workdir, not damage, so it must not be mistaken for an unreadable checkpoint
        (`_Damaged` is raised only when the metadata does not read).
        """
        try:
            metadata = self._manager.item_metadata(step)[STATE_ITEM]
        except Exception as e:
            raise _Damaged(f"its metadata does not read: {_summary(e)}") from e
        if metadata is None:  # what orbax reads for a missing metadata file
            raise _Damaged("its metadata is missing")
        if _layout(metadata.tree) != _layout(abstract):
            raise ConfigError(
                f"the checkpoint at step {step} in {self._directory} holds a state "
                "of another layout (written by an older l2t_jax or by another method); "
                "resume it with the version that wrote it, or start a new --workdir"
            )

    def _is_legacy(self, step: int) -> bool:
        """Whether `step` was written as a single item, before records were saved.

        Decided by the step's own metadata, so that a checkpoint whose records item was
        lost counts as damaged rather than as an old one.
        """
        step_dir = os.path.join(self._directory, str(step))
        if os.path.exists(os.path.join(step_dir, RECORDS_ITEM)):
            return False
        try:
            with open(os.path.join(step_dir, _STEP_METADATA_FILE)) as f:
                items = json.load(f)["item_handlers"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return list(items) == [STATE_ITEM]

    def _quarantine(self, step: int, reason: str) -> None:
        """Moves damaged checkpoint `step` aside (orbax no longer lists it) and warns."""
        if run_workdir.is_writer():  # one process moves it (every one found it damaged)
            target = _unused_path(os.path.join(self._damaged_dir(), str(step)))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            # Orbax names step directories by the bare step number (its default format).
            os.rename(os.path.join(self._directory, str(step)), target)
        if jax.process_count() > 1:  # the others look again once it has moved
            multihost_utils.sync_global_devices(f"quarantined checkpoint {step}")
        self._manager.reload()
        logging.warning(
            "the checkpoint at step %d in %s is damaged (%s); moved it into %s and trying "
            "an older one", step, self._directory, reason, self._damaged_dir(),
        )

    def _damaged_dir(self) -> str:
        return os.path.join(os.path.dirname(self._directory), DAMAGED_DIR)


def _host_local(leaf: Any) -> bool:
    """Whether `leaf` is an array on one process's devices in a multi-host run.

    Such a leaf (a single-device student, the best-step record) holds the same value on
    every process; orbax saves only global arrays, so it is saved and restored as numpy
    (written once) and put back on each process's own device.
    """
    if jax.process_count() == 1 or not isinstance(leaf, jax.Array):
        return False
    return len({d.process_index for d in leaf.sharding.device_set}) < jax.process_count()


def _digest(state: Any, records: list[dict]) -> str:
    """sha256 over every leaf (path, dtype, shape, bytes, in tree order) and the records."""
    hasher = hashlib.sha256()
    # Whole arrays: a multi-host state is gathered (every process saves and restores it).
    leaves, _ = jax.tree_util.tree_flatten_with_path(mesh.to_host(state))
    for path, leaf in leaves:
        array = np.asarray(leaf)
        hasher.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        hasher.update(array.tobytes())
    hasher.update(json.dumps(records, sort_keys=True, separators=(",", ":")).encode())
    return hasher.hexdigest()


def _layout(tree: Any) -> dict[tuple, tuple]:
    """Path -> (shape, dtype) of a state, its abstract template or its saved metadata.

    Orbax's flat paths are the same for a pytree and for its saved metadata, whatever
    the containers (dicts, dataclasses, namedtuples).
    """
    return {
        path: (tuple(np.shape(leaf)), np.dtype(getattr(leaf, "dtype", type(leaf))))
        for path, leaf in ocp.tree.to_flat_dict(tree).items()
    }


def _unused_path(path: str) -> str:
    """`path`, or `path.1`, `path.2`, ... if taken (the same step may be damaged again)."""
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def _summary(error: BaseException) -> str:
    """The root cause's type and the start of its first line, for a one-line warning.

    Orbax wraps tensorstore's errors (which say what is wrong with which file) in
    messages that run on for pages.
    """
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__


def save_params(params, path: str) -> None:
    """Writes a parameter pytree of nested dicts to ``.npz`` (keys joined by ``/``)."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    np.savez(path, **flat)


def load_params(path: str) -> dict:
    """Reads what `save_params` wrote, as nested dicts of numpy arrays."""
    with np.load(path) as f:
        return traverse_util.unflatten_dict(dict(f), sep="/")
