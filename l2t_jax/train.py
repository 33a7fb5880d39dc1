"""The training driver: phases of outer steps, evaluation, checkpoints, metrics, progress.

The config's method (looked up by name in the registry, `l2t_jax.methods`) is built
into a plan of one or more phases, each resumable on its own in its own directory: for
example L2T-DLF's teacher episodes in ``workdir/teacher``, then the reported student in
``workdir``. The last phase trains the reported student, evaluated on dev and test; its
test error is the one at the step with the lowest dev error. A network with other
readings of its variables (`students.views`: a multi-branch student's gated ensemble) has
each evaluated beside it, at the same dev-selected step. The method then writes its own
files (learned losses, snapshots) and summary fields.

Nothing below this module knows about files, flags or logging, except what a method's
plan writes at its end.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from l2t_jax import checkpoint, data, engine, evaluation, methods, metrics, optimizers
from l2t_jax.errors import ConfigError
from l2t_jax.methods import Schedule
from l2t_jax.students import build_student, views

SUMMARY_FILE = "summary.json"
CONFIG_FILE = checkpoint.RUN_CONFIG_FILE


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks a whole experiment config before anything runs.

    Args:
        config: the experiment ConfigDict (see ``configs/``).

    Raises:
        ConfigError: one line naming the field and what to change.
    """
    methods.validate(config)
    data.validate_data_config(config.data)
    build_student(config.student, num_classes=2)  # raises on a bad name or depth
    optimizers.validate_optimizer_config(config.optimizer)
    engine.validate_engine_config(config.engine)
    train = config.train
    for field in ("num_steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
        if not (isinstance(train[field], int) and train[field] >= 1):
            raise ConfigError(f"config.train.{field} must be an integer >= 1, got {train[field]}")
    for field in ("eval_every", "checkpoint_every", "num_steps"):
        if train[field] % train.log_every:
            raise ConfigError(
                f"config.train.{field} ({train[field]}) must be a multiple of "
                f"config.train.log_every ({train.log_every})"
            )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the config's method, resuming each phase from its latest checkpoint.

    Args:
        config: the experiment ConfigDict.
        workdir: where checkpoints, ``metrics.jsonl``, TensorBoard events and
            ``summary.json`` are written (earlier phases in subdirectories).

    Returns:
        The summary (also written to ``workdir/summary.json``).
    """
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    splits = data.load_splits(config.data)
    if config.train.batch_size > len(splits.train.y):
        raise ConfigError(
            f"config.train.batch_size ({config.train.batch_size}) is larger than the train "
            f"split ({len(splits.train.y)} examples); lower it"
        )
    plan = methods.get(config.method).build(config, splits, jax.random.PRNGKey(config.seed))
    finished = {}
    for phase in plan.phases:
        raises = bool(phase.nonfinite_section
                      and config[phase.nonfinite_section].on_nonfinite == "raise")
        finished[phase.name], summary = run_phase(
            phase.loop, phase.init(finished), splits, os.path.join(workdir, phase.name),
            seed=config.seed, schedule=phase.schedule, nonfinite_raises=raises,
            nonfinite_section=phase.nonfinite_section)
    summary.update(plan.finish(finished, workdir, summary))
    summary = {
        "dataset": config.data.name,
        "noise": f"{config.data.noise_type}:{config.data.noise_rate}",
        "student": config.student.name,
        "num_classes": splits.num_classes,
        "method": config.method,
        "seed": config.seed,
        "steps": config.train.num_steps,
        **summary,
    }
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info(
        "done: test error %.2f%% at the best dev step %d (dev %.2f%%); final test %.2f%%",
        summary["test_error"], summary["best_step"], summary["best_dev_error"],
        summary["final_test_error"],
    )
    return summary


def run_phase(method: methods.OuterLoop, state, splits: data.Splits, workdir: str, *,
              seed: int, schedule: Schedule, nonfinite_raises: bool = False,
              nonfinite_section: str | None = None):
    """Runs outer steps until `schedule.num_steps`, resuming from `workdir`'s checkpoint.

    Args:
        method: the phase's loop (`methods.OuterLoop`; an `methods.EvaluatedLoop` if
            the schedule evaluates).
        state: the freshly initialised method state (also the restore template).
        splits: the data.
        workdir: the phase's directory.
        seed: data-order seed.
        schedule: lengths and intervals.
        nonfinite_raises: stop with an error when a teacher update was non-finite
            (otherwise such updates are skipped and counted in ``meta/nonfinite``).
        nonfinite_section: the config section the error names.

    Returns:
        ``(state, summary)``; the summary has the dev-selected test error when the
        schedule evaluates, else it is empty.
    """
    os.makedirs(workdir, exist_ok=True)
    evaluate = schedule.eval_every > 0
    full_state = {"method": state}
    if evaluate:
        full_state["best"] = {
            "dev_error": jnp.asarray(np.inf, jnp.float32),
            "test_error": jnp.asarray(np.nan, jnp.float32),
            "step": jnp.asarray(-1, jnp.int32),
            **{f"{name}_test_error": jnp.asarray(np.nan, jnp.float32)
               for name in views(method.model)},
        }
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    full_state, start_step = checkpointer.restore_or(full_state)
    if start_step:
        logging.info("resumed %s from the checkpoint at step %d", workdir, start_step)
    writer = metrics.MetricWriter(workdir, resume_step=start_step)
    progress = metrics.Progress(start_step, schedule.num_steps)
    outer_step = jax.jit(method.outer_step, donate_argnums=0)
    start_time = time.perf_counter()

    step = start_step
    while step < schedule.num_steps:
        batches = method.batches(splits, seed, step)
        full_state["method"], step_metrics = outer_step(full_state["method"], batches)
        step += method.steps_per_call
        scalars = {f"train/{k}" if "/" not in k else k: float(np.mean(v))
                   for k, v in step_metrics.items()}
        if not np.isfinite(scalars["train/loss"]):
            raise FloatingPointError(
                f"non-finite training loss at step {step}; lower "
                "config.optimizer.learning_rate or check the data"
            )
        if nonfinite_raises and scalars.get("meta/nonfinite", 0.0) > 0:
            raise FloatingPointError(
                f"non-finite meta-gradient at step {step} (the update was not applied); "
                f"lower config.{nonfinite_section}.learning_rate or set "
                f"config.{nonfinite_section}.on_nonfinite=skip"
            )
        is_eval_step = evaluate and (
            step % schedule.eval_every == 0 or step >= schedule.num_steps
        )
        if is_eval_step:
            scalars.update(_evaluate(method, full_state, splits, schedule, step))
        writer.write(step, scalars)
        progress.report(step, scalars, force=is_eval_step or not evaluate)
        if step % schedule.checkpoint_every == 0 or step >= schedule.num_steps:
            checkpointer.save(step, full_state)
    checkpointer.close()
    writer.close()
    if not evaluate:
        return full_state["method"], {}

    final = _evaluate_splits(method, full_state, splits, schedule.eval_batch_size)
    summary = {
        "final_dev_error": final["dev/error"],
        "final_test_error": final["test/error"],
        "best_dev_error": float(full_state["best"]["dev_error"]),
        "best_step": int(full_state["best"]["step"]),
        "test_error": float(full_state["best"]["test_error"]),
        "wall_seconds_this_run": time.perf_counter() - start_time,
    }
    for name in views(method.model):
        summary[f"{name}_test_error"] = float(full_state["best"][f"{name}_test_error"])
        summary[f"final_{name}_test_error"] = final[f"test/{name}_error"]
    return full_state["method"], summary


def _evaluate_splits(method, state: dict, splits: data.Splits, batch_size: int) -> dict:
    """Dev and test error (%) and loss of the method's current student (and the error
    of each of its views, as ``<split>/<view>_error``)."""
    student = method.student(state["method"])
    # One batch shape for both splits (the smaller one padded): one program per network.
    batch_size = min(batch_size, max(len(splits.dev.y), len(splits.test.y)))
    scalars = {}
    for split in ("dev", "test"):
        arrays = getattr(splits, split)
        result = evaluation.evaluate(method.model, student, arrays.x, arrays.y, batch_size)
        scalars.update({f"{split}/{k}": v for k, v in result.items()})
        for name, view in views(method.model).items():
            result = evaluation.evaluate(view, student, arrays.x, arrays.y, batch_size)
            scalars[f"{split}/{name}_error"] = result["error"]
    return scalars


def _evaluate(method, state: dict, splits: data.Splits, schedule: Schedule,
              step: int) -> dict:
    """Evaluates on dev and test and updates the dev-selected best record in `state`."""
    scalars = _evaluate_splits(method, state, splits, schedule.eval_batch_size)
    # Compared in float32, the checkpointed precision, so ties keep the earlier step.
    if np.float32(scalars["dev/error"]) < np.float32(state["best"]["dev_error"]):
        state["best"] = {
            "dev_error": jnp.asarray(scalars["dev/error"], jnp.float32),
            "test_error": jnp.asarray(scalars["test/error"], jnp.float32),
            "step": jnp.asarray(step, jnp.int32),
            **{f"{name}_test_error": jnp.asarray(scalars[f"test/{name}_error"], jnp.float32)
               for name in views(method.model)},
        }
    scalars["best/test_error_at_best_dev"] = float(state["best"]["test_error"])
    return scalars
