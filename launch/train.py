r"""Trains as a config says, resuming from the latest checkpoint in --workdir.

  python -m launch.train --config=configs/ce_baseline.py[:variant] --workdir=DIR \
      [--config.train.num_steps=500 ...]

Installed (`pip install .`), the same is `l2t-train ...` from any directory: a
configs/x.py that is not under the current directory is read from the installed package.

Writes DIR/config.json, DIR/metrics.jsonl, DIR/tensorboard/, DIR/checkpoints/ and
DIR/summary.json. A DIR made by another config is refused (--allow_config_change
continues it). Exit codes: 0 done, 1 diverged or could not write, 2 bad input (one line
on stderr; docs/runs.md).

Multi-host (one process per host, the same command on each; see the README):
  python -m launch.train ... --coordinator_address=HOST0:1234 --num_processes=N \
      --process_id=I
  (or --coordinator_address=auto on a cluster JAX detects: Cloud TPU, SLURM, Open MPI)
"""

from absl import flags
from ml_collections import config_flags

import launch
from l2t_jax import train
from launch import cli, distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-host: host:port of process 0 ('auto': read from the cluster); unset: one process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", distributed.DEFAULT_HEARTBEAT_TIMEOUT,
    "Multi-host: seconds after which a silent process counts as dead and the others stop.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Continue a run whose workdir was made by another config, with this config (without "
    "it, such a workdir is refused).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv  # `cli.run` refuses extra arguments
    # Before anything touches JAX's devices.
    joined = distributed.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                                _PROCESS_ID.value, _HEARTBEAT_TIMEOUT.value)
    launch.quiet_library_logging()
    with distributed.stop_together(joined):
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                 allow_config_change=_ALLOW_CONFIG_CHANGE.value)


def entry() -> None:
    """The ``l2t-train`` command (``python -m launch.train``)."""
    cli.run(main)


if __name__ == "__main__":
    entry()
