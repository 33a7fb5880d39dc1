r"""Draws a run's pictures into its workdir.

  python -m launch.plot --workdir=DIR      (installed: l2t-plot --workdir=DIR)

Writes DIR/curves.png (train loss, dev and test loss and error over the run) and the
pictures of the run's method, e.g. DIR/dlf_loss.png for L2T-DLF (the learned W_t at
several points of the run, and the loss as a function of p_y against cross-entropy) and
DIR/dln_loss.png for L2T-DLN (the loss network's surface over training, the teacher's
update magnitudes and the DLN's margin); `python -m launch.methods` lists the methods.
"""

import json
import os

from absl import flags

import launch
from l2t_jax import methods, metrics, plots, train
from l2t_jax import workdir as run_workdir
from l2t_jax.errors import ConfigError
from launch import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's directory (see launch.train).")
flags.mark_flag_as_required("workdir")


def _read_json(path: str, what: str) -> dict:
    """A JSON file of the run, or a one-line `ConfigError` saying what is wrong."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no {os.path.basename(path)} in {os.path.dirname(path)}: "
                          f"not a run's --workdir ({what})") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); {what}") from None


def main(argv):
    del argv  # `cli.run` refuses extra arguments
    launch.quiet_library_logging()
    workdir = _WORKDIR.value
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is not a directory; point it at a run's "
                          "--workdir")
    config = run_workdir.read_config(workdir)
    method = methods.get(config.get("method", ""))
    records = metrics.read_metrics(workdir)
    if not records:
        raise ConfigError(f"no metrics in {workdir}/{metrics.METRICS_FILE}; train first")
    summary = {}
    summary_path = os.path.join(workdir, train.SUMMARY_FILE)
    if os.path.exists(summary_path):
        summary = _read_json(summary_path, "rerun launch.train to rewrite it")
    path = os.path.join(workdir, "curves.png")
    plots.plot_training_curves(records, path, plots.run_title(summary))
    print(path)
    if method.draw is not None:
        for path in method.draw(config, workdir, records, summary):
            print(path)


def entry() -> None:
    """The ``l2t-plot`` command (``python -m launch.plot``)."""
    cli.run(main)


if __name__ == "__main__":
    entry()
