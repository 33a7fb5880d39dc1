"""Pictures: the training-curve PNG is written and drawn from the metrics."""

import matplotlib.image

from l2t_jax import plots


def test_training_curves_png(tmp_path):
    records = [{"step": s, "train/loss": 1.0 / s} for s in range(10, 101, 10)]
    records += [{"step": s, "dev/loss": 0.5, "dev/error": 10.0 - s / 20, "test/loss": 0.6,
                 "test/error": 11.0 - s / 20, "best/test_error_at_best_dev": 11.0 - s / 20}
                for s in (50, 100)]
    path = tmp_path / "curves.png"
    plots.plot_training_curves(records, str(path), "title")
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (400, 1100)
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_loss_axis_is_log_only_while_every_loss_is_positive():
    assert plots.loss_axis_scale([0.1, 2.0]) == "log"
    # A DLN's value can go negative (a drifting run reached -5.8): keep those points.
    assert plots.loss_axis_scale([0.1, -5.8]) == "symlog"
    assert plots.loss_axis_scale([0.0, 1.0]) == "symlog"


def test_dln_loss_png_draws_each_snapshot_surface(tmp_path):
    import jax

    from l2t_jax.losses import dln as dln_lib

    dlns = [(step, dln_lib.init_dln(jax.random.PRNGKey(step))) for step in (0, 15, 30)]
    records = [{"step": s, "teacher/update_norm": 0.01 * s, "dln/margin": 1.0 - 0.1 * s}
               for s in range(15, 31, 15)]
    path = tmp_path / "dln_loss.png"
    plots.plot_dln_loss(dlns, records, str(path), "title", grid_size=9)
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (640, 1000)
    # The three surface panels differ (each is its own network).
    top = image[60:280, :, :3]
    thirds = [top[:, i * 300 + 40:(i + 1) * 300 - 60] for i in range(3)]
    assert not (thirds[0] == thirds[1]).all() and not (thirds[1] == thirds[2]).all()
