"""The training driver: phases of outer steps, evaluation, checkpoints, metrics, progress.

A run has one or two phases, each resumable on its own:

1. ``teacher`` (L2T-DLF with ``teacher.num_episodes`` > 0): episodes of T student steps,
   one teacher update each, in ``workdir/teacher``.
2. ``student``: the reported student trained for ``train.num_steps`` steps (on CE, or
   under the taught or untaught teacher), evaluated on dev and test; the test error is
   the one at the step with the lowest dev error. Written to ``workdir``.

Nothing below this module knows about files, flags or logging.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from l2t_jax import checkpoint, data, engine, evaluation, methods, metrics, optimizers
from l2t_jax.errors import ConfigError
from l2t_jax.losses import dln as dln_lib
from l2t_jax.students import build_student

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
TEACHER_DIR = "teacher"
TEACHER_PARAMS_FILE = "teacher_params.npz"
DLN_PARAMS_FILE = "dln_params.npz"
DLN_SNAPSHOTS_FILE = "dln_snapshots.npz"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks a whole experiment config before anything runs.

    Args:
        config: the experiment ConfigDict (see ``configs/``).

    Raises:
        ConfigError: one line naming the field and what to change.
    """
    methods.validate_method_config(config)
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


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When a phase logs, evaluates and checkpoints (all in inner student steps).

    Attributes:
        num_steps: the phase's length.
        eval_every: evaluate on dev and test this often (0: never; metrics come from
            the method's outer step only).
        checkpoint_every: save a checkpoint this often (and at the end).
        eval_batch_size: examples per evaluation forward pass.
    """

    num_steps: int
    eval_every: int
    checkpoint_every: int
    eval_batch_size: int = 1000


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the config's method, resuming each phase from its latest checkpoint.

    Args:
        config: the experiment ConfigDict.
        workdir: where checkpoints, ``metrics.jsonl``, TensorBoard events and
            ``summary.json`` are written (the teacher phase in ``workdir/teacher``).

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
    rng = jax.random.PRNGKey(config.seed)
    teacher_rng, student_rng = jax.random.split(rng)

    teacher_params = None  # CE: the loss has nothing for a teacher to set
    # The demo's set-up (teacher.pretrain_steps > 0): the teacher's episodes and, for every
    # method alike, the reported student start from one CE-pretrained student.
    teacher_cfg = config.get("teacher")
    episodes = bool(config.method == "l2t-dlf" and teacher_cfg and teacher_cfg.num_episodes)
    pretrain = bool(teacher_cfg and teacher_cfg.pretrain_steps)
    episodic = methods.build_episodic(config, splits) if episodes or pretrain else None
    start = taught_start = None
    if pretrain:
        start = episodic.pretrained_start(student_rng, splits, config.seed)
        # The taught student is one, on one device; copied before the episodes donate
        # (and so delete) the start's buffers.
        taught_start = jax.device_get(episodic.population.first(start))
    if episodes:
        t = config.teacher
        state, _ = run_phase(
            episodic, episodic.init(teacher_rng, splits, start), splits,
            os.path.join(workdir, TEACHER_DIR), seed=config.seed,
            schedule=Schedule(t.num_episodes * t.episode_steps, eval_every=0,
                              checkpoint_every=t.checkpoint_every * t.episode_steps),
            nonfinite_raises=t.on_nonfinite == "raise",
        )
        # To the host: the teaching phase trains one student on one device, whatever
        # mesh the episodes used (mixed placements would not restore into one jit).
        teacher_params = jax.device_get(state["teacher"])
    elif config.method != "ce":  # untaught, taught online, or a DLN to start from
        teacher_params = methods.initial_loss_params(config, splits.num_classes, teacher_rng)

    teaching = methods.build_teaching(config, splits)
    if taught_start is None:
        initial = teaching.init(student_rng, splits, teacher_params)
    else:  # only L2T-DLF configs pre-train
        initial = teaching.init(student_rng, splits, teacher_params, start=taught_start)
    train_cfg = config.train
    state, summary = run_phase(
        teaching, initial, splits, workdir,
        seed=config.seed,
        schedule=Schedule(train_cfg.num_steps, train_cfg.eval_every,
                          train_cfg.checkpoint_every, train_cfg.eval_batch_size),
        nonfinite_raises=_nonfinite_raises(config),
    )
    if teacher_params is not None:
        save_params(state["teacher"], os.path.join(workdir, TEACHER_PARAMS_FILE))
    if config.method == "l2t-dln":
        summary.update(_save_dln(teaching, state, workdir, summary))
    summary = {
        "dataset": config.data.name,
        "noise": f"{config.data.noise_type}:{config.data.noise_rate}",
        "student": config.student.name,
        "method": config.method,
        "seed": config.seed,
        "steps": train_cfg.num_steps,
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


def run_phase(method, state, splits: data.Splits, workdir: str, *, seed: int,
              schedule: Schedule, nonfinite_raises: bool = False):
    """Runs outer steps until `schedule.num_steps`, resuming from `workdir`'s checkpoint.

    Args:
        method: has ``batches(splits, seed, step)``, ``outer_step(state, batches)``,
            ``steps_per_call`` and, if the schedule evaluates, ``student(state)`` and
            ``model``.
        state: the freshly initialised method state (also the restore template).
        splits: the data.
        workdir: the phase's directory.
        seed: data-order seed.
        schedule: lengths and intervals.
        nonfinite_raises: stop with an error when a teacher update was non-finite
            (otherwise such updates are skipped and counted in ``meta/nonfinite``).

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
                "lower config.teacher.learning_rate or set config.teacher.on_nonfinite=skip"
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
    return full_state["method"], summary


def _nonfinite_raises(config) -> bool:
    """Whether the config asks to stop on a non-finite meta-gradient."""
    section = methods.teacher_section(config)
    return section is not None and config[section].on_nonfinite == "raise"


def save_params(params, path: str) -> None:
    """Writes a parameter pytree of nested dicts to ``.npz`` (keys joined by ``/``)."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    np.savez(path, **flat)


def load_params(path: str) -> dict:
    """Reads what `save_params` wrote, as nested dicts of numpy arrays."""
    with np.load(path) as f:
        return traverse_util.unflatten_dict(dict(f), sep="/")


# A run whose final dev error is this many points above its best one is reported as
# collapsed (the learned loss misled the student late in the run).
COLLAPSE_POINTS = 10.0


def _save_dln(method: methods.DLNTeaching, state: dict, workdir: str,
              summary: dict) -> dict:
    """Writes the final DLN and its snapshots; returns the DLN's health and collapse flags.

    Flags (also logged as warnings): ``dln_inverted`` (the final DLN rates a confident
    wrong answer no worse than a confident right one), ``dln_improper`` (the right answer
    is not the final DLN's minimum: corner gap above the method's ``proper_tolerance``,
    so the student can lower its loss by answering wrong), ``dln_scale_growth`` (the final
    DLN's spread over its initial one: a large value means the teacher inflated the loss,
    i.e. the student's step size), ``collapsed`` (final dev error more than
    `COLLAPSE_POINTS` above the best).
    """
    save_params(state["dln"], os.path.join(workdir, DLN_PARAMS_FILE))
    np.savez(os.path.join(workdir, DLN_SNAPSHOTS_FILE),
             snapshots=np.asarray(state["snapshots"]), steps=np.asarray(method.snapshot_steps()))
    probe = {k: float(v) for k, v in dln_lib.probe_dln(state["dln"]).items()}
    unravel = jax.flatten_util.ravel_pytree(state["dln"])[1]
    initial = float(dln_lib.probe_dln(unravel(state["snapshots"][0]))["spread"])
    flags = {
        "dln_inverted": probe["margin"] <= 0,
        "dln_improper": probe["corner_gap"] > method.proper_tolerance,
        "dln_scale_growth": probe["spread"] / initial,
        "collapsed": summary["final_dev_error"] - summary["best_dev_error"] > COLLAPSE_POINTS,
    }
    if flags["dln_inverted"]:
        logging.warning("the learned DLN is inverted (margin %.3g): it rates a confident "
                        "wrong answer no worse than a confident right one", probe["margin"])
    if flags["dln_improper"]:
        logging.warning("the learned DLN is improper (corner gap %.3g): its minimum is not "
                        "at the right answer", probe["corner_gap"])
    if flags["collapsed"]:
        logging.warning(
            "the student collapsed: final dev error %.2f%% vs best %.2f%% (DLN scale x%.3g); "
            "see dln/spread and dev/error in metrics.jsonl", summary["final_dev_error"],
            summary["best_dev_error"], flags["dln_scale_growth"])
    return {**{f"dln_final_{k}": v for k, v in probe.items()}, **flags}


def _evaluate_splits(method, state: dict, splits: data.Splits, batch_size: int) -> dict:
    """Dev and test error (%) and loss of the method's current student."""
    student = method.student(state["method"])
    scalars = {}
    for split in ("dev", "test"):
        arrays = getattr(splits, split)
        result = evaluation.evaluate(method.model, student, arrays.x, arrays.y, batch_size)
        scalars.update({f"{split}/{k}": v for k, v in result.items()})
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
        }
    scalars["best/test_error_at_best_dev"] = float(state["best"]["test_error"])
    return scalars
