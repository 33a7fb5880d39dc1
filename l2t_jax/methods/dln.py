"""L2T-DLN: an LSTM teacher updates the student's loss network while the student trains.

One outer step is one iteration of the released algorithm, on K training batches and
one validation batch:

A. *DLN state*: from the current student w, unroll K differentiable SGD steps on the
   DLN loss phi; g = d CE_val / d phi through the unroll (one `jax.grad` over the whole
   DLN pytree, by the configured estimator), stop-gradiented.
B. *Teacher learning*: phi' = phi - step_size * LSTM_psi(preprocess(g)); unroll again
   from the same w on the same K batches with phi'(psi); d CE_val / d psi is the
   gradient at phi' pulled back through phi'(psi) (second order through the unroll);
   one guarded optimizer step on psi.
C. *Student learning*: the student keeps the weights (and BatchNorm statistics) from
   unroll B; DLN := phi'; the LSTM memory := its new state (both stop-gradiented).

Acceptance (``accept``, not in the released code): ``"always"`` is the released stage C.
``"proper"`` keeps phi' only while the right answer stays the loss's minimum: its
`losses.dln.probe_dln` corner gap (how far the minimum over the (s_true, s_other) square
lies below the loss at (1, 0), in units of the surface's spread) is at most
``proper_tolerance``. Otherwise the DLN stays phi and the student keeps the weights of
unroll A (trained under phi), so a student can never be trained on a loss that rewards
a wrong answer. ``"proper_descent"`` also requires the proposal not to raise this
iteration's validation CE: unroll B's no higher than unroll A's, both from the same
student on the same batches (a descent test on the teacher's own objective). The
teacher learns from every proposal, accepted or not, and its memory always advances.

BatchNorm: running statistics are part of the student state carried through both
unrolls (`engine.StudentState.model_state`), the validation CE reads the student in
eval mode (running statistics), and stage C keeps the statistics of unroll B, so the
evaluated student is the one that was trained. (The released code copies back only the
parameters, leaving the evaluated statistics at their initial values.)

Data: the fixed protocol (default) draws training batches from the train split and
validation batches from the teachers' dev split (`data.Splits.meta_dev`: the dev split
itself unless `config.data.meta_dev_size` sets part of it aside); the redraw protocol
splits the train split into two random halves (student-train, meta-validation),
re-drawn every `redraw_every` iterations, as the authors do on CIFAR (25k / 25k).

Population (``config.dln.population_size`` = P > 1, not in the released code): P
students, each with its own weights, initialisation and training batches, share one
DLN, one LSTM teacher and its memory. Stage A's hypergradient and stage B's teacher
gradient (and their validation CEs) are averaged over the P students, all evaluated on
the iteration's one validation batch; in stage C every member keeps its own unroll-B
weights. The reported and evaluated student is member 0 (`DLNTeaching.student`), which
starts from the initialisation and data order of a single-student run.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from l2t_jax import data, engine, parallel
from l2t_jax.losses import dln as dln_lib
from l2t_jax.methods.teaching import TeacherUpdate, Teaching
from l2t_jax.teachers.lstm import CoordinateLSTM

PROTOCOLS = ("fixed", "redraw")
ACCEPT_RULES = ("always", "proper", "proper_descent")
STUDENT_FEATURE_NAMES = ("iteration_fraction", "train_ce", "val_ce")


class DLNMetaGradients(NamedTuple):
    """What stages A and B compute in one iteration.

    Attributes:
        hypergrad: (N,) stage A's d CE_val / d phi, flattened (zeros if non-finite).
        hypergrad_finite: whether it was finite.
        result_a: stage A's unroll under the old DLN: value (validation CE), grad (the
            hypergradient as a pytree, before the finiteness guard), the trained
            student as ``state``, its inner metrics.
        steps: (N,) the teacher's proposed steps h (zeros if the hypergradient was not
            finite).
        new_dln: phi' = phi - step_size * h.
        memory: the LSTM's new memory (the old one if the hypergradient was not finite).
        result_b: stage B's unroll: value (validation CE under phi'), the teacher's
            gradient d CE_val / d psi as ``grad``, the trained student as ``state``.
    """

    hypergrad: jax.Array
    hypergrad_finite: jax.Array
    result_a: engine.MetaGradient
    steps: jax.Array
    new_dln: dict
    memory: dict
    result_b: engine.MetaGradient


@dataclasses.dataclass(frozen=True)
class DLNTeaching:
    """The L2T-DLN method; state ``{"student", "dln", "teacher", "teacher_opt",
    "memory", "snapshots"}``.

    Attributes:
        model: the Flax student.
        tx: the student's optimizer (plain SGD 0.1 in the paper).
        teacher: the LSTM's structure (``num_extra_inputs`` = 3 with student features).
        update: estimator (stage A and B unrolls), the teacher's optimizer, the
            validation objective (``"cross_entropy"`` in the paper) and non-finite policy.
        steps_per_call: K, student steps per iteration.
        batch_size: training batch size.
        val_batch_size: validation examples per iteration.
        dln_step_size: the DLN step ``phi <- phi - dln_step_size * h``.
        total_steps: the run's length in student steps (for the iteration fraction and
            the snapshot schedule).
        num_classes: C (the student-state features divide losses by log C).
        augment: augmentation kind, applied to training and validation batches.
        protocol: ``"fixed"`` or ``"redraw"`` (see the module docstring).
        redraw_every: iterations between re-drawn splits (``"redraw"``).
        num_snapshots: DLNs kept for plots (`snapshot_steps`).
        preserve_scale: rescale the DLN after every update to the spread it had before
            it (`losses.dln.match_surface_scale`), so the teacher changes the loss's
            shape but not its scale (not in the released code; see ``docs/l2t_dln.md``).
        population: the students sharing the DLN and their mesh (default: one
            student); ``state["student"]`` is then stacked, every leaf (P, ...).
        accept: ``"always"`` (released), ``"proper"`` or ``"proper_descent"`` (see the
            module docstring).
        proper_tolerance: the largest corner gap the ``"proper*"`` rules accept.
        keep_after: no proposal is kept before the student has taken this many steps
            (the teacher still learns from every one): an untrained LSTM's first
            proposals can derail a student at a high learning rate. 0: from the start.
    """

    model: nn.Module
    tx: optax.GradientTransformation
    teacher: CoordinateLSTM
    update: TeacherUpdate
    steps_per_call: int
    batch_size: int
    val_batch_size: int
    dln_step_size: float
    total_steps: int
    num_classes: int
    augment: str = "none"
    protocol: str = "fixed"
    redraw_every: int = 250
    num_snapshots: int = 6
    preserve_scale: bool = False
    population: parallel.Population = parallel.SINGLE_STUDENT
    accept: str = "always"
    proper_tolerance: float = 0.05
    keep_after: int = 0

    @property
    def student_teaching(self) -> Teaching:
        """The student's step and training batches, shared with the CE / fixed-DLN runs."""
        return Teaching(self.model, self.tx, dln_lib.dln_loss, self.augment,
                        self.steps_per_call, self.batch_size)

    def snapshot_steps(self) -> list[int]:
        """The student steps at which the rows of ``state["snapshots"]`` are taken.

        Evenly spaced iterations from 0 to the end (rows repeat on very short runs).
        """
        iterations = self.total_steps // self.steps_per_call
        last = max(1, self.num_snapshots - 1)
        return [self.steps_per_call * round(i * iterations / last)
                for i in range(self.num_snapshots)]

    def init(self, rng: jax.Array, splits: data.Splits, dln: dict) -> dict:
        """A fresh student (from `rng`), the given DLN, a fresh LSTM and empty memory."""
        student_rng, teacher_rng = jax.random.split(rng)
        student = self.population.init_students(self.model, self.tx, student_rng,
                                                splits.train.x[:1])
        params = self.teacher.init(teacher_rng)
        flat_dln, _ = ravel_pytree(dln)
        student, shared = self.population.place(student, {
            "dln": dln,
            "teacher": params,
            "teacher_opt": self.update.tx.init(params),
            "memory": self.teacher.init_memory(flat_dln.shape[0]),
            "snapshots": jnp.zeros((self.num_snapshots, flat_dln.shape[0]), flat_dln.dtype),
        })
        return {"student": student, **shared}

    def _train_and_val_splits(self, splits: data.Splits, seed: int, iteration: int):
        if self.protocol == "fixed":
            return splits.train, splits.meta_dev
        draw = iteration // self.redraw_every
        order = np.random.default_rng([seed, 1, draw]).permutation(len(splits.train.y))
        half = len(order) // 2

        def subset(idx):
            t = splits.train
            return data.ArraySplit(t.x[idx], t.y[idx], t.y_clean[idx])

        return subset(np.sort(order[:half])), subset(np.sort(order[half:]))

    def batches(self, splits: data.Splits, seed: int, start_step: int) -> dict:
        """The K training batches of this iteration and its validation batch.

        With a population the training batches are per member, (P, K, B, ...); the
        validation batch is shared.
        """
        iteration = start_step // self.steps_per_call
        train, val = self._train_and_val_splits(splits, seed, iteration)
        batches = self.student_teaching.batches(dataclasses.replace(splits, train=train), seed,
                                      start_step, population=self.population)
        val_batch = data.stacked_batches(val, seed=seed + 1, start_step=iteration,
                                         num_steps=1, batch_size=self.val_batch_size)
        batches["val"] = {k: v[0] for k, v in val_batch.items()}
        return batches

    def _student_features(self, student: engine.StudentState, train_ce, val_ce):
        """Iteration fraction and train / val CE over log(C), stop-gradiented.

        `student` is one student (member 0 of a population: all members are at the
        same step); the CEs are the population's means.
        """
        log_c = jnp.log(float(self.num_classes))
        return jax.lax.stop_gradient(jnp.stack([
            student.step / self.total_steps, train_ce / log_c, val_ce / log_c
        ]))

    def meta_gradients(self, state: dict, batches: dict) -> DLNMetaGradients:
        """Stages A and B: the DLN's hypergradient, the proposal and the teacher's gradient.

        Args:
            state: the method state.
            batches: from `batches` (``"train"``: K stacked batches, ``"val"``: one).

        Returns:
            The intermediate results (nothing is updated); with a population the
            gradients and objectives are averaged over the members and
            ``result_b.state`` holds every member's unroll-B student.
        """
        student = state["student"]
        first = self.population.first(student)
        step_fn = self.student_teaching.step_fn(batches)
        val = batches["val"]
        if self.augment != "none":
            val = {**val, "x": data.augment_batch(jax.random.fold_in(first.rng, 1),
                                                  val["x"], self.augment)}
        objective = self.update.dev_objective_fn(self.model, val)
        estimator = self.population.estimator(self.update.estimator)

        # Stage A: the DLN's hypergradient through the K steps.
        result_a = estimator(step_fn, objective, state["dln"], student, batches["train"])
        flat_phi, unravel = ravel_pytree(state["dln"])
        g, _ = ravel_pytree(result_a.grad)
        g_finite = jnp.all(jnp.isfinite(g))
        g = jax.lax.stop_gradient(jnp.where(g_finite, g, 0.0))
        extra = None
        if self.teacher.num_extra_inputs:
            extra = self._student_features(
                first, result_a.metrics["cross_entropy"].mean(), result_a.value)

        # Stage B: the proposal phi'(psi), the second unroll from the same student on
        # the same batches, and its gradient at phi' pulled back to psi.
        def propose(params):
            steps, memory = self.teacher(params, g, state["memory"], extra)
            # A non-finite hypergradient proposes nothing (and is counted).
            steps = jnp.where(g_finite, steps, 0.0)
            proposal = unravel(flat_phi - self.dln_step_size * steps)
            if self.preserve_scale:
                proposal = dln_lib.match_surface_scale(proposal, state["dln"])
            return proposal, (steps, memory)

        new_phi, pullback, (steps, memory) = jax.vjp(propose, state["teacher"], has_aux=True)
        result_b = estimator(step_fn, objective, new_phi, student, batches["train"])
        (teacher_grad,) = pullback(result_b.grad)
        memory = jax.tree_util.tree_map(
            lambda new, old: jnp.where(g_finite, new, old), memory, state["memory"])
        return DLNMetaGradients(
            hypergrad=g, hypergrad_finite=g_finite, result_a=result_a,
            steps=steps, new_dln=jax.lax.stop_gradient(new_phi),
            memory=jax.lax.stop_gradient(memory),
            result_b=result_b._replace(grad=teacher_grad),
        )

    def outer_step(self, state: dict, batches: dict):
        """One L2T-DLN iteration (stages A, B, C); returns ``(state, metrics)``.

        With a population the inner metrics are (P, K), and each member keeps its own
        unroll-B student.
        """
        m = self.meta_gradients(state, batches)
        teacher, teacher_opt, meta_metrics = self.update.apply(
            state["teacher"], state["teacher_opt"], m.result_b
        )
        # Stage C: the student of unroll B and the new DLN (or, rejected, the old DLN
        # and the student of unroll A), and the new memory.
        step_before = self.student(state).step
        accepted = step_before >= self.keep_after
        if self.accept in ("proper", "proper_descent"):
            gap = dln_lib.probe_dln(m.new_dln)["corner_gap"]
            accepted &= gap <= self.proper_tolerance
        if self.accept == "proper_descent":
            accepted &= m.result_b.value <= m.result_a.value
        dln, student, inner_metrics = jax.tree_util.tree_map(
            lambda new, old: jnp.where(accepted, new, old),
            (m.new_dln, m.result_b.state, m.result_b.metrics),
            (state["dln"], m.result_a.state, m.result_a.metrics))
        probe = dln_lib.probe_dln(dln)  # of the kept DLN
        flat_phi, _ = ravel_pytree(state["dln"])
        new_flat, _ = ravel_pytree(dln)
        metrics = {
            **inner_metrics,  # of the unroll whose student is kept
            **meta_metrics,
            "meta/objective_stage_a": m.result_a.value,
            "meta/hypergrad_norm": jnp.linalg.norm(m.hypergrad),
            # Either gradient non-finite counts (the driver may stop on it).
            "meta/nonfinite": jnp.maximum(meta_metrics["meta/nonfinite"],
                                          1.0 - m.hypergrad_finite.astype(jnp.float32)),
            "teacher/update_norm": jnp.linalg.norm(new_flat - flat_phi),
            "teacher/mean_abs_step": jnp.mean(jnp.abs(m.steps)),
            "dln/accepted": accepted.astype(jnp.float32),
            "dln/margin": probe["margin"],
            "dln/grid_min": probe["grid_min"],
            "dln/spread": probe["spread"],
            "dln/corner_gap": probe["corner_gap"],
            "dln/inverted": (probe["margin"] <= 0).astype(jnp.float32),
        }
        new_state = {
            "student": student,
            "dln": dln,
            "teacher": teacher,
            "teacher_opt": teacher_opt,
            "memory": m.memory,
            "snapshots": self._record_snapshot(
                state["snapshots"], step_before, flat_phi,
                self.population.first(student).step, new_flat),
        }
        return new_state, metrics

    def _record_snapshot(self, snapshots, step_before, flat_before, step_after, flat_after):
        """Writes the DLN into every row whose snapshot step is this one."""
        marks = jnp.asarray(self.snapshot_steps())
        snapshots = jnp.where((marks == step_before)[:, None], flat_before, snapshots)
        return jnp.where((marks == step_after)[:, None], flat_after, snapshots)

    def student(self, state: dict) -> engine.StudentState:
        """The student to evaluate: the only one, or member 0 of a population."""
        return self.population.first(state["student"])
