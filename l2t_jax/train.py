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

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from l2t_jax import checkpoint, data, engine, evaluation, mesh, methods, metrics, optimizers
from l2t_jax import config_checks as checks
from l2t_jax import workdir as run_workdir
from l2t_jax.errors import ConfigError, DivergenceError
from l2t_jax.methods import Schedule
from l2t_jax.students import build_student, views

SUMMARY_FILE = run_workdir.SUMMARY_FILE
# A phase's orbax checkpoints, in its directory.
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = run_workdir.CONFIG_FILE
# The summary field counting teacher updates skipped as non-finite (all phases).
SKIPPED_FIELD = "nonfinite_teacher_updates_skipped"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks a whole experiment config before anything runs.

    The top-level sections must be the common ones or those of a registered method
    (a config file may carry the sections of the other methods it is run with). Each
    section is then checked by the module that reads it, the method's sections last.

    Args:
        config: the experiment ConfigDict (see ``configs/``).

    Raises:
        ConfigError: one line naming the field and what to change.
    """
    known = {"method", "seed", "data", "student", "optimizer", "engine", "train", "mesh"}
    known.update(section for name in methods.names() for section in methods.get(name).sections)
    unknown = sorted(set(config.keys()) - known)
    if unknown:
        raise ConfigError(f"config.{unknown[0]} is not a config section of any method; "
                          f"remove it or fix its name (known: {', '.join(sorted(known))})")
    methods.get(config.method)  # raises on an unknown method
    data.validate_data_config(config.data)
    train = config.train
    checks.check_fields([
        checks.integer("config.seed", config.seed, minimum=0, maximum=2**32 - 1,
                       note=" (a 32-bit PRNG seed)"),
        *(checks.integer(f"config.train.{field}", train[field]) for field in (
            "num_steps", "log_every", "eval_every", "checkpoint_every", "eval_batch_size")),
        checks.integer("config.train.batch_size", train.batch_size,
                       maximum=data.split_sizes(config.data)["train"],
                       note=" (the train split: the dataset's, less config.data.dev_size)"),
        checks.number("config.train.max_cross_entropy", train.get("max_cross_entropy"),
                      above=0, note=" (nats; the student has diverged above it)"),
        checks.number("config.train.max_growth", train.get("max_growth"), above=1,
                      note=" (a logged value this many times its first has exploded)"),
    ])
    build_student(config.student, num_classes=2)  # raises on a bad field
    optimizers.validate_optimizer_config(config.optimizer)
    engine.validate_engine_config(config.engine)
    methods.validate(config)  # a method's stricter multiples (an L2T-DLN iteration) first
    for field in ("eval_every", "checkpoint_every", "num_steps"):
        if train[field] % train.log_every:
            raise ConfigError(
                f"config.train.{field} ({train[field]}) must be a multiple of "
                f"config.train.log_every ({train.log_every})"
            )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict:
    """Runs the config's method, resuming each phase from its latest checkpoint.

    Args:
        config: the experiment ConfigDict.
        workdir: where checkpoints, ``metrics.jsonl``, TensorBoard events and
            ``summary.json`` are written (earlier phases in subdirectories).
        allow_config_change: resume a workdir made by another config (see
            `l2t_jax.workdir.check`); otherwise such a workdir is refused.

    Returns:
        The summary (also written to ``workdir/summary.json``). In a multi-host run
        process 0 writes the run's files and its summary alone has the method's own
        fields (`methods.Plan.finish`).

    Raises:
        ConfigError: a bad config, or a workdir of another config (before anything is
            written).
        DivergenceError: the run diverged (see `check_health`).
    """
    validate_config(config)
    run_workdir.check(workdir, config, allow_config_change)
    splits = data.load_splits(config.data)
    plan = methods.get(config.method).build(config, splits, jax.random.PRNGKey(config.seed))
    run_workdir.record(workdir, config)
    logging.info("config:\n%s", config)  # after every check: a bad input is one line
    finished, skipped = {}, {}
    for phase in plan.phases:
        health = Health(config.train.max_cross_entropy, config.train.max_growth,
                        phase.nonfinite_section,
                        bool(phase.nonfinite_section
                             and config[phase.nonfinite_section].on_nonfinite == "raise"))
        finished[phase.name], summary = run_phase(
            phase.loop, phase.init(finished), splits, os.path.join(workdir, phase.name),
            seed=config.seed, schedule=phase.schedule, health=health)
        if phase.nonfinite_section:
            skipped[phase.nonfinite_section] = (skipped.get(phase.nonfinite_section, 0)
                                                + summary.pop(SKIPPED_FIELD))
    # Whole host copies (gathered from every process of a multi-host run), so that the
    # method's outputs are written by one process without collectives.
    finished = mesh.to_host(finished)
    if run_workdir.is_writer():
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
    if skipped:
        summary[SKIPPED_FIELD] = sum(skipped.values())
    if run_workdir.is_writer():
        with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
    logging.info(
        "done: test error %.2f%% at the best dev step %d (dev %.2f%%); final test %.2f%%",
        summary["test_error"], summary["best_step"], summary["best_dev_error"],
        summary["final_test_error"],
    )
    for section, count in skipped.items():
        if count:  # the last line says so: the run did not go as configured
            logging.warning("%d teacher updates were non-finite and skipped "
                            "(config.%s.on_nonfinite=skip); see meta/nonfinite in %s",
                            count, section, metrics.METRICS_FILE)
    return summary


@dataclasses.dataclass(frozen=True)
class Health:
    """When a phase counts as diverged (see `check_health`).

    Attributes:
        max_cross_entropy: the student's mean train cross-entropy (nats) above which
            it has diverged (``config.train.max_cross_entropy``).
        max_growth: a logged value whose magnitude exceeds this many times its first
            logged magnitude (or 1, if larger) has exploded (``config.train.max_growth``):
            a loss teacher's parameters, the loss network's spread, any loss.
        nonfinite_section: the config section of the phase's teacher (named in errors);
            None: the phase has no teacher.
        nonfinite_raises: stop at a non-finite teacher update (``on_nonfinite="raise"``)
            instead of counting it as skipped.
    """

    max_cross_entropy: float = np.inf
    max_growth: float = np.inf
    nonfinite_section: str | None = None
    nonfinite_raises: bool = False


def check_health(scalars: dict, step: int, health: Health, first: dict) -> bool:
    """Checks one outer step's metrics for divergence.

    A skipped teacher update (``meta/nonfinite`` > 0) is allowed, unless the policy is
    ``raise``, and only the ``meta/`` values describing it may then be non-finite. Any
    other non-finite value, a train cross-entropy above ``health.max_cross_entropy``,
    or a value grown past ``health.max_growth`` times its first logged magnitude is
    divergence.

    Args:
        scalars: the step's metric values by name.
        step: the student step they belong to.
        health: the thresholds and the teacher's non-finite policy.
        first: each metric's first finite logged value (this step's are added).

    Returns:
        Whether the step skipped a non-finite teacher update.

    Raises:
        DivergenceError: in one line, naming the value, the step and what to change.
    """
    section = health.nonfinite_section
    skipped = scalars.get("meta/nonfinite", 0.0) > 0
    if skipped and health.nonfinite_raises:
        raise DivergenceError(
            f"non-finite teacher update at step {step} (not applied); lower "
            f"config.{section}'s learning rates and step sizes or set "
            f"config.{section}.on_nonfinite=skip")

    def remedy(name):
        if section is None or name.startswith(("train/", "dev/", "test/")):
            return "lower config.optimizer.learning_rate or check the data"
        return f"lower config.{section}'s learning rates and step sizes"

    for name, value in scalars.items():
        if skipped and name.startswith("meta/"):
            continue  # describes the update that was not applied
        if not np.isfinite(value):
            raise DivergenceError(f"diverged at step {step}: {name} is {value}; "
                                  f"{remedy(name)}")
        limit = health.max_growth * max(abs(first.setdefault(name, value)), 1.0)
        if abs(value) > limit:
            raise DivergenceError(
                f"diverged at step {step}: {name} is {value:.3g}, over "
                f"config.train.max_growth ({health.max_growth:g}) times its first value "
                f"({first[name]:.3g}); {remedy(name)}")
    cross_entropy = scalars.get("train/cross_entropy", 0.0)
    if cross_entropy > health.max_cross_entropy:
        raise DivergenceError(
            f"diverged at step {step}: the student's train cross-entropy is "
            f"{cross_entropy:.3g} nats, above config.train.max_cross_entropy "
            f"({health.max_cross_entropy:g}); {remedy('train/')}")
    return skipped


def run_phase(method: methods.OuterLoop, state, splits: data.Splits, workdir: str, *,
              seed: int, schedule: Schedule, health: Health = Health()):
    """Runs outer steps until `schedule.num_steps`, resuming from `workdir`'s checkpoint.

    Args:
        method: the phase's loop (`methods.OuterLoop`; an `methods.EvaluatedLoop` if
            the schedule evaluates).
        state: the freshly initialised method state (also the restore template).
        splits: the data.
        workdir: the phase's directory.
        seed: data-order seed.
        schedule: lengths and intervals.
        health: when the phase has diverged (`check_health`); a diverged step is
            written to the metrics, never to a checkpoint.

    Returns:
        ``(state, summary)``; the summary has the dev-selected test error when the
        schedule evaluates, and the number of skipped non-finite teacher updates
        (`SKIPPED_FIELD`) when the phase has a teacher.

    Raises:
        DivergenceError: the phase diverged.
    """
    os.makedirs(workdir, exist_ok=True)
    evaluate = schedule.eval_every > 0
    full_state = _checkpointed_state(method, state, evaluate)
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR))
    full_state, start_step, records = checkpointer.restore_or(full_state)
    if start_step:
        logging.info("resumed %s from the checkpoint at step %d", workdir, start_step)
    writer = metrics.MetricWriter(workdir, resume_step=start_step, records=records)
    progress = metrics.Progress(start_step, schedule.num_steps)
    outer_step = jax.jit(method.outer_step, donate_argnums=0)
    start_time = time.perf_counter()

    step = start_step
    first = {}  # each metric's first finite value, the scale its growth is measured from
    for record in writer.records:
        for name, value in record.items():
            if np.isfinite(value):
                first.setdefault(name, value)
    try:
        while step < schedule.num_steps:
            batches = method.batches(splits, seed, step)
            full_state["method"], step_metrics = outer_step(full_state["method"], batches)
            step += method.steps_per_call
            scalars = {f"train/{k}" if "/" not in k else k: float(np.mean(v))
                       for k, v in step_metrics.items()}
            try:
                check_health(scalars, step, health, first)
            except DivergenceError:
                writer.write(step, scalars)  # the diverged step, for the user to see
                raise
            is_eval_step = evaluate and (
                step % schedule.eval_every == 0 or step >= schedule.num_steps
            )
            if is_eval_step:
                scalars.update(_evaluate(method, full_state, splits, schedule, step))
            writer.write(step, scalars)
            progress.report(step, scalars, force=is_eval_step or not evaluate)
            if step % schedule.checkpoint_every == 0 or step >= schedule.num_steps:
                checkpointer.save(step, full_state, writer.records)
    finally:
        checkpointer.close()
        writer.close()
    summary = {}
    if health.nonfinite_section:
        summary[SKIPPED_FIELD] = sum(r.get("meta/nonfinite", 0.0) > 0 for r in writer.records)
    if not evaluate:
        return full_state["method"], summary

    final = _evaluate_splits(method, full_state, splits, schedule.eval_batch_size)
    summary.update({
        "final_dev_error": final["dev/error"],
        "final_test_error": final["test/error"],
        "best_dev_error": float(full_state["best"]["dev_error"]),
        "best_step": int(full_state["best"]["step"]),
        "test_error": float(full_state["best"]["test_error"]),
        "wall_seconds_this_run": time.perf_counter() - start_time,
    })
    for name in views(method.model):
        summary[f"{name}_test_error"] = float(full_state["best"][f"{name}_test_error"])
        summary[f"final_{name}_test_error"] = final[f"test/{name}_error"]
    return full_state["method"], summary


def _checkpointed_state(method: methods.OuterLoop, state, evaluate: bool) -> dict:
    """What a phase checkpoints: the method's state, and the dev-selected best record
    when the phase evaluates."""
    full_state = {"method": state}
    if evaluate:
        full_state["best"] = {
            "dev_error": jnp.asarray(np.inf, jnp.float32),
            "test_error": jnp.asarray(np.nan, jnp.float32),
            "step": jnp.asarray(-1, jnp.int32),
            **{f"{name}_test_error": jnp.asarray(np.nan, jnp.float32)
               for name in views(method.model)},
        }
    return full_state


def restore_final_state(config: ml_collections.ConfigDict, workdir: str,
                        splits: data.Splits):
    """The last phase's final state of the finished run of `config` in `workdir`.

    Restored from the run's verified orbax checkpoint at its last step (a damaged one is
    reported and moved aside, as on resume), into a template that the method's plan
    builds: nothing is trained.

    Args:
        config: the run's config (`l2t_jax.workdir.read_config`).
        workdir: the run's directory.
        splits: the run's data.

    Returns:
        ``(plan, state)``: the method's plan and its last phase's final state.

    Raises:
        ConfigError: the run has not finished, or its last checkpoint is not intact.
    """
    if not os.path.exists(os.path.join(workdir, SUMMARY_FILE)):
        raise ConfigError(f"{workdir} holds no finished run (no {SUMMARY_FILE}); finish "
                          "it with launch.train first")
    plan = methods.get(config.method).build(config, splits, jax.random.PRNGKey(config.seed))
    finished = {}
    for phase in plan.phases:  # templates: each phase's initial state from the earlier ones'
        finished[phase.name] = phase.init(finished)
    last = plan.phases[-1]
    checkpointer = checkpoint.Checkpointer(os.path.join(workdir, last.name, CHECKPOINT_DIR))
    try:
        template = _checkpointed_state(last.loop, finished[last.name],
                                       last.schedule.eval_every > 0)
        full_state, step, _ = checkpointer.restore_or(template)
    finally:
        checkpointer.close()
    if step != last.schedule.num_steps:
        raise ConfigError(f"the newest intact checkpoint in {workdir} is at step {step}, "
                          f"not the run's last ({last.schedule.num_steps}); rerun "
                          "launch.train on it to finish it")
    return plan, full_state["method"]


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
