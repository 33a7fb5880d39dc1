"""L2T-DLF: the bilinear loss family set by a teacher from the student's state.

Two ways to train the teacher, combinable:

* episodes (`EpisodicTeacherTraining`): restart a student from the same start (or a
  fresh init each episode), train it T steps under the current teacher, take the exact
  meta-gradient of the dev objective through all T steps, update the teacher; repeat.
* online (`teaching.Teaching` with a `TeacherUpdate`): one student trains to the end
  while the teacher is updated every K steps from the meta-gradient through those K
  steps (truncated backprop).

With a population (``config.teacher.population_size`` = P > 1) every episode trains P
students under the same teacher (each its own start and data order) and the teacher
follows their averaged meta-gradient; the online mode and the taught student of the
teaching phase stay single students.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import optax

from l2t_jax import data, engine, parallel, teachers
from l2t_jax.losses import cross_entropy_loss
from l2t_jax.methods.teaching import StatsBuilder, TeacherUpdate, Teaching


def make_dlf_loss_fn(teacher: teachers.DLFTeacher, total_steps: int,
                     features_grad: bool = False) -> engine.LossFn:
    """The student's loss under a DLF teacher, reading s_t from the state and batch.

    Args:
        teacher: the teacher's structure.
        total_steps: the training length the iteration-fraction feature refers to.
        features_grad: let gradients flow through s_t (the demo stops them).

    Returns:
        ``loss_fn(teacher_params, logits, labels, state)``.
    """

    def loss_fn(teacher_params, logits, labels, state):
        features = teachers.student_features(
            state, logits, labels, total_steps, teacher.num_classes
        )
        if not features_grad:
            features = jax.lax.stop_gradient(features)
        return teacher.loss(teacher_params, features, logits, labels)

    return loss_fn


@dataclasses.dataclass(frozen=True)
class EpisodicTeacherTraining:
    """Teacher training by episodes; one outer step is one episode of T student steps.

    State: ``{"teacher", "teacher_opt", "start": StudentState, "episode", "rng"}``;
    with a stacked `population` the start holds P students (every leaf (P, ...)), one
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
        pretrain_steps: CE steps that train the fixed start (`pretrained_start`).
        features_grad: see `make_dlf_loss_fn`.
        augment: augmentation kind.
        feature_dev_size: dev examples the dev-error feature reads.
        population: students per episode and their mesh (default: one student).
    """

    model: nn.Module
    tx: optax.GradientTransformation
    teacher: teachers.DLFTeacher
    update: TeacherUpdate
    steps_per_call: int
    batch_size: int
    stats_builder: StatsBuilder
    restart: str = "fixed"
    pretrain_steps: int = 0
    features_grad: bool = False
    augment: str = "none"
    feature_dev_size: int = 512
    population: parallel.Population = parallel.SINGLE_STUDENT

    def _teaching(self, loss_fn, steps_per_call) -> Teaching:
        """The same student step and batches as the teaching phase (one place)."""
        return Teaching(self.model, self.tx, loss_fn, self.augment, steps_per_call,
                        self.batch_size, self.stats_builder,
                        teachers.initial_stats(self.teacher.num_classes),
                        feature_dev_size=self.feature_dev_size)

    def pretrained_start(self, rng: jax.Array, splits: data.Splits,
                         seed: int) -> engine.StudentState:
        """A fresh student from `rng` (one per population member), CE-trained for
        `pretrain_steps` steps on the `seed` data order, its step, optimizer state and
        stats reset: the episodes' fixed start (and, for every method of a run, the start
        of the taught student). Member 0 is the single student of the same rng and seed.
        """
        start = self._student_init(rng, splits.train.x[:1])
        if not self.pretrain_steps:
            return start
        pretrain = self._teaching(cross_entropy_loss, self.pretrain_steps)
        batches = pretrain.batches(splits, seed=seed, start_step=0, population=self.population)
        step_fn = pretrain.step_fn(batches)

        def pretrained(student, train):
            student = engine.unroll(step_fn, None, student, train)[0]
            return student.replace(
                step=jax.numpy.zeros_like(student.step),
                opt_state=self.tx.init(student.params),
                stats=teachers.initial_stats(self.teacher.num_classes))

        return jax.jit(self.population.vmap(pretrained))(start, batches["train"])

    def init(self, rng: jax.Array, splits: data.Splits,
             start: engine.StudentState | None = None) -> dict:
        """The untaught teacher and the episodes' start(s).

        Args:
            rng: PRNG key of the teacher (and of the default start).
            splits: the data.
            start: the fixed start (`pretrained_start`); default: a fresh student.
        """
        teacher_rng, student_rng, rng = jax.random.split(rng, 3)
        params = self.teacher.init(teacher_rng)
        if start is None:
            start = self._student_init(student_rng, splits.train.x[:1])
        start, shared = self.population.place(start, {
            "teacher": params, "teacher_opt": self.update.tx.init(params),
            "episode": jax.numpy.zeros((), jax.numpy.int32), "rng": rng})
        return {"start": start, **shared}

    def _student_init(self, rng: jax.Array, sample_x) -> engine.StudentState:
        return self.population.init_students(
            self.model, self.tx, rng, sample_x, teachers.initial_stats(self.teacher.num_classes)
        )

    def batches(self, splits: data.Splits, seed: int, start_step: int) -> dict:
        """One episode's T training batches (a new order each episode) and the dev set.

        Stacked per member, (P, T, B, ...), with a population.
        """
        batches = self._teaching(None, self.steps_per_call).batches(
            splits, seed, start_step, population=self.population)
        batches["dev"] = {"x": splits.meta_dev.x, "y": splits.meta_dev.y}
        batches["sample_x"] = splits.train.x[:1]
        return batches

    def outer_step(self, state: dict, batches: dict):
        """One episode: unroll T steps, exact meta-gradient, guarded teacher update.

        With a population: P unrolls in one vmapped program, the meta-gradient and
        objective averaged over them; the inner metrics are (P, T).
        """
        loss_fn = make_dlf_loss_fn(self.teacher, self.steps_per_call, self.features_grad)
        step_fn = self._teaching(loss_fn, self.steps_per_call).step_fn(batches)
        start = state["start"]
        if self.restart == "fresh":
            start = self._student_init(
                jax.random.fold_in(state["rng"], state["episode"]), batches["sample_x"]
            )
        result = self.population.estimator(self.update.estimator)(
            step_fn, self.update.dev_objective_fn(self.model, batches["dev"]),
            state["teacher"], start, batches["train"],
        )
        teacher, opt_state, metrics = self.update.apply(
            state["teacher"], state["teacher_opt"], result
        )
        new_state = {**state, "teacher": teacher, "teacher_opt": opt_state,
                     "episode": state["episode"] + 1}
        return new_state, {**result.metrics, **metrics}
