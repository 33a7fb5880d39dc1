"""L2T-DLF: a loss teacher sets the student's loss from the student's state (NeurIPS 2018).

The teacher maps student-state features s_t (`teachers.student_features`) to the
parameters of a loss family: the bilinear sigmoid loss here (`teachers.DLFTeacher`);
any teacher with the same ``init`` / ``student_loss`` / ``num_classes`` interface is trained
the same way (``l2t-gce`` in `methods.robust` is one). Two ways to train it, combinable:

* episodes (`EpisodicTeacherTraining`, phase ``teacher``): restart a student from the
  same start (or a fresh init each episode), train it T steps under the current
  teacher, take the exact meta-gradient of the dev objective through all T steps,
  update the teacher; repeat.
* online (`teaching.Teaching` with a `TeacherUpdate`): one student trains to the end
  while the teacher is updated every K steps from the meta-gradient through those K
  steps (truncated backprop).

Then a fresh student is trained under the taught teacher and reported.

With a population (``config.teacher.population_size`` = P > 1) every episode trains P
students under the same teacher (each its own start and data order) and the teacher
follows their averaged meta-gradient; the online mode and the taught student stay
single students.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from l2t_jax import config_checks as checks
from l2t_jax import data, engine, optimizers, plots, students, teachers
from l2t_jax.checkpoint import load_params, save_params
from l2t_jax.errors import ConfigError
from l2t_jax.methods import base, teaching
from l2t_jax.methods.teaching import StatsBuilder, TeacherUpdate, Teaching
from l2t_jax.population import SINGLE_STUDENT, Population

RESTARTS = ("fixed", "fresh")
TEACHER_PARAMS_FILE = "teacher_params.npz"
TEACHER_DIR = "teacher"


def _features_reader(teacher: Any, total_steps: int, features_grad: bool,
                     features_fn: teachers.FeaturesFn | None,
                     feature_subset: Sequence[str | int] | None):
    """``features(output, batch, state) -> s_t`` as the teacher reads it (see
    `make_dlf_loss_fn`)."""
    if features_fn is not None and feature_subset is not None:
        raise ValueError("make_dlf_loss_fn takes features_fn or feature_subset, not both "
                         "(select the features inside features_fn)")
    indices = None if feature_subset is None else teachers.feature_indices(feature_subset)
    if indices == tuple(range(teachers.NUM_FEATURES)):
        indices = None  # all, in order: no gather (the default program, bit for bit)
    compute = teachers.student_features if features_fn is None else features_fn

    def features(output, batch, state):
        s_t = compute(state, output.logits, batch["y"], total_steps, teacher.num_classes)
        if indices is not None:
            s_t = s_t[np.asarray(indices)]
        return s_t if features_grad else jax.lax.stop_gradient(s_t)

    return features


def make_dlf_loss_fn(teacher: Any, total_steps: int, features_grad: bool = False, *,
                     features_fn: teachers.FeaturesFn | None = None,
                     feature_subset: Sequence[str | int] | None = None) -> engine.LossFn:
    """The student's loss under a state-feature teacher, reading s_t from the state and batch.

    Args:
        teacher: the teacher's structure
            (``teacher.student_loss(params, s_t, output, batch)``); it reads s_t of the
            length `feature_size` gives.
        total_steps: the training length the iteration-fraction feature refers to.
        features_grad: let gradients flow through s_t (the demo stops them).
        features_fn: computes s_t instead of `teachers.student_features` (same
            signature, `teachers.FeaturesFn`); it may read any of the student's stats.
        feature_subset: the teacher reads only these of `teachers.student_features`
            (names from `teachers.FEATURE_NAMES` or indices, in this order); None: all.
            Not with `features_fn` (select inside it).

    Returns:
        ``loss_fn(teacher_params, output, batch, state)``.

    Raises:
        ConfigError: a bad `feature_subset` (`teachers.feature_indices`).
        ValueError: both `features_fn` and `feature_subset`.
    """
    features = _features_reader(teacher, total_steps, features_grad, features_fn,
                                feature_subset)

    def loss_fn(teacher_params, output, batch, state):
        return teacher.student_loss(teacher_params, features(output, batch, state),
                                    output, batch)

    return loss_fn


def make_dlf_metrics_fn(teacher: Any, total_steps: int, *,
                        features_fn: teachers.FeaturesFn | None = None,
                        feature_subset: Sequence[str | int] | None = None
                        ) -> engine.LossMetricsFn | None:
    """The loss parameters the teacher sets at each step, as the step's metrics.

    Args:
        teacher: the teacher's structure; ``teacher.describe(params, s_t)`` gives the
            scalars (`teachers.DLFTeacher.describe`: ``dlf/gate``, ``dlf/mix``, ...).
        total_steps, features_fn, feature_subset: as for the `make_dlf_loss_fn` of
            the same student, so that the teacher is described at the s_t it reads.

    Returns:
        ``metrics_fn(teacher_params, output, batch, state) -> {name: scalar}`` for
        `engine.make_student_step` (``loss_metrics_fn``); None for a teacher without
        ``describe``.
    """
    if not hasattr(teacher, "describe"):
        return None
    features = _features_reader(teacher, total_steps, False, features_fn, feature_subset)

    def metrics_fn(teacher_params, output, batch, state):
        return teacher.describe(teacher_params, features(output, batch, state))

    return metrics_fn


def feature_size(feature_subset: Sequence[str | int] | None = None) -> int:
    """The length of the s_t a teacher reads: of `feature_subset`, or all the features."""
    if feature_subset is None:
        return teachers.NUM_FEATURES
    return len(teachers.feature_indices(feature_subset))


def configured_features(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
    """``config.teacher.features``, or None when it is absent (a saved config from before
    the field) or names every feature in order (nothing to select)."""
    subset = config.teacher.get("features")
    if subset is None or tuple(subset) == teachers.FEATURE_NAMES:
        return None
    return tuple(subset)


@flax.struct.dataclass
class EpisodeState:
    """The state of the episodic teacher training.

    Attributes:
        start: the students every ``"fixed"`` episode starts from (stacked (P, ...) with
            a population).
        teacher_params: the loss teacher's parameters.
        teacher_opt_state: their optimizer state.
        episode: int32, episodes done.
        rng: PRNG key of the ``"fresh"`` restarts.
        target_variables: the frozen target model's variables (distillation), or None.
    """

    start: engine.StudentState
    teacher_params: Any
    teacher_opt_state: Any
    episode: jax.Array
    rng: jax.Array
    target_variables: Any = None


@dataclasses.dataclass(frozen=True)
class EpisodicTeacherTraining:
    """Teacher training by episodes; one outer step is one episode of T student steps.

    With a stacked `population` the start holds P students (every leaf (P, ...)), one
    episode trains all P from their own starts (``"fixed"``) or fresh inits on their own
    data orders, and the teacher step uses the meta-gradient averaged over them.

    Attributes:
        model: the Flax student.
        tx: the student's optimizer.
        teacher: the teacher's structure.
        update: estimator, teacher optimizer, dev objective, non-finite policy.
        steps_per_call: T, student steps per episode.
        batch_size: training batch size.
        stats_builder: builds the feature stats update from dev arrays.
        restart: ``"fixed"`` (every episode from the same start) or ``"fresh"`` (a new
            random init each episode).
        features_grad: see `make_dlf_loss_fn`.
        augment: augmentation kind.
        feature_dev_size: dev examples the dev-error feature reads.
        feature_subset: the features the teacher reads (see `make_dlf_loss_fn`);
            None: all.
        population: students per episode and their mesh (default: one student).
        activations, target_model, target_activations, self_target: what the loss reads
            besides the logits, as in `teaching.Teaching` (distillation:
            `teaching.TargetRun`).
    """

    model: nn.Module
    tx: optax.GradientTransformation
    teacher: Any
    update: TeacherUpdate
    steps_per_call: int
    batch_size: int
    stats_builder: StatsBuilder
    restart: str = "fixed"
    features_grad: bool = False
    augment: str = "none"
    feature_dev_size: int = 512
    population: Population = SINGLE_STUDENT
    activations: tuple[str, ...] = ()
    target_model: nn.Module | None = None
    target_activations: tuple[str, ...] = ()
    self_target: bool = False
    feature_subset: tuple[str | int, ...] | None = None

    def _teaching(self, loss_fn, loss_metrics_fn=None) -> Teaching:
        """The same student step and batches as the teaching phase (one place)."""
        return Teaching(self.model, self.tx, loss_fn, self.augment, self.steps_per_call,
                        self.batch_size, self.stats_builder,
                        teachers.initial_stats(self.teacher.num_classes),
                        feature_dev_size=self.feature_dev_size,
                        activations=self.activations, target_model=self.target_model,
                        target_activations=self.target_activations,
                        self_target=self.self_target, loss_metrics_fn=loss_metrics_fn)

    def init(self, rng: jax.Array, splits: data.Splits,
             start: engine.StudentState | None = None,
             target_variables: Any = None) -> EpisodeState:
        """The untaught teacher and the episodes' start(s).

        Args:
            rng: PRNG key of the teacher (and of the default start).
            splits: the data.
            start: the fixed start (`teaching.pretrained_start`); default: a fresh student.
            target_variables: the target model's variables, when the loss reads one.
        """
        teacher_rng, student_rng, rng = jax.random.split(rng, 3)
        params = self.teacher.init(teacher_rng)
        if start is None:
            start = self._student_init(student_rng, splits.train.x[:1])
        start, shared = self.population.place(start, {
            "teacher_params": params, "teacher_opt_state": self.update.tx.init(params),
            "episode": jax.numpy.zeros((), jax.numpy.int32), "rng": rng,
            "target_variables": target_variables})
        return EpisodeState(start=start, **shared)

    def _student_init(self, rng: jax.Array, sample_x) -> engine.StudentState:
        return self.population.init_students(
            self.model, self.tx, rng, sample_x, teachers.initial_stats(self.teacher.num_classes)
        )

    def batches(self, splits: data.Splits, seed: int, start_step: int) -> dict:
        """One episode's T training batches (a new order each episode) and the dev set.

        Stacked per member, (P, T, B, ...), with a population.
        """
        batches = self._teaching(None).batches(splits, seed, start_step,
                                               population=self.population)
        batches["dev"] = {"x": splits.meta_dev.x, "y": splits.meta_dev.y}
        batches["sample_x"] = splits.train.x[:1]
        return batches

    def outer_step(self, state: EpisodeState, batches: dict):
        """One episode: unroll T steps, exact meta-gradient, guarded teacher update.

        With a population: P unrolls in one vmapped program, the meta-gradient and
        objective averaged over them; the inner metrics are (P, T), with the teacher's
        ``describe`` scalars (``dlf/...``) beside the student's.
        """
        subset = self.feature_subset
        loss_fn = make_dlf_loss_fn(self.teacher, self.steps_per_call, self.features_grad,
                                   feature_subset=subset)
        metrics_fn = make_dlf_metrics_fn(self.teacher, self.steps_per_call,
                                         feature_subset=subset)
        step_fn = self._teaching(loss_fn, metrics_fn).step_fn(batches,
                                                              state.target_variables)
        start = state.start
        if self.restart == "fresh":
            start = self._student_init(
                jax.random.fold_in(state.rng, state.episode), batches["sample_x"]
            )
        result = self.population.estimator(self.update.estimator)(
            step_fn, self.update.dev_objective_fn(self.model, batches["dev"]),
            state.teacher_params, start, batches["train"],
        )
        params, opt_state, metrics = self.update.apply(
            state.teacher_params, state.teacher_opt_state, result
        )
        new_state = state.replace(teacher_params=params, teacher_opt_state=opt_state,
                                  episode=state.episode + 1)
        return new_state, {**result.metrics, **metrics}


# --------------------------------------------------------------------------- config


def teaching_checks(config: ml_collections.ConfigDict) -> list:
    """The ``(ok, message)`` checks of the ``teacher`` fields every state-feature teacher
    method reads (episodes, online teaching, the teacher's update)."""
    t = config.teacher
    return teaching.teacher_update_checks(config, "teacher") + [
        checks.one_of("config.teacher.restart", t.restart, RESTARTS),
        checks.integer("config.teacher.num_episodes", t.num_episodes, minimum=0),
        checks.integer("config.teacher.episode_steps", t.episode_steps),
        checks.integer("config.teacher.pretrain_steps", t.pretrain_steps, minimum=0),
        (checks.is_integer(t.online_window) and t.online_window >= 1,
         f"config.teacher.online_window must be >= 1 (an integer: student steps per "
         f"online teacher update), got {t.online_window!r}"),
        checks.flag("config.teacher.teach_online", t.teach_online),
        checks.flag("config.teacher.features_grad", t.features_grad),
        checks.integer("config.teacher.feature_dev_size", t.feature_dev_size,
                       note=" (dev examples behind the dev-error feature)"),
        checks.integer("config.teacher.dev_every", t.dev_every),
        checks.integer("config.teacher.checkpoint_every", t.checkpoint_every,
                       note=" (episodes)"),
    ]


def validate_teaching(config: ml_collections.ConfigDict, taught_name: str, fixed_name: str,
                      checks: list, reads_feature_subset: bool = False) -> None:
    """Validates a state-feature teacher method's ``teacher`` section.

    Args:
        config: the experiment config (``config.method`` is either name below).
        taught_name: the method that trains the teacher (episodes or online).
        fixed_name: the method of the same loss at the untaught teacher.
        checks: the teacher's own ``(ok, message)`` checks, tested first.
        reads_feature_subset: the method's teacher reads ``config.teacher.features``
            (its input size is `feature_size`); otherwise the field must name every
            feature.
    """
    t = config.teacher
    taught = config.method == taught_name
    base.check_fields(checks + teaching_checks(config))
    if not reads_feature_subset and configured_features(config) is not None:
        raise ConfigError(
            f"config.teacher.features selects the l2t-dlf teacher's features only; "
            f"{config.method}'s teacher reads all of them: set it to "
            f"{teachers.FEATURE_NAMES}")
    teaching.validate_population_size(
        config, "teacher", trains_population=taught and t.num_episodes > 0,
        what=f"the teacher's episodes (config.teacher.num_episodes >= 1 with method "
             f"{taught_name!r})")
    if taught and not (t.num_episodes or t.teach_online):
        raise ConfigError(
            f"{config.method} needs config.teacher.num_episodes >= 1 or "
            f"config.teacher.teach_online=True (otherwise nothing teaches: use method "
            f"{fixed_name!r})"
        )
    if t.pretrain_steps and t.restart != "fixed":
        raise ConfigError(
            "config.teacher.pretrain_steps > 0 needs config.teacher.restart='fixed' (fresh "
            "restarts never start from the pre-trained student); set one of them"
        )
    if t.teach_online and config.train.log_every % t.online_window:
        raise ConfigError(
            f"config.train.log_every ({config.train.log_every}) must be a multiple of "
            f"config.teacher.online_window ({t.online_window}) when teach_online"
        )


def build_teacher(config: ml_collections.ConfigDict, num_classes: int) -> teachers.DLFTeacher:
    """The DLF teacher's structure from ``config.teacher``.

    A run's saved config from before ``gate_init_scale`` existed gets 0, the init it ran
    with, so that its pictures can still be drawn.
    """
    t = config.teacher
    return teachers.DLFTeacher(t.form, num_classes, feature_size(configured_features(config)),
                               t.hidden, t.combine, t.bilinear_scale,
                               t.get("gate_init_scale", 0.0))


def dlf_checks(config: ml_collections.ConfigDict) -> list:
    """The ``(ok, message)`` checks of the DLF teacher's own fields."""
    t = config.teacher
    features = t.get("features", teachers.FEATURE_NAMES)
    return [
        checks.one_of("config.teacher.form", t.form, teachers.TEACHER_FORMS),
        (isinstance(features, tuple | list) and len(features) > 0
         and all(isinstance(f, str) and f in teachers.FEATURE_NAMES for f in features)
         and len(set(features)) == len(features),
         f"config.teacher.features must be a non-empty tuple of distinct names from "
         f"{teachers.FEATURE_NAMES}, got {features!r}"),
        checks.integer("config.teacher.hidden", t.hidden, note=" (the mlp form's width)"),
        checks.flag("config.teacher.combine", t.combine),
        checks.number("config.teacher.bilinear_scale", t.bilinear_scale, above=0),
        checks.number("config.teacher.gate_init_scale", t.gate_init_scale, at_least=0,
                      note=" (0: the demo's init, where the state gate never opens)"),
    ]


def stats_builder(config: ml_collections.ConfigDict, model: nn.Module) -> StatsBuilder:
    """Builds the feature stats update of `teachers.make_stats_fn` from dev arrays."""
    def build(dev_x, dev_y):
        return teachers.make_stats_fn(model, dev_x, dev_y, config.teacher.dev_every)
    return build


def build_episodic(config: ml_collections.ConfigDict, splits: data.Splits,
                   teacher: Any, target: teaching.TargetRun | None = None,
                   activations: tuple[str, ...] = (), self_target: bool = False
                   ) -> EpisodicTeacherTraining:
    """The episodic teacher-training phase's loop from ``config.teacher`` (with the
    target model and the student's activations the loss reads, if any)."""
    model = students.build_student(config.student, splits.num_classes)
    t = config.teacher
    return EpisodicTeacherTraining(
        model=model,
        tx=optimizers.make_inner_optimizer(config.optimizer, t.episode_steps),
        teacher=teacher,
        update=teaching.teacher_update(config, "teacher"),
        steps_per_call=t.episode_steps,
        batch_size=config.train.batch_size,
        stats_builder=stats_builder(config, model),
        restart=t.restart,
        features_grad=t.features_grad,
        augment=config.data.augment,
        feature_dev_size=t.feature_dev_size,
        population=teaching.build_population(config, "teacher", config.train.batch_size),
        feature_subset=configured_features(config),
        **teaching.loss_reads(target, activations, self_target),
    )


def build_taught_student(config: ml_collections.ConfigDict, splits: data.Splits,
                         teacher: Any, taught: bool,
                         target: teaching.TargetRun | None = None,
                         activations: tuple[str, ...] = (),
                         self_target: bool = False) -> Teaching:
    """The reported student's loop under the teacher (learning online when asked), with
    the target model and the student's activations the loss reads, if any."""
    t = config.teacher
    online = taught and t.teach_online
    model = students.build_student(config.student, splits.num_classes)
    subset = configured_features(config)
    return teaching.student_teaching(
        config, splits, make_dlf_loss_fn(teacher, config.train.num_steps, t.features_grad,
                                         feature_subset=subset),
        loss_metrics_fn=make_dlf_metrics_fn(teacher, config.train.num_steps,
                                            feature_subset=subset),
        model=model,
        steps_per_call=t.online_window if online else config.train.log_every,
        stats_builder=stats_builder(config, model),
        initial_stats=teachers.initial_stats(splits.num_classes),
        teacher_update=teaching.teacher_update(config, "teacher") if online else None,
        feature_dev_size=t.feature_dev_size,
        **teaching.loss_reads(target, activations, self_target),
    )


def feature_teacher_plan(config: ml_collections.ConfigDict, splits: data.Splits,
                         rng: jax.Array, teacher: Any, taught: bool,
                         target: teaching.TargetRun | None = None,
                         activations: tuple[str, ...] = (),
                         self_target: bool = False) -> base.Plan:
    """A state-feature teacher method: the teacher's episodes (if taught and asked for),
    then the reported student under the teacher (taught online if asked for).

    Args:
        config: the experiment config.
        splits: the data.
        rng: the run's PRNG key.
        teacher: the teacher's structure (`teachers.DLFTeacher`, `teachers.WeightTeacher`).
        taught: whether the teacher learns; False: the loss at its untaught parameters.
        target: the target model the loss reads (distillation); its phase runs first.
        activations: the student's named activations the loss reads (without a target).
        self_target: the loss reads the student's own output (`teaching.loss_reads`).

    Returns:
        The plan; its finish writes the final teacher parameters (`TEACHER_PARAMS_FILE`).
    """
    teacher_rng, student_rng = jax.random.split(rng)
    t = config.teacher
    episodes = taught and t.num_episodes > 0
    phases = [] if target is None else [target.phase]
    taught_start = None
    if episodes:
        episodic = build_episodic(config, splits, teacher, target, activations,
                                  self_target)
        start = teaching.configured_start(
            config, splits, episodic.model, student_rng,
            stats=teachers.initial_stats(splits.num_classes), population=episodic.population)
        if start is not None:
            # The taught student is one, on one device; copied before the episodes
            # donate (and so delete) the start's buffers.
            taught_start = jax.device_get(episodic.population.first(start))
        phases.append(base.Phase(
            TEACHER_DIR, episodic,
            base.Schedule(t.num_episodes * t.episode_steps, eval_every=0,
                          checkpoint_every=t.checkpoint_every * t.episode_steps),
            lambda finished: episodic.init(
                teacher_rng, splits, start,
                None if target is None else target.variables(finished)),
            "teacher"))

    def loss_params(finished):
        if episodes:
            # To the host: the taught student trains on one device, whatever mesh the
            # episodes used (mixed placements would not restore into one jit).
            return jax.device_get(finished[TEACHER_DIR].teacher_params)
        return teacher.init(teacher_rng)

    student = build_taught_student(config, splits, teacher, taught, target, activations,
                                   self_target)
    phases.append(teaching.student_phase(config, splits, student, student_rng, loss_params,
                                         start=taught_start, nonfinite_section="teacher",
                                         target=target))

    def finish(finished, workdir, summary):
        del summary
        save_params(finished[""].loss_params, os.path.join(workdir, TEACHER_PARAMS_FILE))
        return {}

    return base.Plan(tuple(phases), finish)


def draw_dlf_loss(config: ml_collections.ConfigDict, workdir: str, records: list[dict],
                  summary: dict) -> list[str]:
    """``dlf_loss.png``: the learned W_t at several points of the run, and the loss vs p_y."""
    params_path = os.path.join(workdir, TEACHER_PARAMS_FILE)
    if not os.path.exists(params_path):
        return []
    params = load_params(params_path)
    num_classes = params["W"].shape[0]
    states = plots.dlf_states_from_metrics(records, config.train.num_steps, num_classes)
    subset = configured_features(config)
    if subset is not None:  # the features the teacher reads
        indices = list(teachers.feature_indices(subset))
        states = [(step, s[indices]) for step, s in states]
    path = os.path.join(workdir, "dlf_loss.png")
    plots.plot_dlf_loss(build_teacher(config, num_classes), params, states, path,
                        plots.run_title(summary))
    return [path]


def weight_teacher_drawing(teacher_fn, filename: str, loss_curve: bool = True):
    """A `base.Method.draw` for a `teachers.WeightTeacher` method: its learned weights
    over the run (and the loss vs p_y: `plots.plot_weight_teacher`) in ``filename``.

    Args:
        teacher_fn: ``teacher_fn(config, num_classes)``, the teacher's structure.
        filename: the PNG's name in the run's workdir.
        loss_curve: see `plots.plot_weight_teacher`.
    """

    def draw(config, workdir: str, records: list[dict], summary: dict) -> list[str]:
        params_path = os.path.join(workdir, TEACHER_PARAMS_FILE)
        if not os.path.exists(params_path) or "num_classes" not in summary:
            return []
        num_classes = summary["num_classes"]
        states = plots.dlf_states_from_metrics(records, config.train.num_steps, num_classes)
        path = os.path.join(workdir, filename)
        plots.plot_weight_teacher(teacher_fn(config, num_classes), load_params(params_path),
                                  states, path, plots.run_title(summary), loss_curve)
        return [path]

    return draw


def _build(taught: bool):
    def build(config, splits, rng):
        teacher = build_teacher(config, splits.num_classes)
        return feature_teacher_plan(config, splits, rng, teacher, taught)
    return build


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the ``teacher`` section of ``l2t-dlf`` and ``l2t-dlf-fixed``."""
    validate_teaching(config, "l2t-dlf", "l2t-dlf-fixed", dlf_checks(config),
                      reads_feature_subset=True)


base.register(
    base.Method(
        name="l2t-dlf",
        description="L2T-DLF: a teacher sets a bilinear loss from the student's state, "
                    "trained by exact meta-gradients (episodes and/or online)",
        example="configs/l2t_dlf.py:digits,noisy",
        build=_build(taught=True), sections=("teacher",), validate=validate,
        draw=draw_dlf_loss),
    base.Method(
        name="l2t-dlf-fixed",
        description="the L2T-DLF loss at the teacher's untaught parameters (the loss "
                    "form without the teaching)",
        example="configs/l2t_dlf.py:digits,noisy",
        build=_build(taught=False), sections=("teacher",), validate=validate,
        draw=draw_dlf_loss),
)
