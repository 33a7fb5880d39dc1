"""Noise-robust losses as methods: GCE and SCE hand-set, and GCE with a learned q.

* ``gce``: generalized cross-entropy at ``config.gce.q`` (0.7, the paper's default).
* ``sce``: symmetric cross-entropy, ``config.sce.alpha`` CE + ``config.sce.beta`` RCE
  with log 0 clipped to ``config.sce.log_zero`` (0.1, 1.0, -4: the paper's CIFAR-10
  setting).
* ``l2t-gce``: GCE whose q a loss teacher sets from the student's state,
  ``q_t = sigmoid(theta . s_t + b)`` starting at ``config.gce.q``, trained exactly as
  L2T-DLF's teacher (``config.teacher``: episodes and/or online, exact meta-gradients
  of the dev objective).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from l2t_jax import config_checks as checks
from l2t_jax import teachers
from l2t_jax.losses import output_loss
from l2t_jax.losses.robust import generalized_cross_entropy, symmetric_cross_entropy
from l2t_jax.methods import base, dlf, teaching


def gce_checks(config: ml_collections.ConfigDict) -> list:
    """``config.gce.q`` lies in (0, 1)."""
    return [checks.number("config.gce.q", config.gce.q, above=0, below=1,
                          note=" (1 is MAE, q -> 0 is cross-entropy)")]


def _gce_family(weights, output, batch):
    return generalized_cross_entropy(weights["q"], output.logits, batch["y"])


def _sce_family(weights, output, batch):
    return symmetric_cross_entropy(weights["alpha"], weights["beta"], weights["log_zero"],
                                   output.logits, batch["y"])


def _hand_set(family, section: ml_collections.ConfigDict, config, splits, rng) -> base.Plan:
    """One phase: the student on `family` at the weights of a config section."""
    weights = {k: jnp.asarray(v, jnp.float32) for k, v in section.items()}
    return teaching.fixed_loss_plan(config, splits, rng, output_loss(family),
                                    lambda _: weights)


def build_gce(config, splits, rng) -> base.Plan:
    """One phase: the student on GCE at ``config.gce.q``."""
    return _hand_set(_gce_family, config.gce, config, splits, rng)


def build_sce(config, splits, rng) -> base.Plan:
    """One phase: the student on SCE at ``config.sce`` (alpha, beta, log_zero)."""
    return _hand_set(_sce_family, config.sce, config, splits, rng)


def gce_teacher(config: ml_collections.ConfigDict, num_classes: int) -> teachers.WeightTeacher:
    """The loss teacher of ``l2t-gce``: q in (0, 1), starting at ``config.gce.q``."""
    return teachers.WeightTeacher(_gce_family, ("q",), (config.gce.q,), ((0.0, 1.0),),
                                  num_classes, teachers.NUM_FEATURES)


def build_l2t_gce(config, splits, rng) -> base.Plan:
    """The L2T-DLF plan with the GCE teacher (`dlf.feature_teacher_plan`)."""
    return dlf.feature_teacher_plan(config, splits, rng,
                                    gce_teacher(config, splits.num_classes), taught=True)


# ``gce_teacher.png``: the learned q_t over the run, and the loss vs p_y.
draw_l2t_gce = dlf.weight_teacher_drawing(gce_teacher, "gce_teacher.png")


def validate_l2t_gce(config) -> None:
    dlf.validate_teaching(config, "l2t-gce", "gce", gce_checks(config))


def validate_sce(config) -> None:
    s = config.sce
    base.check_fields([
        checks.number("config.sce.alpha", s.alpha, at_least=0),
        checks.number("config.sce.beta", s.beta, at_least=0),
        (s.alpha != 0 or s.beta != 0,
         "config.sce.alpha and config.sce.beta must not both be 0"),
        checks.number("config.sce.log_zero", s.log_zero, below=0, note=" (the paper's -4)"),
    ])


base.register(
    base.Method(
        name="gce",
        description="generalized cross-entropy (1 - p_y^q) / q, hand-set q (0.7)",
        example="configs/robust.py:digits,noisy", build=build_gce, sections=("gce",),
        validate=lambda config: base.check_fields(gce_checks(config))),
    base.Method(
        name="sce",
        description="symmetric cross-entropy alpha CE + beta RCE, hand-set (0.1, 1.0, A = -4)",
        example="configs/robust.py:digits,noisy", build=build_sce, sections=("sce",),
        validate=validate_sce),
    base.Method(
        name="l2t-gce",
        description="GCE whose q a loss teacher sets from the student's state, trained by "
                    "exact meta-gradients as L2T-DLF's teacher",
        example="configs/robust.py:digits,noisy", build=build_l2t_gce,
        sections=("teacher", "gce"), validate=validate_l2t_gce, draw=draw_l2t_gce),
)
