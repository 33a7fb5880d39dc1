"""Pictures of a run: training curves from ``metrics.jsonl``."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(records: list[dict], path: str, title: str = "") -> None:
    """Draws train loss and dev/test error against the step and saves a PNG.

    Args:
        records: metric records as read by `l2t_jax.metrics.read_metrics`.
        path: where to write the PNG.
        title: figure title (e.g. the run's dataset and method).
    """
    fig, (loss_ax, error_ax) = plt.subplots(1, 2, figsize=(11, 4))
    train = [r for r in records if "train/loss" in r]
    loss_ax.plot([r["step"] for r in train], [r["train/loss"] for r in train], "C0",
                 label="train")
    evals = [r for r in records if "dev/loss" in r]
    for split, color in (("dev", "C1"), ("test", "C2")):
        steps = [r["step"] for r in evals]
        loss_ax.plot(steps, [r[f"{split}/loss"] for r in evals], color, label=split)
        error_ax.plot(steps, [r[f"{split}/error"] for r in evals], color, label=split)
    best = [r for r in evals if "best/test_error_at_best_dev" in r]
    if best:
        error_ax.plot([r["step"] for r in best],
                      [r["best/test_error_at_best_dev"] for r in best],
                      "k--", lw=1, label="test at best dev")
    loss_ax.set(xlabel="student step", ylabel="cross-entropy", yscale="log", title="loss")
    error_ax.set(xlabel="student step", ylabel="error (%)", title="error")
    for ax in (loss_ax, error_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
