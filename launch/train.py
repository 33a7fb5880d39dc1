r"""Trains as a config says, resuming from the latest checkpoint in --workdir.

  python -m launch.train --config=configs/ce_baseline.py[:variant] --workdir=DIR \
      [--config.train.num_steps=500 ...]

Writes DIR/metrics.jsonl, DIR/tensorboard/, DIR/checkpoints/ and DIR/summary.json.

Multi-host (one process per host, the same command on each; see the README):
  python -m launch.train ... --coordinator_address=HOST0:1234 --num_processes=N \
      --process_id=I
  (or --coordinator_address=auto on a cluster JAX detects: Cloud TPU, SLURM, Open MPI)
"""

from absl import app, flags, logging
from ml_collections import config_flags

import launch
from l2t_jax import train
from l2t_jax.errors import ConfigError
from launch import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-host: host:port of process 0 ('auto': read from the cluster); unset: one process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:  # before anything touches JAX's devices
        distributed.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                           _PROCESS_ID.value)
    except ConfigError as e:
        raise app.UsageError(str(e)) from None
    launch.quiet_library_logging()
    logging.info("config:\n%s", _CONFIG.value)
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:  # bad input: one line saying what to change, no traceback
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    app.run(main)
