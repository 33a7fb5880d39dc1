r"""Draws a run's pictures into its workdir.

  python -m launch.plot --workdir=DIR

Writes DIR/curves.png (train loss, dev and test loss and error over the run) and, for
L2T-DLF runs, DIR/dlf_loss.png (the learned W_t as heatmaps at several points of the
teaching run, and the loss as a function of p_y against cross-entropy), and for L2T-DLN
runs DIR/dln_loss.png (the loss network's surface over (sigmoid z_y, sigmoid z_j) at
several points of the run, the teacher's update magnitudes and the DLN's margin).
"""

import json
import os

import jax
import jax.flatten_util
import ml_collections
import numpy as np
from absl import app, flags

import launch
from l2t_jax import methods, metrics, plots, train
from l2t_jax.losses import dln as dln_lib

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
    title = ""
    summary_path = os.path.join(workdir, train.SUMMARY_FILE)
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            s = json.load(f)
        title = f"{s['method']} | {s['dataset']} ({s['noise']}) | {s['student']}"
    path = os.path.join(workdir, "curves.png")
    plots.plot_training_curves(records, path, title)
    print(path)

    with open(os.path.join(workdir, train.CONFIG_FILE)) as f:
        config = ml_collections.ConfigDict(json.load(f))
    snapshots_path = os.path.join(workdir, train.DLN_SNAPSHOTS_FILE)
    if os.path.exists(snapshots_path):
        template = dln_lib.init_dln(jax.random.PRNGKey(0), config.dln.hidden,
                                       config.dln.depth)
        unravel = jax.flatten_util.ravel_pytree(template)[1]
        with np.load(snapshots_path) as f:
            dlns = [(int(step), unravel(row)) for step, row in zip(f["steps"], f["snapshots"])]
        path = os.path.join(workdir, "dln_loss.png")
        plots.plot_dln_loss(dlns, records, path, title)
        print(path)

    params_path = os.path.join(workdir, train.TEACHER_PARAMS_FILE)
    if config.method in methods.DLF_METHODS and os.path.exists(params_path):
        params = train.load_params(params_path)
        num_classes = params["W"].shape[0]
        teacher = methods.build_teacher(config, num_classes)
        states = plots.dlf_states_from_metrics(records, config.train.num_steps, num_classes)
        path = os.path.join(workdir, "dlf_loss.png")
        plots.plot_dlf_loss(teacher, params, states, path, title)
        print(path)


if __name__ == "__main__":
    app.run(main)
