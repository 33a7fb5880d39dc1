"""Pictures of a run: training curves, and the loss an L2T-DLF teacher learned."""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from l2t_jax.engine import ModelOutput  # noqa: E402


def loss_axis_scale(values) -> str:
    """``"log"`` for positive losses; ``"symlog"`` when any is <= 0 (a learned loss, e.g.
    a DLN's, can go negative, and a log axis would silently drop those points)."""
    return "log" if np.all(np.asarray(values) > 0) else "symlog"


def plot_training_curves(records: list[dict], path: str, title: str = "") -> None:
    """Draws the train loss (the method's own: CE, the taught loss, the DLN's value),
    dev/test cross-entropy and dev/test error against the step and saves a PNG.

    Args:
        records: metric records as read by `l2t_jax.metrics.read_metrics`.
        path: where to write the PNG.
        title: figure title (e.g. the run's dataset and method).
    """
    fig, (loss_ax, error_ax) = plt.subplots(1, 2, figsize=(11, 4))
    train = [r for r in records if "train/loss" in r]
    loss_ax.plot([r["step"] for r in train], [r["train/loss"] for r in train], "C0",
                 label="train (the method's loss)")
    evals = [r for r in records if "dev/loss" in r]
    losses = [r["train/loss"] for r in train]
    steps = [r["step"] for r in evals]
    for split, color in (("dev", "C1"), ("test", "C2")):
        split_losses = [r[f"{split}/loss"] for r in evals]
        losses += split_losses
        loss_ax.plot(steps, split_losses, color, label=split)
        error_ax.plot(steps, [r[f"{split}/error"] for r in evals], color, label=split)
    best = [r for r in evals if "best/test_error_at_best_dev" in r]
    if best:
        error_ax.plot([r["step"] for r in best],
                      [r["best/test_error_at_best_dev"] for r in best],
                      "k--", lw=1, label="test at best dev")
    loss_ax.set(xlabel="student step", ylabel="loss (dev, test: cross-entropy)",
                yscale=loss_axis_scale(losses), title="loss")
    error_ax.set(xlabel="student step", ylabel="error (%)", title="error")
    for ax in (loss_ax, error_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_title(summary: dict) -> str:
    """``method | dataset (noise) | student`` from a run's summary; ``""`` without one."""
    if not summary:
        return ""
    return f"{summary['method']} | {summary['dataset']} ({summary['noise']}) | {summary['student']}"


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
    _plot_loss_vs_p_true(axes[-1], teacher, params, states)
    fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _plot_loss_vs_p_true(ax, teacher, params: dict, states: list[tuple[int, np.ndarray]]):
    """A state-feature teacher's loss of one example as a function of p_y, per state."""
    c = teacher.num_classes
    p_true = np.linspace(0.01, 0.99, 99)
    probs = np.full((len(p_true), c), 0.0) + ((1 - p_true) / (c - 1))[:, None]
    probs[:, 0] = p_true
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    for step, s in states:
        per_example = jax.vmap(lambda row, s=s: teacher.student_loss(
            params, jnp.asarray(s), ModelOutput(row[None]),
            {"y": jnp.zeros(1, jnp.int32)}))(logits)
        ax.plot(p_true, per_example, label=f"step {step}")
    ax.plot(p_true, -np.log(p_true) * 0.25, "k:", label="CE / 4")
    ax.set(xlabel="p_y (rest spread evenly)", ylabel="loss", title="loss vs p_y")
    ax.legend(fontsize=7)


def plot_weight_teacher(teacher, params: dict, states: list[tuple[int, np.ndarray]],
                        path: str, title: str = "", loss_curve: bool = True) -> None:
    """Draws a `teachers.WeightTeacher`: each loss weight over the run (one panel each,
    the untaught teacher's value dotted: the hand-set one, or ONE's teacher's start) and,
    for a family of the logits alone, the loss vs p_y.

    Args:
        teacher: the teacher's structure.
        params: its (learned) parameters.
        states: ``[(step, s_t)]``, e.g. from `dlf_states_from_metrics`.
        path: where to write the PNG.
        title: figure title.
        loss_curve: add the loss-vs-p_y panel (only for families that read nothing but
            the logits and labels; a distillation loss also reads the target model).
    """
    panels = len(teacher.names) + int(loss_curve)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels + 0.6, 3.4), squeeze=False)
    axes = axes[0]
    steps = [step for step, _ in states]
    weights = [teacher.weights(params, jnp.asarray(s)) for _, s in states]
    for ax, name, initial in zip(axes, teacher.names, teacher.initial):
        ax.plot(steps, [float(w[name]) for w in weights], "o-", label="learned")
        ax.axhline(initial, ls=":", color="k", label="untaught")
        ax.set(xlabel="student step", title=name)
        ax.legend(fontsize=7)
    if loss_curve:
        _plot_loss_vs_p_true(axes[-1], teacher, params, states)
    fig.suptitle("\n".join(filter(None, (title, "the final teacher at the run's states"))))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_dln_loss(dlns: list[tuple[int, dict]], records: list[dict], path: str,
                  title: str = "", grid_size: int = 41) -> None:
    """Draws an L2T-DLN run: the loss network's surface over training, and the teacher.

    Top row: the DLN's value on a 1-vs-1 row ``[s_y, s_j, 1, 0]`` as a heatmap over
    (sigmoid z_y, sigmoid z_j) in [0, 1]^2, one panel per snapshot (a loss that still
    teaches the right thing falls towards s_y = 1, s_j = 0). Bottom: the teacher's update
    magnitude ||phi' - phi|| per iteration (0 for updates the ``"proper"`` rule
    rejected), and the DLN's margin L(0, 1) - L(1, 0) (below zero: the loss prefers wrong
    answers) with, when recorded, its corner gap (above zero: the right answer is not the
    loss's minimum; `losses.dln.probe_dln`).

    Args:
        dlns: ``[(step, phi)]`` snapshots (`methods.dln.DLNTeaching.snapshot_steps`).
        records: the run's metric records.
        path: where to write the PNG.
        title: figure title.
        grid_size: points per axis of the surface.
    """
    from l2t_jax.losses import dln as dln_lib  # plots stay importable without the method

    axis = jnp.linspace(0.0, 1.0, grid_size)
    surfaces = [np.asarray(dln_lib.pair_surface(phi, axis[:, None], axis[None, :]))
                for _, phi in dlns]
    fig = plt.figure(figsize=(3.0 * len(dlns) + 1, 6.4))
    grid = fig.add_gridspec(2, len(dlns))
    for i, ((step, _), surface) in enumerate(zip(dlns, surfaces)):
        ax = fig.add_subplot(grid[0, i])
        # Each panel on its own colour scale: the shape matters, and scales can differ a lot.
        image = ax.imshow(surface, origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
        ax.set(title=f"step {step}", xlabel="s_j (wrong class)",
               ylabel="s_y (true class)" if i == 0 else None)
        fig.colorbar(image, ax=ax, shrink=0.7)
    half = max(1, len(dlns) // 2)
    teacher_records = [r for r in records if "teacher/update_norm" in r]
    steps = [r["step"] for r in teacher_records]
    panels = ((("teacher/update_norm", "||phi' - phi||"),),
              (("dln/margin", "margin L(0,1) - L(1,0)"), ("dln/corner_gap", "corner gap")))
    for column, (lines, title_) in enumerate(zip(panels, ("teacher update", "DLN health"))):
        ax = fig.add_subplot(grid[1, column * half:(column + 1) * half or None])
        for key, label in lines:
            if teacher_records and key in teacher_records[0]:
                ax.plot(steps, [r[key] for r in teacher_records], lw=0.8, label=label)
        if column == 1:
            ax.axhline(0.0, color="k", lw=0.6, ls=":")
        ax.legend(loc="best", fontsize=8)
        ax.set(xlabel="student step", title=title_)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_moonshine(records: list[dict], path: str) -> None:
    """Draws the Moonshine trade-off: test error against the student's parameters, one
    panel per (dataset, noise), cheap students alone and with AT + KD.

    Args:
        records: results records; those of rows ``ms-<block>`` and ``ms-<block>-at-kd``
            (with ``conv``, ``params``, ``mean``, ``std``) are drawn.
        path: where to write the PNG.
    """
    cheap = [r for r in records if r["method"].startswith("ms-")]
    settings = list(dict.fromkeys((r["dataset"], r["noise"]) for r in cheap))
    fig, axes = plt.subplots(1, len(settings), figsize=(5.0 * len(settings), 3.8),
                             squeeze=False)
    for ax, (dataset, noise) in zip(axes[0], settings):
        here = [r for r in cheap if (r["dataset"], r["noise"]) == (dataset, noise)]
        for distilled, label, marker in ((False, "alone (CE)", "o"), (True, "AT + KD", "s")):
            points = sorted((r for r in here if r["method"].endswith("-at-kd") == distilled),
                            key=lambda r: r["params"])
            if not points:
                continue
            ax.errorbar([r["params"] for r in points], [r["mean"] for r in points],
                        yerr=[r["std"] for r in points], marker=marker, capsize=3,
                        label=label)
            for r in points:
                ax.annotate(r["conv"], (r["params"], r["mean"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        sizes = [r["params"] for r in here]
        # A log axis only where the sizes span a decade; else its ticks crowd.
        ax.set(xscale="log" if max(sizes) > 10 * min(sizes) else "linear",
               xlabel="student parameters", ylabel="test error (%)",
               title=f"{dataset}, noise {noise}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Moonshine cheap-convolution students: error vs size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# Colours of the results pictures' bars, by what a row's loss is (`launch.results`).
KIND_COLORS = {"cross-entropy": "0.55", "hand-set": "C1", "learned": "C0", "other": "C2"}
KIND_LABELS = {"cross-entropy": "cross-entropy", "hand-set": "hand-set or frozen loss",
               "learned": "learned loss (taught)", "other": "target model / other"}


def _result_bars(ax, rows: list[tuple[str, dict]], kinds: dict[str, str],
                 values: bool = False) -> None:
    """Horizontal bars, top to bottom: a record's mean test error, +- its std, its seeds
    as dots, coloured by `kinds` (method -> a key of `KIND_COLORS`); `values` writes the
    mean +- std beside each bar."""
    counts = [len(r["seeds"]) for _, r in rows]
    usual = max(set(counts), key=counts.count)  # as the tables: the most common count
    for i, (_, r) in enumerate(rows):
        kind = kinds.get(r["method"], "other")
        ax.barh(i, r["mean"], xerr=r["std"], color=KIND_COLORS[kind], alpha=0.85,
                error_kw=dict(lw=1, capsize=2), label=KIND_LABELS[kind])
        errors = r.get("test_error", [])
        ax.plot(errors, [i] * len(errors), "k.", ms=2.5, alpha=0.5)
        if values:
            ax.annotate(f"{r['mean']:.2f} +- {r['std']:.2f}",
                        (max([r["mean"] + r["std"], *errors]), i), fontsize=7,
                        va="center", textcoords="offset points", xytext=(4, 0))
    labels = [label + (f" [{len(r['seeds'])} seeds]" if len(r["seeds"]) != usual else "")
              + (" (--set)" if r.get("overrides") else "") for label, r in rows]
    ax.set_yticks(range(len(rows)), labels=labels, fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # the first row on top
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)


def _kind_legend(owner, axes, **kwargs) -> None:
    """One legend entry per bar colour used in `axes`, drawn by `owner` (an axis or the
    figure)."""
    unique = {}
    for ax in axes:
        handles, names = ax.get_legend_handles_labels()
        unique.update(zip(names, handles))
    owner.legend(unique.values(), unique.keys(), fontsize=7, **kwargs)


def plot_results(records: list[dict], path: str, title: str, kinds: dict[str, str],
                 num_first: int = 0) -> None:
    """Draws one results file's records (one setting: dataset x noise) as horizontal
    bars, mean +- std test error per method with its seeds as dots, in the given order.

    Args:
        records: results records (``method``, ``seeds``, ``test_error``, ``mean``,
            ``std``) in the order to draw them, top to bottom.
        path: where to write the PNG.
        title: the figure's title.
        kinds: method -> ``"cross-entropy"``, ``"learned"``, ``"hand-set"`` or
            ``"other"`` (the bar's colour).
        num_first: a dashed line separates the first this many rows (the headline
            methods) from the rest; 0: none.
    """
    fig, ax = plt.subplots(figsize=(8.0, 1.4 + 0.24 * len(records)))
    _result_bars(ax, [(r["method"], r) for r in records], kinds)
    if 0 < num_first < len(records):
        ax.axhline(num_first - 0.5, color="k", ls="--", lw=0.8)
    ax.set(xlabel="test error (%): bar mean +- std, dots seeds", title=title)
    _kind_legend(ax, [ax], loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_headline(panels: list[tuple[str, list[tuple[str, dict]]]], path: str, title: str,
                  kinds: dict[str, str], columns: int = 2) -> None:
    """Draws the headline: one panel per setting, a bar per method (mean +- std test
    error, seeds as dots, the values written beside the bars).

    Args:
        panels: ``[(setting title, [(bar label, record), ...]), ...]``.
        path: where to write the PNG.
        title: the figure's title.
        kinds: method -> kind, as in `plot_results`.
        columns: panels per row.
    """
    rows = -(-len(panels) // columns)
    bars = max(len(bars) for _, bars in panels)
    fig, axes = plt.subplots(rows, columns, figsize=(6.0 * columns, rows * (1.0 + 0.3 * bars)),
                             squeeze=False)
    for ax, (setting, bars) in zip(axes.flat, panels):
        _result_bars(ax, bars, kinds, values=True)
        ax.set_title(setting, fontsize=10)
        ax.set_xlim(right=ax.get_xlim()[1] * 1.25)  # room for the values
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    _kind_legend(fig, axes.flat, loc="lower center", ncol=len(KIND_COLORS))
    for ax in axes[-1]:
        ax.set_xlabel("test error (%)")
    fig.suptitle(textwrap.fill(title, 110), fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str,
                         title: str, xlabel: str = "round") -> None:
    """Test accuracy against the step for several methods: mean over seeds, +- std band.

    Args:
        curves: label -> ``(steps (T,), test errors in percent (seeds, T))``.
        path: where to write the PNG.
        title: the figure's title.
        xlabel: what a step is.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (label, (steps, errors)) in enumerate(curves.items()):
        accuracy = 100.0 - np.asarray(errors)
        mean, std = accuracy.mean(axis=0), accuracy.std(axis=0)
        ax.plot(steps, mean, f"C{index}", label=f"{label} ({len(accuracy)} seeds)")
        ax.fill_between(steps, mean - std, mean + std, color=f"C{index}", alpha=0.2)
    ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_clients(label_counts: np.ndarray, path: str, title: str) -> None:
    """Each client's examples by label, as stacked bars (a federated partition).

    Args:
        label_counts: (N, C) examples of each label per client.
        path: where to write the PNG.
        title: the figure's title.
    """
    label_counts = np.asarray(label_counts)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(label_counts)), 4))
    bottom = np.zeros(len(label_counts))
    cmap = plt.get_cmap("tab10" if label_counts.shape[1] <= 10 else "tab20")
    for label in range(label_counts.shape[1]):
        ax.bar(np.arange(len(label_counts)), label_counts[:, label], bottom=bottom,
               color=cmap(label % cmap.N), label=str(label))
        bottom += label_counts[:, label]
    ax.set(xlabel="client", ylabel="examples", title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(title="label", ncol=2, fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
