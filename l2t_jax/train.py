"""The training driver: outer loop, evaluation, checkpoints, metrics, progress.

Nothing below this module knows about files, flags or logging.
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
from l2t_jax.students import build_student

SUMMARY_FILE = "summary.json"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks a whole experiment config before anything runs.

    Args:
        config: the experiment ConfigDict (see ``configs/ce_baseline.py``).

    Raises:
        ConfigError: one line naming the field and what to change.
    """
    if config.method not in methods.METHOD_NAMES:
        raise ConfigError(
            f"unknown config.method {config.method!r}; choose one of {methods.METHOD_NAMES}"
        )
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


def _initial_best() -> dict:
    return {
        "dev_error": jnp.asarray(np.inf, jnp.float32),
        "test_error": jnp.asarray(np.nan, jnp.float32),
        "step": jnp.asarray(-1, jnp.int32),
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains as the config says, resuming from the latest checkpoint in `workdir`.

    Evaluates on dev and test every ``train.eval_every`` steps; the reported test error
    is the one at the step with the lowest dev error (selection on dev only).

    Args:
        config: the experiment ConfigDict.
        workdir: where checkpoints, ``metrics.jsonl``, TensorBoard events and
            ``summary.json`` are written.

    Returns:
        The summary (also written to ``workdir/summary.json``).
    """
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    splits = data.load_splits(config.data)
    method = methods.build_method(config, splits)
    train_cfg = config.train
    if train_cfg.batch_size > len(splits.train.y):
        raise ConfigError(
            f"config.train.batch_size ({train_cfg.batch_size}) is larger than the train "
            f"split ({len(splits.train.y)} examples); lower it"
        )

    state = {
        "method": method.init(jax.random.PRNGKey(config.seed), splits.train.x[:1]),
        "best": _initial_best(),
    }
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    state, start_step = checkpointer.restore_or(state)
    if start_step:
        logging.info("resumed from the checkpoint at step %d", start_step)
    writer = metrics.MetricWriter(workdir, resume_step=start_step)
    progress = metrics.Progress(start_step, train_cfg.num_steps)
    outer_step = jax.jit(method.outer_step, donate_argnums=0)
    start_time = time.perf_counter()

    step = start_step
    while step < train_cfg.num_steps:
        batches = data.stacked_batches(
            splits.train, seed=config.seed, start_step=step,
            num_steps=method.steps_per_call, batch_size=train_cfg.batch_size,
        )
        state["method"], step_metrics = outer_step(state["method"], batches)
        step += method.steps_per_call
        scalars = {f"train/{k}": float(np.mean(v)) for k, v in step_metrics.items()}
        if not np.isfinite(scalars["train/loss"]):
            raise FloatingPointError(
                f"non-finite training loss at step {step}; lower "
                "config.optimizer.learning_rate or check the data"
            )
        is_eval_step = step % train_cfg.eval_every == 0 or step == train_cfg.num_steps
        if is_eval_step:
            scalars.update(_evaluate(method, state, splits, train_cfg, step))
        writer.write(step, scalars)
        progress.report(step, scalars, force=is_eval_step)
        if step % train_cfg.checkpoint_every == 0 or step == train_cfg.num_steps:
            checkpointer.save(step, state)
    checkpointer.close()
    writer.close()

    final = _evaluate_splits(method, state, splits, train_cfg.eval_batch_size)
    summary = {
        "dataset": config.data.name,
        "noise": f"{config.data.noise_type}:{config.data.noise_rate}",
        "student": config.student.name,
        "method": config.method,
        "seed": config.seed,
        "steps": train_cfg.num_steps,
        "final_dev_error": final["dev/error"],
        "final_test_error": final["test/error"],
        "best_dev_error": float(state["best"]["dev_error"]),
        "best_step": int(state["best"]["step"]),
        "test_error": float(state["best"]["test_error"]),
        "wall_seconds_this_run": time.perf_counter() - start_time,
    }
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info(
        "done: test error %.2f%% at the best dev step %d (dev %.2f%%); final test %.2f%%",
        summary["test_error"], summary["best_step"], summary["best_dev_error"],
        summary["final_test_error"],
    )
    return summary


def _evaluate_splits(method, state: dict, splits: data.Splits, batch_size: int) -> dict:
    """Dev and test error (%) and loss of the method's current student."""
    student = method.student(state["method"])
    scalars = {}
    for split in ("dev", "test"):
        arrays = getattr(splits, split)
        result = evaluation.evaluate(method.model, student, arrays.x, arrays.y, batch_size)
        scalars.update({f"{split}/{k}": v for k, v in result.items()})
    return scalars


def _evaluate(method, state: dict, splits: data.Splits, train_cfg, step: int) -> dict:
    """Evaluates on dev and test and updates the dev-selected best record in `state`."""
    scalars = _evaluate_splits(method, state, splits, train_cfg.eval_batch_size)
    # Compared in float32, the checkpointed precision, so ties keep the earlier step.
    if np.float32(scalars["dev/error"]) < np.float32(state["best"]["dev_error"]):
        state["best"] = {
            "dev_error": jnp.asarray(scalars["dev/error"], jnp.float32),
            "test_error": jnp.asarray(scalars["test/error"], jnp.float32),
            "step": jnp.asarray(step, jnp.int32),
        }
    scalars["best/test_error_at_best_dev"] = float(state["best"]["test_error"])
    return scalars
