r"""Runs a federated config on Flower's simulation engine: one SuperNode per client.

  python -m launch.flower --config=configs/federated.py:mnist_5k --workdir=DIR
      [--config.method=fedgen ...]          (installed: l2t-flower ...)

The same clients, rounds and global model as `launch.train` on the config (one program),
with each client a Flower `ClientApp` and the server a `ServerApp` (`l2t_jax.flower`);
methods: fedavg, fedgen, l2t-fedgen. Writes DIR/config.json and DIR/summary.json: the server's
model after the last round, its dev and test error, and each round's mean client train
loss. Not checkpointed: a killed run starts again.
"""

import json
import os

from absl import flags, logging
from ml_collections import config_flags

import launch
from l2t_jax import evaluation, flower, train
from l2t_jax import workdir as run_workdir
from launch import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A federated config (configs/federated.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where config.json and summary.json go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv  # `cli.run` refuses extra arguments
    launch.quiet_library_logging()
    config = _CONFIG.value
    train.validate_config(config)
    flower.check_supported(config)
    run_workdir.check(_WORKDIR.value, config)
    run_workdir.record(_WORKDIR.value, config)
    outcome = flower.run_simulation(config)
    loop, splits, _ = flower.build(config)
    student = loop.student(outcome["state"])
    summary = {"method": config.method, "engine": "flower-simulation",
               "clients": config.federated.num_clients, "rounds": config.train.num_steps,
               "train_loss": outcome["train_loss"]}
    for split in ("dev", "test"):
        arrays = getattr(splits, split)
        summary[f"final_{split}_error"] = evaluation.evaluate(
            loop.model, student, arrays.x, arrays.y, config.train.eval_batch_size)["error"]
    with open(os.path.join(_WORKDIR.value, run_workdir.SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info("done: test error %.2f%% after %d rounds on Flower",
                 summary["final_test_error"], config.train.num_steps)


def entry() -> None:
    """The ``l2t-flower`` command (``python -m launch.flower``)."""
    cli.run(main)


if __name__ == "__main__":
    entry()
