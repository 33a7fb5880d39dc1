"""Online distillation: ONE, a multi-branch student whose gated ensemble teaches its branches.

ONE (on-the-fly native ensemble; Lan, Zhu & Gong, NeurIPS 2018) trains one network with
a shared trunk and m branches (``config.student.branches``, `students.branched`) in a
single stage, no target model: every branch learns from the labels and from the gated
ensemble of all branches,

    sum_i CE(z_i) + CE(z_e) + w sum_i T^2 KL(sg(softmax(z_e / T)) || softmax(z_i / T)).

* ``one``: ONE's hand-made ramp, ``w(t) = exp(-5 (1 - min(t, R) / R)^2)`` over the
  student's steps t (``config.one.ramp_steps`` = R: the paper's 80 of 300 epochs, scaled
  with the schedule), T = ``config.one.temperature`` (3); ``config.one.ramp_max``
  scales it (ONE: 1; with ``ramp_steps=1``, a constant weight).
* ``l2t-one``: w (and T, with ``config.one.learn_temperature``) set by a loss teacher
  from the student's state (`teachers.WeightTeacher`: the L2T-DLF student-state
  features, the iteration fraction among them, so a ramp is one thing it can learn),
  starting at ``config.one.kl_weight`` and trained by exact meta-gradients of the
  deployable branch's dev objective (``config.teacher``: online windows and / or
  episodes, as L2T-DLF). Its steps compute the ensemble the branches distil from in a
  forward pass outside the student's gradient (one more per step), so the
  meta-gradient follows the ensemble's dependence on the weights, which a stop-gradient
  would drop.

The base network is the same config with ``config.student.branches=1`` under ``ce``.
Evaluation reports the deployable branch (branch 0: the base network's cost) as the
run's error and the gated ensemble beside it (``ensemble_test_error``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from l2t_jax import config_checks as checks
from l2t_jax import teachers
from l2t_jax.losses.distill import online_ensemble_loss
from l2t_jax.methods import base, dlf, teaching
from l2t_jax.students import branched

# What ONE's loss reads of the student (`engine.student_output`).
ACTIVATIONS = (branched.BRANCH_LOGITS, branched.ENSEMBLE_LOGITS)


def ramp(step: jax.Array, ramp_steps: int) -> jax.Array:
    """ONE's KL weight at student step `step`: ``exp(-5 (1 - min(t, R) / R)^2)``."""
    progress = jnp.minimum(step, ramp_steps) / ramp_steps
    return jnp.exp(-5.0 * jnp.square(1.0 - progress))


def one_family(temperature: float):
    """ONE's loss ``family(weights, output, batch)``: weight ``kl_weight`` and, when the
    weights have none, the fixed `temperature`.

    The branches distil from the ensemble of ``batch["target"]`` when the step computed
    it outside the student's gradient (``self_target``: the exact meta-gradient follows
    it), else from the output's own ensemble under a stop-gradient (the same student
    step, when nothing differentiates through it).
    """

    def family(weights, output, batch):
        ensemble = output.activations[branched.ENSEMBLE_LOGITS]
        if "target" in batch:
            target = batch["target"].activations[branched.ENSEMBLE_LOGITS]
        else:
            target = jax.lax.stop_gradient(ensemble)
        return online_ensemble_loss(
            weights["kl_weight"], weights.get("temperature", temperature),
            output.activations[branched.BRANCH_LOGITS], ensemble, target, batch["y"])

    return family


def build_one(config, splits, rng) -> base.Plan:
    """``one``: the ramped loss, one phase."""
    o = config.one
    family = one_family(o.temperature)

    def loss_fn(loss_params, output, batch, state):
        del loss_params
        return family({"kl_weight": o.ramp_max * ramp(state.step, o.ramp_steps)}, output,
                      batch)

    return teaching.fixed_loss_plan(config, splits, rng, loss_fn, activations=ACTIVATIONS)


def loss_teacher(config: ml_collections.ConfigDict, num_classes: int) -> teachers.WeightTeacher:
    """``l2t-one``'s loss teacher: the KL weight in ``config.one.kl_weight_range`` (and T
    in ``config.one.temperature_range`` when learned), from ``kl_weight`` and T."""
    o = config.one
    names, initial, bounds = ["kl_weight"], [o.kl_weight], [tuple(o.kl_weight_range)]
    if o.learn_temperature:
        names.append("temperature")
        initial.append(o.temperature)
        bounds.append(tuple(o.temperature_range))
    return teachers.WeightTeacher(one_family(o.temperature), tuple(names), tuple(initial),
                                  tuple(bounds), num_classes, teachers.NUM_FEATURES)


def build_taught(config, splits, rng) -> base.Plan:
    """``l2t-one``: L2T-DLF's plan with ONE's loss teacher."""
    return dlf.feature_teacher_plan(config, splits, rng,
                                    loss_teacher(config, splits.num_classes), taught=True,
                                    activations=ACTIVATIONS, self_target=True)


def one_checks(config: ml_collections.ConfigDict) -> list:
    """The ``(ok, message)`` checks of ``config.one`` and the multi-branch student."""
    o = config.one
    branches = config.student.get("branches", 1)
    rows = [
        (checks.is_integer(branches) and branches >= 2,
         f"{config.method} trains a multi-branch student: set config.student.branches "
         f">= 2 (ONE's default 3; the base network is branches=1 under method ce)"),
        checks.number("config.one.temperature", o.temperature, above=0),
        (checks.is_integer(o.ramp_steps) and o.ramp_steps >= 1,
         f"config.one.ramp_steps must be >= 1 (an integer; ONE: 80 of 300 epochs), got "
         f"{o.ramp_steps!r}"),
        checks.number("config.one.ramp_max", o.ramp_max, above=0, note=" (ONE: 1)"),
        checks.interval("config.one.kl_weight_range", o.kl_weight_range, at_least=0),
        checks.inside("config.one.kl_weight", o.kl_weight, "config.one.kl_weight_range",
                      o.kl_weight_range),
        checks.flag("config.one.learn_temperature", o.learn_temperature),
        checks.interval("config.one.temperature_range", o.temperature_range, at_least=0),
    ]
    if o.learn_temperature:
        rows.append(checks.inside("config.one.temperature", o.temperature,
                                  "config.one.temperature_range", o.temperature_range))
    return rows


def validate_taught(config: ml_collections.ConfigDict) -> None:
    dlf.validate_teaching(config, "l2t-one", "one", one_checks(config))


# ``one_weights.png``: the loss teacher's KL weight (and T) over the run.
draw_weights = dlf.weight_teacher_drawing(loss_teacher, "one_weights.png", loss_curve=False)

_EXAMPLE = "configs/one.py:mnist1d"

base.register(
    base.Method(
        name="one", description="ONE: a multi-branch student whose gated ensemble "
        "teaches its branches, KL weight on ONE's ramp", example=_EXAMPLE,
        build=build_one, sections=("one",),
        validate=lambda config: base.check_fields(one_checks(config))),
    base.Method(
        name="l2t-one", description="ONE with the KL weight (and optionally T) set by a "
        "loss teacher from the student's state, trained by exact meta-gradients",
        example=_EXAMPLE, build=build_taught, sections=("one", "teacher"),
        validate=validate_taught, draw=draw_weights),
)
