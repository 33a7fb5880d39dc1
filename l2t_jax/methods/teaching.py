"""A student trained under a (fixed or still-learning) loss: the phase of every method.

`Teaching` is the outer loop that trains the reported student of every method: under
cross-entropy or a robust loss (nothing to learn), under a loss teacher's parameters
(L2T-DLF, taught or untaught), or under a frozen loss network. `TeacherUpdate` is how
a loss teacher learns from a meta-gradient, shared by every teaching method. The
builders at the end (`fixed_loss_plan`, `teacher_update`, `build_population`, ...) are
the pieces method modules assemble their plans from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from l2t_jax import config_checks as checks
from l2t_jax import data, engine, mesh, objectives, optimizers, students
from l2t_jax.errors import ConfigError
from l2t_jax.losses import cross_entropy_loss
from l2t_jax.methods import base
from l2t_jax.population import SINGLE_STUDENT, Population

PyTree = Any
# Builds the step's stats update from the dev arrays of a call, or None.
StatsBuilder = Callable[[jax.Array, jax.Array], engine.StatsFn]
NONFINITE_POLICIES = ("skip", "raise")


def all_finite(tree: PyTree) -> jax.Array:
    """Whether every element of every leaf of `tree` is finite (a boolean scalar)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]))


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
        """The objective of a trained student on the dev arrays ``dev["x"], dev["y"]``
        (`objectives.dev_objective_fn` with this update's objective and sharpness)."""
        return objectives.dev_objective_fn(model, dev, self.objective, self.sharpness)

    def apply(self, teacher: Any, opt_state: Any, result: engine.MetaGradient):
        """One guarded teacher step from a meta-gradient.

        Args:
            teacher: the teacher's parameters.
            opt_state: its optimizer state.
            result: the meta-gradient; from a population (`population.PopulationEstimator`)
                its ``aux["dev_error"]`` is per student, (P,), and is reported averaged.

        Returns:
            ``(teacher, opt_state, metrics)``; the update is skipped (both unchanged)
            when the gradient, the objective or the updated parameters are not finite
            (an overflowing learning rate turns a finite gradient into infinite ones).
        """
        updates, new_opt_state = self.tx.update(result.grad, opt_state, teacher)
        new_teacher = optax.apply_updates(teacher, updates)
        finite = all_finite((result.grad, result.value, new_teacher))

        def keep_if_finite(new, old):
            return jax.tree_util.tree_map(lambda n, o: jax.numpy.where(finite, n, o), new, old)

        metrics = {
            "meta/objective": result.value,
            "meta/grad_norm": optax.tree.norm(result.grad),
            "meta/nonfinite": 1.0 - finite.astype(np.float32),
            "meta/dev_error": 100.0 * jax.numpy.mean(result.aux["dev_error"]),
            # Of the teacher the update started from (the first logged is the initial
            # one): the driver stops a run whose teacher explodes (`train.check_health`).
            "meta/teacher_norm": optax.tree.norm(teacher),
        }
        return (keep_if_finite(new_teacher, teacher), keep_if_finite(new_opt_state, opt_state),
                metrics)


@flax.struct.dataclass
class TeachingState:
    """The state of a `Teaching` phase.

    Attributes:
        student: the student.
        loss_params: what the student's loss reads (``loss_fn``'s first argument): a
            loss teacher's parameters (L2T-DLF, l2t-gce), a loss network's phi (a frozen
            DLN), or None (cross-entropy and the hand-set robust losses).
        meta_opt_state: the optimizer state of `loss_params` while they keep learning
            (online teaching); None for a fixed loss.
        target_variables: the frozen target model's variables, or None.
    """

    student: engine.StudentState
    loss_params: PyTree = None
    meta_opt_state: PyTree = None
    target_variables: PyTree = None


@dataclasses.dataclass(frozen=True)
class Teaching:
    """A student trained `steps_per_call` steps per outer step under ``loss_fn``.

    With `teacher_update` the loss's parameters keep learning while the student trains:
    after each call, the meta-gradient of the dev objective through that call's steps
    (the student's start stop-gradiented: truncated backprop) updates them.

    Attributes:
        model: the Flax student.
        tx: the student's optimizer.
        loss_fn: ``loss_fn(loss_params, output, batch, state)`` (`engine.LossFn`).
        augment: augmentation kind (`l2t_jax.data.augment_batch`).
        steps_per_call: inner steps per outer step.
        batch_size: training batch size.
        stats_builder: builds the step's stats update from dev arrays, or None.
        initial_stats: the student's initial stats (``{}`` without a builder).
        teacher_update: set to keep the loss's parameters learning; None: fixed.
        feature_dev_size: dev examples fed to the stats (dev-error feature).
        activations: the student's named activations the loss reads.
        target_model: a frozen network run on the same augmented batch, whose output the
            loss reads as ``batch["target"]`` (its variables live in the state); None.
        target_activations: the target model's activations the loss reads.
        self_target: the loss reads the student's own output as ``batch["target"]``
            (`engine.make_student_step`).
        loss_metrics_fn: scalars that describe the step's loss (e.g. the loss
            parameters a teacher set), reported with the step's metrics
            (`engine.LossMetricsFn`); None: none.
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
    activations: tuple[str, ...] = ()
    target_model: nn.Module | None = None
    target_activations: tuple[str, ...] = ()
    self_target: bool = False
    loss_metrics_fn: engine.LossMetricsFn | None = None

    def init(self, rng: jax.Array, splits: data.Splits, loss_params: Any = None,
             start: engine.StudentState | None = None,
             target_variables: PyTree = None) -> TeachingState:
        """A fresh student (from `rng`) under the given loss parameters.

        With `start` (a pre-trained student) the student takes its parameters and model
        state; its optimizer, step and stats are this phase's fresh ones.
        """
        student = engine.init_student_state(
            self.model, self.tx, rng, splits.train.x[:1], self.initial_stats
        )
        if start is not None:
            student = student.replace(params=start.params, model_state=start.model_state)
        opt_state = self.teacher_update.tx.init(loss_params) if self.teacher_update else None
        return TeachingState(student, loss_params, opt_state, target_variables)

    def batches(self, splits: data.Splits, seed: int, start_step: int,
                population: Population = SINGLE_STUDENT) -> dict:
        """The training batches of one call and the dev arrays it reads.

        Args:
            splits: the data.
            seed: data-order seed.
            start_step: the call's first student step.
            population: for methods that train a population with this step: then
                ``"train"`` is stacked per member, (P, T, B, ...) (`Population.batches`);
                the default is this phase's single student, (T, B, ...).

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

    def step_fn(self, batches: dict, target_variables: PyTree = None) -> engine.StepFn:
        """The inner step for one call (its stats read this call's dev arrays)."""
        augment = None
        if self.augment != "none":
            def augment(key, x):
                return data.augment_batch(key, x, self.augment)
        stats_fn = None
        if self.stats_builder is not None:
            stats_fn = self.stats_builder(batches["feature_dev"]["x"],
                                          batches["feature_dev"]["y"])
        target = None
        if self.target_model is not None:
            target = engine.TargetModel(self.target_model, target_variables,
                                        self.target_activations)
        return engine.make_student_step(self.model, self.loss_fn, self.tx, augment, stats_fn,
                                        activations=self.activations, target=target,
                                        self_target=self.self_target,
                                        loss_metrics_fn=self.loss_metrics_fn)

    def outer_step(self, state: TeachingState, batches: dict):
        """Trains `steps_per_call` steps (and updates a learning loss teacher)."""
        step_fn = self.step_fn(batches, state.target_variables)
        if self.teacher_update is None:
            student, metrics = engine.unroll(
                step_fn, state.loss_params, state.student, batches["train"]
            )
            return state.replace(student=student), metrics
        update = self.teacher_update
        result = update.estimator(
            step_fn, update.dev_objective_fn(self.model, batches["dev"]), state.loss_params,
            state.student, batches["train"],
        )
        loss_params, opt_state, meta_metrics = update.apply(
            state.loss_params, state.meta_opt_state, result
        )
        new_state = state.replace(student=result.state, loss_params=loss_params,
                                  meta_opt_state=opt_state)
        return new_state, {**result.metrics, **meta_metrics}

    def student(self, state: TeachingState) -> engine.StudentState:
        """The student to evaluate."""
        return state.student


@dataclasses.dataclass(frozen=True)
class TargetRun:
    """A target model a distillation loss reads, and the phase that trains it.

    The target model is the network distilled from (the KD literature's "teacher"; in
    this library a teacher is always a loss teacher). Its phase trains it with
    cross-entropy, checkpointed and resumable in its own directory; a directory that
    already holds the finished training (another run's target, or a ``kd-target`` run's
    workdir) is restored and nothing is trained.

    Attributes:
        phase: the target's training phase (its loop a `Teaching`).
        activations: the activations the loss reads in both networks (attention
            transfer's stages); ``()`` for a loss of the logits.
    """

    phase: base.Phase
    activations: tuple[str, ...] = ()

    def fields(self) -> dict:
        """The `Teaching` fields that put the target into a student's step."""
        return dict(activations=self.activations, target_model=self.phase.loop.model,
                    target_activations=self.activations)

    def variables(self, finished: dict) -> PyTree:
        """The trained target's variables, from the finished phases by name.

        A copy: each phase that reads them donates its state to its jitted step.
        """
        target = finished[self.phase.name].student
        return jax.tree_util.tree_map(jax.numpy.array,
                                      {"params": target.params, **target.model_state})


def loss_reads(target: TargetRun | None = None, activations: tuple[str, ...] = (),
               self_target: bool = False) -> dict:
    """The `Teaching` fields that put what a loss reads into the student's step.

    Args:
        target: a target model (whose activations the loss reads in both networks).
        activations: without a target, the student's named activations the loss reads.
        self_target: without a target, the loss reads the student's own output as its
            target (`engine.make_student_step`).
    """
    if target is not None:
        return target.fields()
    return {"activations": activations, "self_target": self_target}


def pretrained_start(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                     splits: data.Splits, seed: int, *, steps: int, batch_size: int,
                     augment: str, stats: Any = None,
                     population: Population = SINGLE_STUDENT) -> engine.StudentState:
    """Fresh students from `rng` (one per population member), CE-trained `steps` steps.

    Trained on the `seed` data order; the step, optimizer state and stats are then
    reset. Member 0 is the single student of the same rng and seed.

    Args:
        model: the Flax student.
        tx: the optimizer of the pre-training (and of the reset optimizer state).
        rng: PRNG key of the initialisation.
        splits: the data.
        seed: data-order seed.
        steps: pre-training steps (0: the fresh students).
        batch_size: training batch size.
        augment: augmentation kind.
        stats: the students' initial running stats.
        population: how many students, on which mesh.

    Returns:
        The students (stacked when the population is).
    """
    start = population.init_students(model, tx, rng, splits.train.x[:1], stats)
    if not steps:
        return start
    pretrain = Teaching(model, tx, cross_entropy_loss, augment, steps, batch_size,
                        initial_stats=stats)
    batches = pretrain.batches(splits, seed=seed, start_step=0, population=population)
    step_fn = pretrain.step_fn(batches)

    def pretrained(student, train):
        # The fresh students' stats (`stats` at the students' precision, as every
        # student's: `engine.StudentState.create`), not the ones pre-training left.
        initial_stats = student.stats
        student = engine.unroll(step_fn, None, student, train)[0]
        return student.replace(step=jax.numpy.zeros_like(student.step),
                               opt_state=tx.init(student.params), stats=initial_stats)

    return jax.jit(population.vmap(pretrained))(start, batches["train"])


def pretrain_steps(config: ml_collections.ConfigDict) -> int:
    """``config.teacher.pretrain_steps`` (0 without a ``teacher`` section).

    The L2T-DLF demo's setting: every method compared under a config that sets it
    starts its reported student from the same CE-pretrained student
    (`configured_start`), so that the comparison is fair.
    """
    return config.teacher.get("pretrain_steps", 0) if "teacher" in config else 0


def configured_start(config: ml_collections.ConfigDict, splits: data.Splits, model: nn.Module,
                     rng: jax.Array, stats: Any = None,
                     population: Population = SINGLE_STUDENT) -> engine.StudentState | None:
    """The pre-trained start (`pretrain_steps`) of a config's students, or None.

    Pre-trained with the student optimizer over the teacher's episode length: the
    L2T-DLF episodes' fixed start (a population of them) and, member 0 of the same rng,
    the reported student of every method of the config.
    """
    steps = pretrain_steps(config)
    if not steps:
        return None
    tx = optimizers.make_inner_optimizer(config.optimizer, config.teacher.episode_steps)
    return pretrained_start(model, tx, rng, splits, config.seed, steps=steps,
                            batch_size=config.train.batch_size, augment=config.data.augment,
                            stats=stats, population=population)


def student_teaching(config: ml_collections.ConfigDict, splits: data.Splits,
                     loss_fn: engine.LossFn, **fields) -> Teaching:
    """The `Teaching` of the reported student from the config (student, optimizer,
    augmentation, batch size; one call per log interval), with `fields` overriding."""
    if "model" not in fields:
        fields["model"] = students.build_student(config.student, splits.num_classes)
    settings = dict(tx=optimizers.make_inner_optimizer(config.optimizer, config.train.num_steps),
                    loss_fn=loss_fn, augment=config.data.augment,
                    steps_per_call=config.train.log_every, batch_size=config.train.batch_size)
    return Teaching(**{**settings, **fields})


def student_phase(config: ml_collections.ConfigDict, splits: data.Splits,
                  teaching: Teaching, rng: jax.Array,
                  loss_params: Callable[[dict], PyTree], *,
                  start: engine.StudentState | None = None,
                  nonfinite_section: str | None = None,
                  target: TargetRun | None = None) -> base.Phase:
    """The phase that trains and reports the student (in the run's workdir).

    Args:
        config: the experiment config.
        splits: the data.
        teaching: the student's loop.
        rng: the student's PRNG key.
        loss_params: ``loss_params(finished) -> params`` from the earlier phases' final
            states (called when the phase starts).
        start: a pre-trained start; default `configured_start`.
        nonfinite_section: see `base.Phase`.
        target: the target model the loss reads (its phase runs before this one).
    """
    if start is None:
        start = configured_start(config, splits, teaching.model, rng)

    def init(finished):
        target_variables = None if target is None else target.variables(finished)
        return teaching.init(rng, splits, loss_params(finished), start=start,
                             target_variables=target_variables)

    return base.Phase("", teaching, base.student_schedule(config), init, nonfinite_section)


def fixed_loss_plan(config: ml_collections.ConfigDict, splits: data.Splits, rng: jax.Array,
                    loss_fn: engine.LossFn, loss_params: Callable[[jax.Array], PyTree] | None
                    = None, finish=base.no_outputs,
                    nonfinite_section: str | None = None, **fields) -> base.Plan:
    """One phase: the student trained under a loss that does not learn.

    Args:
        config: the experiment config.
        splits: the data.
        rng: the run's PRNG key (split into the loss's and the student's, as every
            method splits it).
        loss_fn: the student's loss.
        loss_params: ``loss_params(rng) -> params`` of the loss; None: no parameters.
        finish: see `base.Plan`.
        nonfinite_section: see `base.Phase`.
        **fields: `Teaching` fields of the student's loop (`student_teaching`), e.g. the
            student's named activations the loss reads, or the stats it reads.
    """
    loss_rng, student_rng = jax.random.split(rng)
    params = None if loss_params is None else loss_params(loss_rng)
    teaching = student_teaching(config, splits, loss_fn, **fields)
    phase = student_phase(config, splits, teaching, student_rng, lambda finished: params,
                          nonfinite_section=nonfinite_section)
    return base.Plan((phase,), finish)


def teacher_update(config: ml_collections.ConfigDict, section: str) -> TeacherUpdate:
    """Estimator, optimizer (with global-norm clipping), objective, non-finite policy.

    Read from ``config.<section>`` (``optimizer`` defaults to Adam, as the released
    L2T-DLN teacher) and ``config.engine``.
    """
    t = config[section]
    tx = optimizers.make_teacher_optimizer(t.get("optimizer", "adam"), t.learning_rate,
                                           t.clip_norm)
    return TeacherUpdate(engine.make_estimator(config.engine), tx, t.objective, t.sharpness,
                         t.on_nonfinite)


def teacher_update_checks(config: ml_collections.ConfigDict, section: str) -> list:
    """The ``(ok, message)`` checks of the fields `teacher_update` reads."""
    t = config[section]
    path = f"config.{section}."
    return [
        checks.one_of(path + "objective", t.objective, objectives.DEV_OBJECTIVES),
        checks.number(path + "sharpness", t.sharpness, above=0,
                      note=" (k of the smoothed dev error)"),
        checks.one_of(path + "on_nonfinite", t.on_nonfinite, NONFINITE_POLICIES),
        checks.one_of(path + "optimizer", t.get("optimizer", "adam"),
                      optimizers.TEACHER_OPTIMIZER_NAMES),
        checks.number(path + "learning_rate", t.learning_rate, above=0),
        checks.number(path + "clip_norm", t.clip_norm, at_least=0, note=" (0: no clipping)"),
    ]


def validate_population_size(config: ml_collections.ConfigDict, section: str,
                             trains_population: bool, what: str) -> None:
    """Checks ``config.<section>.population_size`` (an int >= 1; > 1 only where used)
    and that the population and batch split over ``config.mesh``."""
    size = config[section].get("population_size", 1)
    base.check_fields([checks.integer(f"config.{section}.population_size", size)])
    if size > 1 and not trains_population:
        raise ConfigError(f"config.{section}.population_size > 1 applies to {what} only; "
                          "set it to 1 here")
    _population_mesh(config, section, config.train.batch_size)  # the mesh fits


def build_population(config: ml_collections.ConfigDict, section: str,
                     batch_size: int) -> Population:
    """The students per teacher update and their mesh, from the config.

    Args:
        config: the experiment config; reads ``config.<section>.population_size`` and
            ``config.mesh`` (``{"population": n, "data": m}``, -1 = the rest, see
            `mesh.mesh_shape`). No ``mesh`` or every size 1: one device, no mesh.
            Otherwise the mesh spans all devices (of every host).
        section: the config section of the teacher (``"teacher"``, ``"dln"``).
        batch_size: B of the inner steps (must split over the data axis).

    Returns:
        The population (`SINGLE_STUDENT` for P = 1 without a mesh).

    Raises:
        ConfigError: a bad mesh, or P or B that does not split over it.
    """
    size, device_mesh = _population_mesh(config, section, batch_size)
    if device_mesh is not None and jax.process_count() > 1:
        logging.info("%s", mesh.describe_host_share(device_mesh, size, batch_size))
    return Population(size, device_mesh)


def _population_mesh(config: ml_collections.ConfigDict, section: str,
                     batch_size: int) -> tuple[int, Mesh | None]:
    """P and the mesh of `build_population` (None: one device), checked."""
    size = config[section].get("population_size", 1)
    spec = config.get("mesh")
    device_mesh = None
    if spec is not None and any(v != 1 for v in dict(spec.items()).values()):
        device_mesh = mesh.make_mesh(spec)
        mesh.check_population_shapes(device_mesh, size, batch_size)
    return size, device_mesh
