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
