r"""Draws a run's pictures into its workdir.

  python -m launch.plot --workdir=DIR

Writes DIR/curves.png (train loss, dev and test loss and error over the run) and the
pictures of the run's method, e.g. DIR/dlf_loss.png for L2T-DLF (the learned W_t at
several points of the run, and the loss as a function of p_y against cross-entropy) and
DIR/dln_loss.png for L2T-DLN (the loss network's surface over training, the teacher's
update magnitudes and the DLN's margin); `python -m launch.methods` lists the methods.
"""

import json
import os

import ml_collections
from absl import app, flags

import launch
from l2t_jax import methods, metrics, plots, train
from l2t_jax.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's directory (see launch.train).")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    launch.quiet_library_logging()
    workdir = _WORKDIR.value
    records = metrics.read_metrics(workdir)
    if not records:
        raise app.UsageError(f"no {metrics.METRICS_FILE} in {workdir}; train first")
    summary = {}
    summary_path = os.path.join(workdir, train.SUMMARY_FILE)
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    path = os.path.join(workdir, "curves.png")
    plots.plot_training_curves(records, path, plots.run_title(summary))
    print(path)

    with open(os.path.join(workdir, train.CONFIG_FILE)) as f:
        config = ml_collections.ConfigDict(json.load(f))
    try:
        method = methods.get(config.method)
    except ConfigError as e:
        raise app.UsageError(str(e)) from None
    if method.draw is not None:
        for path in method.draw(config, workdir, records, summary):
            print(path)


if __name__ == "__main__":
    app.run(main)
