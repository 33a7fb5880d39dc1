"""Offline distillation: a student trained against a frozen *target model*.

The target model is the network distilled from (the KD literature's "teacher"): trained
by cross-entropy, frozen, and run inside the student's step on the same augmented batch
(`engine.TargetModel`). In this library a *teacher* is always a loss teacher: the
``l2t-*`` methods below let one set the distillation loss's hand-set weights from the
student's state, trained by exact meta-gradients as L2T-DLF's teacher. Config sections:
``target`` (the target model), ``distill`` (the loss's hand-set weights), ``teacher``
(the loss teacher, as in `configs/l2t_dlf.py`).

* ``kd-target``: the target model alone (CE; its run directory is a target that other
  runs restore through ``config.target.workdir``).
* ``kd``: Hinton KD, ``(1 - alpha) CE + alpha T^2 KL(p_target^T || p^T)``.
* ``at``: CE + attention transfer, ``beta`` at each stage of ``config.distill.stages``.
* ``at-kd``: KD + attention transfer.
* ``l2t-kd``, ``l2t-at``, ``l2t-at-kd``: the same losses with their weights (alpha and
  T; the betas) set by a loss teacher (`teachers.WeightTeacher`), starting at the
  hand-set values.

The target model comes from ``config.target.workdir`` when that directory holds its
finished training; otherwise the run trains it first, as its own resumable phase, in
that directory (``<workdir>/target`` when the field is empty), and says so.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from l2t_jax import config_checks as checks
from l2t_jax import optimizers, students, teachers
from l2t_jax import workdir as run_workdir
from l2t_jax.errors import ConfigError
from l2t_jax.losses import cross_entropy_loss, mean_cross_entropy, output_loss
from l2t_jax.losses.distill import attention_transfer, kd_loss
from l2t_jax.methods import base, dlf, teaching

TARGET_DIR = "target"
# The target model's key is folded out of the run's, so that the target trained inside
# a distillation run is the `kd-target` run of the same seed.
_TARGET_KEY = 1
_STUDENTS_WITHOUT_FEATURE_MAPS = ("mlp",)


def uses_kd(method: str) -> bool:
    """Whether the method's loss has the KD term."""
    return method.removeprefix("l2t-") in ("kd", "at-kd")


def uses_at(method: str) -> bool:
    """Whether the method's loss has attention-transfer terms."""
    return method.removeprefix("l2t-") in ("at", "at-kd")


def distillation_family(kd: bool, stages: tuple[str, ...]):
    """The loss ``family(weights, output, batch)`` of a distillation method.

    CE, or KD (`losses.distill.kd_loss`: weights ``alpha``, ``temperature``) when `kd`,
    plus ``beta_<stage> * mean((q_s - q_t)^2)`` per attention-transfer stage; the
    target model's output is ``batch["target"]``.
    """

    def family(weights, output, batch):
        target = batch["target"]
        if kd:
            loss = kd_loss(weights["alpha"], weights["temperature"], output.logits,
                           target.logits, batch["y"])
        else:
            loss = mean_cross_entropy(output.logits, batch["y"])
        if stages:
            betas = {stage: weights[f"beta_{stage}"] for stage in stages}
            loss = loss + attention_transfer(betas, output.activations, target.activations)
        return loss

    return family


def hand_set_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The method's hand-set weights by name, from ``config.distill``."""
    d = config.distill
    weights = {}
    if uses_kd(config.method):
        weights.update(alpha=d.alpha, temperature=d.temperature)
    if uses_at(config.method):
        weights.update({f"beta_{stage}": d.beta for stage in d.stages})
    return weights


def loss_teacher(config: ml_collections.ConfigDict, num_classes: int) -> teachers.WeightTeacher:
    """The loss teacher of an ``l2t-*`` distillation method: each weight in its bounds
    (alpha in (0, 1), T and the betas in ``config.distill``'s ranges), starting at the
    hand-set value."""
    d = config.distill
    bounds = {"alpha": (0.0, 1.0), "temperature": tuple(d.temperature_range)}
    weights = hand_set_weights(config)
    ranges = [bounds.get(name, tuple(d.beta_range)) for name in weights]
    stages = tuple(d.stages) if uses_at(config.method) else ()
    return teachers.WeightTeacher(distillation_family(uses_kd(config.method), stages),
                                  tuple(weights), tuple(weights.values()), tuple(ranges),
                                  num_classes, teachers.NUM_FEATURES)


def target_run(config: ml_collections.ConfigDict, splits, rng: jax.Array,
               name: str | None = None) -> teaching.TargetRun:
    """The target model and its training phase (CE, ``config.target``'s schedule).

    Args:
        config: the experiment config.
        splits: the data (the same labels as the student's, noisy ones included).
        rng: the run's PRNG key.
        name: the phase's directory; default ``config.target.workdir`` (absolute), or
            ``TARGET_DIR`` under the run's workdir when that is empty.

    Returns:
        The `teaching.TargetRun`, reading ``config.distill.stages`` when the method has
        attention transfer.
    """
    t = config.target
    if name is None:
        name = os.path.abspath(t.workdir) if t.workdir else TARGET_DIR
    model = students.build_student(t.model, splits.num_classes)
    loop = teaching.student_teaching(
        config, splits, cross_entropy_loss, model=model,
        tx=optimizers.make_inner_optimizer(config.optimizer, t.num_steps))
    schedule = base.Schedule(t.num_steps, config.train.eval_every,
                             config.train.checkpoint_every, config.train.eval_batch_size)
    key = jax.random.fold_in(rng, _TARGET_KEY)

    def init(finished):
        del finished
        check_target_run(config, name)
        if name == TARGET_DIR:
            logging.info("target model (%s): trained first in the run's %r directory, "
                         "resumed there if interrupted", t.model.name, TARGET_DIR)
        elif name and not os.path.isdir(os.path.join(name, "checkpoints")):
            logging.info("no trained target model in %s: training it there first (%s, "
                         "%d steps)", name, t.model.name, t.num_steps)
        return loop.init(key, splits)

    phase = base.Phase(name, loop, schedule, init)
    stages = tuple(config.distill.stages) if uses_at(config.method) else ()
    return teaching.TargetRun(phase, stages)


def check_target_run(config: ml_collections.ConfigDict, directory: str) -> None:
    """Checks a ``kd-target`` run's saved config in `directory` against this config.

    Raises:
        ConfigError: it trained another network than ``config.target.model``.
    """
    path = os.path.join(directory, run_workdir.CONFIG_FILE)
    if not directory or not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    model = saved.get("target", {}).get("model")
    if model is not None and model != json.loads(config.target.model.to_json()):
        raise ConfigError(f"the target run in {directory} trained {model}, not "
                          f"config.target.model; point config.target.workdir elsewhere")
    ours = json.loads(config.data.to_json())
    if saved.get("data") != ours:
        logging.warning("the target run in %s trained on other data settings (%s) than "
                        "this run's (%s)", directory, saved.get("data"), ours)


def build_target(config, splits, rng) -> base.Plan:
    """``kd-target``: the target model's training as the reported run (its summary names
    the target's network as the student: the network this run trained)."""
    def finish(finished, workdir, summary):
        del finished, workdir, summary
        return {"student": config.target.model.name}

    return base.Plan((target_run(config, splits, rng, name="").phase,), finish)


def build_hand_set(config, splits, rng) -> base.Plan:
    """The target's phase, then the student on the loss at ``config.distill``'s weights."""
    target = target_run(config, splits, rng)
    stages = target.activations
    weights = {k: jnp.asarray(v, jnp.float32) for k, v in hand_set_weights(config).items()}
    loss_fn = output_loss(distillation_family(uses_kd(config.method), stages))
    _, student_rng = jax.random.split(rng)
    student = teaching.student_teaching(config, splits, loss_fn, **target.fields())
    phase = teaching.student_phase(config, splits, student, student_rng,
                                   lambda finished: weights, target=target)
    return base.Plan((target.phase, phase))


def build_taught(config, splits, rng) -> base.Plan:
    """The target's phase, then L2T-DLF's plan with the distillation loss teacher."""
    return dlf.feature_teacher_plan(config, splits, rng,
                                    loss_teacher(config, splits.num_classes), taught=True,
                                    target=target_run(config, splits, rng))


# ``distill_weights.png``: the loss teacher's weights over the run (dotted: hand-set).
draw_weights = dlf.weight_teacher_drawing(loss_teacher, "distill_weights.png",
                                          loss_curve=False)


def validate_target(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.target``: its network (a student config) and its length."""
    t = config.target
    log_every = config.train.log_every
    base.check_fields([
        ("name" in t.model, "config.target.model needs a name (a student network, e.g. "
         "cnn1d or wrn)"),
        (checks.is_integer(t.num_steps) and t.num_steps >= 1 and t.num_steps % log_every == 0,
         f"config.target.num_steps must be a positive multiple of config.train.log_every "
         f"({log_every}), got {t.num_steps!r}"),
    ])
    students.build_student(t.model, num_classes=2, section="config.target.model")


def distill_checks(config: ml_collections.ConfigDict) -> list:
    """The ``(ok, message)`` checks of ``config.distill`` for the configured method."""
    d = config.distill
    method = config.method
    rows = []
    if uses_kd(method):
        rows += [checks.number("config.distill.alpha", d.alpha, at_least=0, at_most=1),
                 checks.number("config.distill.temperature", d.temperature, above=0)]
    if uses_at(method):
        rows += [
            (isinstance(d.stages, tuple | list) and len(d.stages) > 0
             and all(isinstance(stage, str) for stage in d.stages),
             f"config.distill.stages must name at least one activation (e.g. group_1, "
             f"group_2, group_3 of a WRN / ResNet), got {d.stages!r}"),
            checks.number("config.distill.beta", d.beta, at_least=0),
            (config.student.name not in _STUDENTS_WITHOUT_FEATURE_MAPS,
             f"{method} needs a student with feature maps; {config.student.name!r} "
             "has none (use kd / l2t-kd, or a convolutional config.student)"),
        ]
    if method.startswith("l2t-"):  # each weight strictly inside the teacher's bounds
        rows += [checks.interval("config.distill.temperature_range", d.temperature_range,
                                 at_least=0),
                 checks.interval("config.distill.beta_range", d.beta_range, at_least=0)]
        if uses_kd(method):
            rows += [checks.number("config.distill.alpha", d.alpha, above=0, below=1,
                                   note=f" with {method}"),
                     checks.inside("config.distill.temperature", d.temperature,
                                   "config.distill.temperature_range", d.temperature_range)]
        if uses_at(method):
            rows.append(checks.inside("config.distill.beta", d.beta,
                                      "config.distill.beta_range", d.beta_range))
    return rows


def validate_hand_set(config: ml_collections.ConfigDict) -> None:
    validate_target(config)
    base.check_fields(distill_checks(config))


def validate_taught(config: ml_collections.ConfigDict) -> None:
    validate_target(config)
    dlf.validate_teaching(config, config.method, config.method.removeprefix("l2t-"),
                          distill_checks(config))


_LOSSES = {
    "kd": "Hinton KD, (1 - alpha) CE + alpha T^2 KL to the target model (0.9, T = 4)",
    "at": "CE + attention transfer to the target model's stage maps (beta 1e3 per stage)",
    "at-kd": "KD + attention transfer",
}
_EXAMPLE = "configs/distill.py:mnist1d,noisy"
_AT_EXAMPLE = "configs/distill.py:mnist_5k"

base.register(
    base.Method(
        name="kd-target",
        description="the target model alone (CE on config.target.model): what the "
                    "distillation methods distill from",
        example=_EXAMPLE, build=build_target, sections=("target",),
        validate=validate_target),
    *(base.Method(name=name, description=description,
                  example=_AT_EXAMPLE if uses_at(name) else _EXAMPLE,
                  build=build_hand_set, sections=("target", "distill"),
                  validate=validate_hand_set)
      for name, description in _LOSSES.items()),
    *(base.Method(name=f"l2t-{name}",
                  description=f"{name} with its weights set by a loss teacher from the "
                              "student's state, trained by exact meta-gradients",
                  example=_AT_EXAMPLE if uses_at(name) else _EXAMPLE,
                  build=build_taught, sections=("target", "distill", "teacher"),
                  validate=validate_taught, draw=draw_weights)
      for name in _LOSSES),
)
