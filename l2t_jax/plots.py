"""Pictures of a run: training curves, and the loss an L2T-DLF teacher learned."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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


def dlf_states_from_metrics(records: list[dict], num_steps: int, num_classes: int,
                            points: int = 4) -> list[tuple[int, np.ndarray]]:
    """Student-state features s_t rebuilt from a teaching run's logged metrics.

    Args:
        records: the run's metric records (needs eval records with dev/error).
        num_steps: the run's length (iteration fraction).
        num_classes: C (loss normalisation).
        points: how many evenly spaced evaluation steps to return.

    Returns:
        ``[(step, s_t)]`` in the feature order of `l2t_jax.teachers.FEATURE_NAMES`.
    """
    evals = [r for r in records if "dev/error" in r and "train/accuracy" in r]
    picks = [evals[i] for i in np.linspace(0, len(evals) - 1, points).round().astype(int)]
    return [(r["step"], np.array([r["step"] / num_steps, 1 - r["train/accuracy"],
                                  r["train/cross_entropy"] / np.log(num_classes),
                                  r["dev/error"] / 100], np.float32)) for r in picks]


def plot_dlf_loss(teacher, params: dict, states: list[tuple[int, np.ndarray]], path: str,
                  title: str = "") -> None:
    """Draws an L2T-DLF teacher's loss: W_t heatmaps over training and loss vs p_y.

    Args:
        teacher: the `l2t_jax.teachers.DLFTeacher` structure.
        params: its (learned) parameters.
        states: ``[(step, s_t)]``, e.g. from `dlf_states_from_metrics`.
        path: where to write the PNG.
        title: figure title.
    """
    c = teacher.num_classes
    fig, axes = plt.subplots(1, len(states) + 1, figsize=(3.2 * (len(states) + 1) + 1, 3.4))
    # W_t - I: what the teacher changed from the untaught loss.
    matrices = [np.asarray(teacher.loss_parameters(params, jnp.asarray(s))[0]) - np.eye(c)
                for _, s in states]
    limit = max(max(np.abs(m).max() for m in matrices), 1e-6)
    for ax, (step, _), matrix in zip(axes, states, matrices):
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set(title=f"W_t - I at step {step}", xlabel="class (loss column)",
               ylabel="log p row")
    fig.colorbar(image, ax=axes[:-1], shrink=0.8)
    p_true = np.linspace(0.01, 0.99, 99)
    probs = np.full((len(p_true), c), 0.0) + ((1 - p_true) / (c - 1))[:, None]
    probs[:, 0] = p_true
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    ax = axes[-1]
    for step, s in states:
        per_example = jax.vmap(lambda row, s=s: teacher.loss(
            params, jnp.asarray(s), row[None], jnp.zeros(1, jnp.int32)))(logits)
        ax.plot(p_true, per_example, label=f"step {step}")
    ax.plot(p_true, -np.log(p_true) * 0.25, "k:", label="CE / 4")
    ax.set(xlabel="p_y (rest spread evenly)", ylabel="loss", title="loss vs p_y")
    ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
