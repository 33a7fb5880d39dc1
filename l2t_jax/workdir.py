"""A run's directory knows the config that made it, and refuses to answer for another.

`check` runs before anything is written into a workdir: a directory that already holds a
run (its ``config.json``) may only be resumed by the same config, so that a finished or
half-done run never silently reports its numbers under different settings. `record`
writes the config once the run is about to start. `write_atomically` replaces a run's
file (its config, its metrics) so that a crash never leaves it half-written. In a
multi-host run every process computes, and process 0 alone writes the run's files
(`is_writer`); orbax writes the checkpoints from all of them.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import logging
from flax import traverse_util

from l2t_jax.errors import ConfigError

# The config a run writes into its workdir, beside its checkpoints.
CONFIG_FILE = "config.json"
# What a finished run writes last: its results.
SUMMARY_FILE = "summary.json"
# Fields that change how often a run saves, or when a diverging run stops, never what a
# finished run computes.
NEUTRAL_FIELDS = ("train.checkpoint_every", "train.max_growth", "train.max_cross_entropy")
_SHOWN = 4  # differing fields named in the error


def _differences(old: dict, new: dict) -> list[str]:
    """The fields in which two flattened configs differ, sorted.

    Fields present in only one of them count; `NEUTRAL_FIELDS` do not.
    """
    return sorted(k for k in old.keys() | new.keys()
                  if k not in NEUTRAL_FIELDS and old.get(k, "<absent>") != new.get(k, "<absent>"))


def _describe(old: dict, new: dict, fields: list[str]) -> str:
    """``config.a.b: old -> new, ...`` for the first `_SHOWN` of `fields`."""
    shown = ", ".join(f"config.{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
                      for k in fields[:_SHOWN])
    more = len(fields) - _SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def check(workdir: str, config: ml_collections.ConfigDict, allow_change: bool = False) -> None:
    """Checks that `workdir` may hold a run of `config`; writes nothing.

    Args:
        workdir: the run's directory (need not exist).
        config: the run's config.
        allow_change: continue a run recorded with another config on purpose (the
            differing fields are logged; `record` then records the new config).

    Raises:
        ConfigError: `workdir` is not a directory, or holds a run of another config (the
            message names the differing fields).
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is a file, not a directory; "
                          "choose a directory")
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); restore it, or use a new "
                          "--workdir") from None
    old = traverse_util.flatten_dict(recorded, sep=".")
    new = traverse_util.flatten_dict(_as_json(config), sep=".")
    fields = _differences(old, new)
    if fields and not allow_change:
        raise ConfigError(
            f"{workdir} holds a run of another config ({_describe(old, new, fields)}); "
            "use a new --workdir, or pass --allow_config_change to continue that run "
            "with this config")
    if fields:
        logging.warning("continuing the run in %s with a changed config: %s", workdir,
                        _describe(old, new, fields))


def is_writer() -> bool:
    """Whether this process writes the run's files: process 0 (the only one on one host)."""
    return jax.process_index() == 0


def record(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes `config` as the config of the run in `workdir` (created if missing); only
    on the writing process (`is_writer`)."""
    os.makedirs(workdir, exist_ok=True)
    if not is_writer():
        return
    write_atomically(os.path.join(workdir, CONFIG_FILE), json.dumps(_as_json(config), indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config recorded in `workdir` (by `record`), as the run was given it.

    Raises:
        ConfigError: `workdir` holds no readable recorded config (in one line).
    """
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path) as f:
            recorded = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no {CONFIG_FILE} in {workdir}: not a run's --workdir "
                          "(launch.train writes it at the start)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); restore it") from None

    def tuples(value):  # JSON holds the config's tuples as lists
        if isinstance(value, dict):
            return {k: tuples(v) for k, v in value.items()}
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    return ml_collections.ConfigDict(tuples(recorded))


def _as_json(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON values (tuples become lists), as the file holds it."""
    return json.loads(config.to_json_best_effort())


def write_atomically(path: str, text: str) -> None:
    """Replaces the file `path` with `text`: a crash leaves either the old or the new file.

    The text goes to a temporary file beside `path`, synced to disk, then renamed over
    `path`; the temporary file never outlives the call.
    """
    temporary = path + ".tmp"
    try:
        with open(temporary, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
