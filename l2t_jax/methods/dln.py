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
import os
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.flatten_util import ravel_pytree

from l2t_jax import config_checks as checks
from l2t_jax import data, engine, optimizers, plots, students
from l2t_jax.checkpoint import save_params
from l2t_jax.errors import ConfigError
from l2t_jax.losses import dln as dln_lib
from l2t_jax.losses import logits_loss
from l2t_jax.methods import base, teaching
from l2t_jax.methods.teaching import TeacherUpdate, Teaching
from l2t_jax.population import SINGLE_STUDENT, Population
from l2t_jax.teachers.lstm import CoordinateLSTM

PROTOCOLS = ("fixed", "redraw")
ACCEPT_RULES = ("always", "proper", "proper_descent")
DLN_INITS = ("released", "warm")
STUDENT_FEATURE_NAMES = ("iteration_fraction", "train_ce", "val_ce")
DLN_PARAMS_FILE = "dln_params.npz"
DLN_SNAPSHOTS_FILE = "dln_snapshots.npz"
TEACHER_PARAMS_FILE = "teacher_params.npz"
# A run whose final dev error is this many points above its best one is reported as
# collapsed (the learned loss misled the student late in the run).
COLLAPSE_POINTS = 10.0
# The student's loss: the DLN's output averaged over the batch's 1-vs-1 rows.
dln_student_loss = logits_loss(dln_lib.dln_loss)


@flax.struct.dataclass
class DLNState:
    """The state of an L2T-DLN run.

    Attributes:
        student: the student (stacked (P, ...) with a population).
        loss_params: the loss network's phi, which the student's loss reads.
        teacher_params: the LSTM teacher's parameters psi.
        teacher_opt_state: their optimizer state.
        teacher_memory: the LSTM's hidden and cell states, per DLN coordinate.
        loss_snapshots: (num_snapshots, N) the flattened DLN at `snapshot_steps`.
    """

    student: engine.StudentState
    loss_params: Any
    teacher_params: Any
    teacher_opt_state: Any
    teacher_memory: Any
    loss_snapshots: jax.Array


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
    """The L2T-DLN method's outer loop; its state is a `DLNState`.

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
            student); ``state.student`` is then stacked, every leaf (P, ...).
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
    population: Population = SINGLE_STUDENT
    accept: str = "always"
    proper_tolerance: float = 0.05
    keep_after: int = 0

    @property
    def student_teaching(self) -> Teaching:
        """The student's step and training batches, shared with the CE / fixed-DLN runs."""
        return Teaching(self.model, self.tx, dln_student_loss, self.augment,
                        self.steps_per_call, self.batch_size)

    def snapshot_steps(self) -> list[int]:
        """The student steps at which the rows of ``state.loss_snapshots`` are taken.

        Evenly spaced iterations from 0 to the end (rows repeat on very short runs).
        """
        iterations = self.total_steps // self.steps_per_call
        last = max(1, self.num_snapshots - 1)
        return [self.steps_per_call * round(i * iterations / last)
                for i in range(self.num_snapshots)]

    def init(self, rng: jax.Array, splits: data.Splits, dln: dict) -> DLNState:
        """A fresh student (from `rng`), the given DLN, a fresh LSTM and empty memory."""
        student_rng, teacher_rng = jax.random.split(rng)
        student = self.population.init_students(self.model, self.tx, student_rng,
                                                splits.train.x[:1])
        params = self.teacher.init(teacher_rng)
        flat_dln, _ = ravel_pytree(dln)
        student, shared = self.population.place(student, {
            "loss_params": dln,
            "teacher_params": params,
            "teacher_opt_state": self.update.tx.init(params),
            "teacher_memory": self.teacher.init_memory(flat_dln.shape[0]),
            "loss_snapshots": jnp.zeros((self.num_snapshots, flat_dln.shape[0]),
                                        flat_dln.dtype),
        })
        return DLNState(student=student, **shared)

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

    def meta_gradients(self, state: DLNState, batches: dict) -> DLNMetaGradients:
        """Stages A and B: the DLN's hypergradient, the proposal and the teacher's gradient.

        Args:
            state: the method state.
            batches: from `batches` (``"train"``: K stacked batches, ``"val"``: one).

        Returns:
            The intermediate results (nothing is updated); with a population the
            gradients and objectives are averaged over the members and
            ``result_b.state`` holds every member's unroll-B student.
        """
        student = state.student
        first = self.population.first(student)
        step_fn = self.student_teaching.step_fn(batches)
        val = batches["val"]
        if self.augment != "none":
            val = {**val, "x": data.augment_batch(jax.random.fold_in(first.rng, 1),
                                                  val["x"], self.augment)}
        objective = self.update.dev_objective_fn(self.model, val)
        estimator = self.population.estimator(self.update.estimator)

        # Stage A: the DLN's hypergradient through the K steps.
        result_a = estimator(step_fn, objective, state.loss_params, student, batches["train"])
        flat_phi, unravel = ravel_pytree(state.loss_params)
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
            steps, memory = self.teacher(params, g, state.teacher_memory, extra)
            # A non-finite hypergradient proposes nothing (and is counted).
            steps = jnp.where(g_finite, steps, 0.0)
            proposal = unravel(flat_phi - self.dln_step_size * steps)
            if self.preserve_scale:
                proposal = dln_lib.match_surface_scale(proposal, state.loss_params)
            return proposal, (steps, memory)

        new_phi, pullback, (steps, memory) = jax.vjp(propose, state.teacher_params,
                                                     has_aux=True)
        result_b = estimator(step_fn, objective, new_phi, student, batches["train"])
        (teacher_grad,) = pullback(result_b.grad)
        memory = jax.tree_util.tree_map(
            lambda new, old: jnp.where(g_finite, new, old), memory, state.teacher_memory)
        return DLNMetaGradients(
            hypergrad=g, hypergrad_finite=g_finite, result_a=result_a,
            steps=steps, new_dln=jax.lax.stop_gradient(new_phi),
            memory=jax.lax.stop_gradient(memory),
            result_b=result_b._replace(grad=teacher_grad),
        )

    def outer_step(self, state: DLNState, batches: dict):
        """One L2T-DLN iteration (stages A, B, C); returns ``(state, metrics)``.

        With a population the inner metrics are (P, K), and each member keeps its own
        unroll-B student.
        """
        m = self.meta_gradients(state, batches)
        teacher, teacher_opt, meta_metrics = self.update.apply(
            state.teacher_params, state.teacher_opt_state, m.result_b
        )
        # Stage C: the student of unroll B and the new DLN (or, rejected, the old DLN
        # and the student of unroll A), and the new memory.
        step_before = self.student(state).step
        # A proposal that is not finite (its parameters or its loss surface), or under
        # which the student's unroll is not, is never kept and counts as non-finite.
        proposed = dln_lib.probe_dln(m.new_dln)
        proposal_finite = teaching.all_finite(
            (m.new_dln, proposed, m.result_b.value, m.result_b.metrics))
        accepted = (step_before >= self.keep_after) & proposal_finite
        if self.accept in ("proper", "proper_descent"):
            accepted &= proposed["corner_gap"] <= self.proper_tolerance
        if self.accept == "proper_descent":
            accepted &= m.result_b.value <= m.result_a.value
        dln, student, inner_metrics = jax.tree_util.tree_map(
            lambda new, old: jnp.where(accepted, new, old),
            (m.new_dln, m.result_b.state, m.result_b.metrics),
            (state.loss_params, m.result_a.state, m.result_a.metrics))
        probe = dln_lib.probe_dln(dln)  # of the kept DLN
        flat_phi, _ = ravel_pytree(state.loss_params)
        new_flat, _ = ravel_pytree(dln)
        metrics = {
            **inner_metrics,  # of the unroll whose student is kept
            **meta_metrics,
            "meta/objective_stage_a": m.result_a.value,
            "meta/hypergrad_norm": jnp.linalg.norm(m.hypergrad),
            # Either gradient or the proposal non-finite counts.
            "meta/nonfinite": jnp.maximum(
                meta_metrics["meta/nonfinite"],
                1.0 - (m.hypergrad_finite & proposal_finite).astype(jnp.float32)),
            "teacher/update_norm": jnp.linalg.norm(new_flat - flat_phi),
            "teacher/mean_abs_step": jnp.mean(jnp.abs(m.steps)),
            "dln/accepted": accepted.astype(jnp.float32),
            "dln/margin": probe["margin"],
            "dln/grid_min": probe["grid_min"],
            "dln/spread": probe["spread"],
            "dln/corner_gap": probe["corner_gap"],
            "dln/inverted": (probe["margin"] <= 0).astype(jnp.float32),
        }
        new_state = DLNState(
            student=student,
            loss_params=dln,
            teacher_params=teacher,
            teacher_opt_state=teacher_opt,
            teacher_memory=m.memory,
            loss_snapshots=self._record_snapshot(
                state.loss_snapshots, step_before, flat_phi,
                self.population.first(student).step, new_flat),
        )
        return new_state, metrics

    def _record_snapshot(self, snapshots, step_before, flat_before, step_after, flat_after):
        """Writes the DLN into every row whose snapshot step is this one."""
        marks = jnp.asarray(self.snapshot_steps())
        snapshots = jnp.where((marks == step_before)[:, None], flat_before, snapshots)
        return jnp.where((marks == step_after)[:, None], flat_after, snapshots)

    def student(self, state: DLNState) -> engine.StudentState:
        """The student to evaluate: the only one, or member 0 of a population."""
        return self.population.first(state.student)


# --------------------------------------------------------------------------- config


def dln_checks(config: ml_collections.ConfigDict) -> list:
    """The ``(ok, message)`` checks of the ``dln`` section and the batch sizes it draws.

    Reads the split sizes of ``config.data`` and ``config.train.batch_size``, both
    already checked (`l2t_jax.train.validate_config` checks them before the method).
    """
    d = config.dln
    # The fixed protocol validates on the teachers' dev split; the redraw protocol trains
    # on one half of the train split and validates on the other.
    sizes = data.split_sizes(config.data)
    redraw = d.protocol == "redraw"
    half = sizes["train"] // 2
    batch_size = config.train.batch_size
    return [
        (not redraw or batch_size <= half,
         f"config.train.batch_size must be <= {half} with config.dln.protocol='redraw' "
         f"(half the train split trains), got {batch_size}"),
        checks.one_of("config.dln.init", d.init, DLN_INITS),
        checks.one_of("config.dln.protocol", d.protocol, PROTOCOLS),
        checks.one_of("config.dln.accept", d.accept, ACCEPT_RULES),
        checks.number("config.dln.proper_tolerance", d.proper_tolerance, at_least=0),
        checks.integer("config.dln.keep_after", d.keep_after, minimum=0,
                       note=" (student steps)"),
        *teaching.teacher_update_checks(config, "dln"),
        checks.integer("config.dln.hidden", d.hidden),
        checks.integer("config.dln.depth", d.depth),
        checks.integer("config.dln.teacher_hidden", d.teacher_hidden),
        checks.integer("config.dln.teacher_cells", d.teacher_cells, minimum=2),
        checks.flag("config.dln.student_features", d.student_features),
        checks.flag("config.dln.preserve_scale", d.preserve_scale),
        checks.integer("config.dln.unroll_steps", d.unroll_steps),
        checks.integer("config.dln.val_batch_size", d.val_batch_size,
                       maximum=sizes["train"] - half if redraw else sizes["meta_dev"],
                       note=" (half the train split validates)" if redraw else
                       " (the teachers' dev split: config.data.dev_size, or meta_dev_size)"),
        checks.number("config.dln.step_size", d.step_size, above=0),
        checks.integer("config.dln.warm_steps", d.warm_steps),
        checks.one_of("config.dln.warm_target", d.warm_target, dln_lib.WARM_TARGETS),
        checks.number("config.dln.warm_sharpness", d.warm_sharpness, above=0,
                      note=" (k of the soft margin)"),
        checks.integer("config.dln.redraw_every", d.redraw_every, note=" (iterations)"),
        checks.integer("config.dln.num_snapshots", d.num_snapshots, minimum=2),
    ]


def _validate(taught: bool):
    def validate(config):
        base.check_fields(dln_checks(config))
        teaching.validate_population_size(config, "dln", trains_population=taught,
                                          what="method 'l2t-dln'")
        if not taught:
            return
        for field in ("log_every", "eval_every", "checkpoint_every", "num_steps"):
            if config.train[field] % config.dln.unroll_steps:
                raise ConfigError(
                    f"config.train.{field} ({config.train[field]}) must be a multiple of "
                    f"config.dln.unroll_steps ({config.dln.unroll_steps}): one L2T-DLN "
                    "iteration trains the student that many steps"
                )
    return validate


def initial_dln(config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """The DLN the student's loss starts from: the released init, or warm-started.

    Args:
        config: the experiment config (reads ``config.dln``).
        rng: PRNG key.

    Returns:
        phi.
    """
    d = config.dln
    init_rng, warm_rng = jax.random.split(rng)
    phi = dln_lib.init_dln(init_rng, d.hidden, d.depth)
    if d.init == "warm":
        phi = jax.jit(dln_lib.warm_start_dln, static_argnames=("target", "steps"))(
            phi, warm_rng, target=d.warm_target, steps=d.warm_steps,
            sharpness=d.warm_sharpness)
    return phi


def build_dln_teaching(config: ml_collections.ConfigDict, splits: data.Splits) -> DLNTeaching:
    """The L2T-DLN loop (the reported student is the one it trains: member 0 of a
    population)."""
    d = config.dln
    return DLNTeaching(
        model=students.build_student(config.student, splits.num_classes),
        tx=optimizers.make_inner_optimizer(config.optimizer, config.train.num_steps),
        teacher=CoordinateLSTM(d.teacher_hidden, d.teacher_cells,
                               len(STUDENT_FEATURE_NAMES) if d.student_features else 0),
        update=teaching.teacher_update(config, "dln"),
        steps_per_call=d.unroll_steps,
        batch_size=config.train.batch_size,
        val_batch_size=d.val_batch_size,
        dln_step_size=d.step_size,
        total_steps=config.train.num_steps,
        num_classes=splits.num_classes,
        augment=config.data.augment,
        protocol=d.protocol,
        redraw_every=d.redraw_every,
        num_snapshots=d.num_snapshots,
        preserve_scale=d.preserve_scale,
        population=teaching.build_population(config, "dln", config.train.batch_size),
        accept=d.accept,
        proper_tolerance=d.proper_tolerance,
        keep_after=d.keep_after,
    )


def save_dln(method: DLNTeaching, state: DLNState, workdir: str, summary: dict) -> dict:
    """Writes the final DLN, the teacher and the DLN's snapshots; returns the DLN's
    health and collapse flags.

    Flags (also logged as warnings): ``dln_inverted`` (the final DLN rates a confident
    wrong answer no worse than a confident right one), ``dln_improper`` (the right answer
    is not the final DLN's minimum: corner gap above the method's ``proper_tolerance``,
    so the student can lower its loss by answering wrong), ``dln_scale_growth`` (the final
    DLN's spread over its initial one: a large value means the teacher inflated the loss,
    i.e. the student's step size), ``collapsed`` (final dev error more than
    `COLLAPSE_POINTS` above the best).
    """
    save_params(state.loss_params, os.path.join(workdir, DLN_PARAMS_FILE))
    save_params(state.teacher_params, os.path.join(workdir, TEACHER_PARAMS_FILE))
    np.savez(os.path.join(workdir, DLN_SNAPSHOTS_FILE),
             snapshots=np.asarray(state.loss_snapshots),
             steps=np.asarray(method.snapshot_steps()))
    probe = {k: float(v) for k, v in dln_lib.probe_dln(state.loss_params).items()}
    unravel = jax.flatten_util.ravel_pytree(state.loss_params)[1]
    initial = float(dln_lib.probe_dln(unravel(state.loss_snapshots[0]))["spread"])
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


def build_taught(config: ml_collections.ConfigDict, splits: data.Splits,
                 rng: jax.Array) -> base.Plan:
    """``l2t-dln``: one phase of L2T-DLN iterations; the finish writes the DLN, the
    teacher and the snapshots (`save_dln`)."""
    dln_rng, student_rng = jax.random.split(rng)
    method = build_dln_teaching(config, splits)

    def init(finished):
        del finished
        return method.init(student_rng, splits, initial_dln(config, dln_rng))

    phase = base.Phase("", method, base.student_schedule(config), init, "dln")

    def finish(finished, workdir, summary):
        return save_dln(method, finished[""], workdir, summary)

    return base.Plan((phase,), finish)


def build_fixed(config: ml_collections.ConfigDict, splits: data.Splits,
                rng: jax.Array) -> base.Plan:
    """``l2t-dln-fixed``: the student under the initial DLN, frozen."""

    def finish(finished, workdir, summary):
        del summary
        save_params(finished[""].loss_params, os.path.join(workdir, DLN_PARAMS_FILE))
        return {}

    return teaching.fixed_loss_plan(config, splits, rng, dln_student_loss,
                                    lambda dln_rng: initial_dln(config, dln_rng), finish,
                                    nonfinite_section="dln")


def draw_dln_loss(config: ml_collections.ConfigDict, workdir: str, records: list[dict],
                  summary: dict) -> list[str]:
    """``dln_loss.png``: the loss network's surface over (sigmoid z_y, sigmoid z_j) at
    several points of the run, the teacher's update magnitudes and the DLN's margin."""
    snapshots_path = os.path.join(workdir, DLN_SNAPSHOTS_FILE)
    if not os.path.exists(snapshots_path):
        return []
    template = dln_lib.init_dln(jax.random.PRNGKey(0), config.dln.hidden, config.dln.depth)
    unravel = jax.flatten_util.ravel_pytree(template)[1]
    with np.load(snapshots_path) as f:
        dlns = [(int(step), unravel(row)) for step, row in zip(f["steps"], f["snapshots"])]
    path = os.path.join(workdir, "dln_loss.png")
    plots.plot_dln_loss(dlns, records, path, plots.run_title(summary))
    return [path]


base.register(
    base.Method(
        name="l2t-dln",
        description="L2T-DLN: an LSTM teacher updates the student's loss network while "
                    "the student trains (second-order meta-gradients through K steps)",
        example="configs/l2t_dln.py:digits,noisy",
        build=build_taught, sections=("dln",), validate=_validate(taught=True),
        draw=draw_dln_loss),
    base.Method(
        name="l2t-dln-fixed",
        description="the L2T-DLN loss network frozen at its initialisation (released or "
                    "warm-started)",
        example="configs/l2t_dln.py:digits,noisy",
        build=build_fixed, sections=("dln",), validate=_validate(taught=False)),
)
