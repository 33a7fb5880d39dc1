"""Training a student under a (fixed or still-learning) teacher; CE is the no-teacher case."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from l2t_jax import data, engine, objectives, parallel

# Builds the step's stats update from the dev arrays of a call, or None.
StatsBuilder = Callable[[jax.Array, jax.Array], engine.StatsFn]


@dataclasses.dataclass(frozen=True)
class TeacherUpdate:
    """How a teacher learns: estimator, optimizer, dev objective, non-finite policy.

    Attributes:
        estimator: the meta-gradient estimator (`engine.FullBackprop` etc.).
        tx: the teacher's optax optimizer.
        objective: dev objective name (`objectives.DEV_OBJECTIVES`).
        sharpness: k of the smoothed error.
        on_nonfinite: ``"skip"`` (drop the update, count it) or ``"raise"`` (the driver
            stops with an error); in both cases a non-finite gradient never reaches the
            teacher's parameters.
    """

    estimator: engine.Estimator
    tx: optax.GradientTransformation
    objective: str = "smoothed_error"
    sharpness: float = 50.0
    on_nonfinite: str = "skip"

    def dev_objective_fn(self, model: nn.Module, dev: dict) -> engine.Objective:
        """The objective of a trained student on the dev arrays ``dev["x"], dev["y"]``."""

        def objective(meta_params, final: engine.StudentState):
            del meta_params
            logits, _ = engine.apply_student(
                model, final.params, final.model_state, dev["x"], train=False
            )
            error = (logits.argmax(-1) != dev["y"]).mean()
            value = objectives.dev_objective(self.objective, logits, dev["y"], self.sharpness)
            return value, {"dev_error": error}

        return objective

    def apply(self, teacher: Any, opt_state: Any, result: engine.MetaGradient):
        """One guarded teacher step from a meta-gradient.

        Args:
            teacher: the teacher's parameters.
            opt_state: its optimizer state.
            result: the meta-gradient; from a population (`parallel.PopulationEstimator`)
                its ``aux["dev_error"]`` is per student, (P,), and is reported averaged.

        Returns:
            ``(teacher, opt_state, metrics)``; the update is skipped (both unchanged)
            when the gradient or the objective is not finite.
        """
        leaves = jax.tree_util.tree_leaves(result.grad) + [result.value]
        finite = jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]))
        updates, new_opt_state = self.tx.update(result.grad, opt_state, teacher)
        new_teacher = optax.apply_updates(teacher, updates)

        def keep_if_finite(new, old):
            return jax.tree_util.tree_map(lambda n, o: jax.numpy.where(finite, n, o), new, old)

        metrics = {
            "meta/objective": result.value,
            "meta/grad_norm": optax.tree.norm(result.grad),
            "meta/nonfinite": 1.0 - finite.astype(np.float32),
            "meta/dev_error": 100.0 * jax.numpy.mean(result.aux["dev_error"]),
        }
        return (keep_if_finite(new_teacher, teacher), keep_if_finite(new_opt_state, opt_state),
                metrics)


@dataclasses.dataclass(frozen=True)
class Teaching:
    """A student trained `steps_per_call` steps per outer step under ``loss_fn``.

    The state is ``{"student": StudentState, "teacher": meta_params, "teacher_opt":
    optimizer state}``. With `teacher_update` the teacher keeps learning while the student
    trains: after each call, the meta-gradient of the dev objective through that call's
    steps (the student's start stop-gradiented: truncated backprop) updates it.

    Attributes:
        model: the Flax student.
        tx: the student's optimizer.
        loss_fn: ``loss_fn(meta_params, logits, labels, state)``.
        augment: augmentation kind (`l2t_jax.data.augment_batch`).
        steps_per_call: inner steps per outer step.
        batch_size: training batch size.
        stats_builder: builds the step's stats update from dev arrays, or None.
        initial_stats: the student's initial stats (``{}`` without a builder).
        teacher_update: set to keep the teacher learning; None for a fixed teacher.
        feature_dev_size: dev examples fed to the stats (dev-error feature).
    """

    model: nn.Module
    tx: optax.GradientTransformation
    loss_fn: engine.LossFn
    augment: str
    steps_per_call: int
    batch_size: int
    stats_builder: StatsBuilder | None = None
    initial_stats: Any = None
    teacher_update: TeacherUpdate | None = None
    feature_dev_size: int = 512

    def init(self, rng: jax.Array, splits: data.Splits, teacher: Any = None,
             start: engine.StudentState | None = None) -> dict:
        """A fresh student (from `rng`) with the given teacher parameters.

        With `start` (a pre-trained student) the student takes its parameters and model
        state; its optimizer, step and stats are this phase's fresh ones.
        """
        student = engine.init_student_state(
            self.model, self.tx, rng, splits.train.x[:1], self.initial_stats
        )
        if start is not None:
            student = student.replace(params=start.params, model_state=start.model_state)
        opt_state = self.teacher_update.tx.init(teacher) if self.teacher_update else None
        return {"student": student, "teacher": teacher, "teacher_opt": opt_state}

    def batches(self, splits: data.Splits, seed: int, start_step: int,
                population: parallel.Population = parallel.SINGLE_STUDENT) -> dict:
        """The training batches of one call and the dev arrays it reads.

        Args:
            splits: the data.
            seed: data-order seed.
            start_step: the call's first student step.
            population: for methods that train a population with this step: then
                ``"train"`` is stacked per member, (P, T, B, ...) (`parallel.Population.
                batches`); the default is this phase's single student, (T, B, ...).

        Returns:
            ``{"train", "feature_dev" (with a stats builder), "dev" (while teaching)}``.
        """
        batches = {"train": population.batches(
            splits.train, seed, start_step=start_step, num_steps=self.steps_per_call,
            batch_size=self.batch_size)}
        if self.stats_builder is not None:
            batches["feature_dev"] = {"x": splits.meta_dev.x[: self.feature_dev_size],
                                      "y": splits.meta_dev.y[: self.feature_dev_size]}
        if self.teacher_update is not None:
            batches["dev"] = {"x": splits.meta_dev.x, "y": splits.meta_dev.y}
        return batches

    def step_fn(self, batches: dict) -> engine.StepFn:
        """The inner step for one call (its stats read this call's dev arrays)."""
        augment = None
        if self.augment != "none":
            def augment(key, x):
                return data.augment_batch(key, x, self.augment)
        stats_fn = None
        if self.stats_builder is not None:
            stats_fn = self.stats_builder(batches["feature_dev"]["x"],
                                          batches["feature_dev"]["y"])
        return engine.make_student_step(self.model, self.loss_fn, self.tx, augment, stats_fn)

    def outer_step(self, state: dict, batches: dict):
        """Trains `steps_per_call` steps (and updates a learning teacher)."""
        step_fn = self.step_fn(batches)
        if self.teacher_update is None:
            student, metrics = engine.unroll(
                step_fn, state["teacher"], state["student"], batches["train"]
            )
            return {**state, "student": student}, metrics
        update = self.teacher_update
        result = update.estimator(
            step_fn, update.dev_objective_fn(self.model, batches["dev"]), state["teacher"],
            state["student"], batches["train"],
        )
        teacher, opt_state, meta_metrics = update.apply(
            state["teacher"], state["teacher_opt"], result
        )
        new_state = {"student": result.state, "teacher": teacher, "teacher_opt": opt_state}
        return new_state, {**result.metrics, **meta_metrics}

    def student(self, state: dict) -> engine.StudentState:
        """The student to evaluate."""
        return state["student"]
