r"""Draws a run's pictures into its workdir.

  python -m launch.plot --workdir=DIR

Writes DIR/curves.png (train loss, dev and test loss and error over the run).
"""

import json
import os

from absl import app, flags

from l2t_jax import metrics, plots, train

_WORKDIR = flags.DEFINE_string("workdir", None, "A run's directory (see launch.train).")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    records = metrics.read_metrics(_WORKDIR.value)
    if not records:
        raise app.UsageError(f"no {metrics.METRICS_FILE} in {_WORKDIR.value}; train first")
    title = ""
    summary_path = os.path.join(_WORKDIR.value, train.SUMMARY_FILE)
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            s = json.load(f)
        title = f"{s['method']} | {s['dataset']} ({s['noise']}) | {s['student']}"
    path = os.path.join(_WORKDIR.value, "curves.png")
    plots.plot_training_curves(records, path, title)
    print(path)


if __name__ == "__main__":
    app.run(main)
