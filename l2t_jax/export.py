"""Learned losses out of finished runs: a pure loss function to train anything with.

A finished run trains its reported student under a loss: L2T-DLF's taught bilinear loss
and its schedule, the DLN that L2T-DLN's teacher shaped, l2t-gce's q, the distillation
weights a loss teacher set (and the hand-set losses too). `load` restores that loss, as
it stands at the end of the run, from the run's verified orbax checkpoint, with the
run's config beside it, as a `LearnedLoss`::

    loss = l2t_jax.export.load("/tmp/dlf")            # a finished launch.train workdir
    value = loss(logits, labels, step=t, num_steps=n)  # pure and jittable

Nothing of the library's training machinery is needed to use it (see
``examples/train_with_learned_loss.py``); ``--config.method=transfer
--config.loss_from=WORKDIR`` trains a student of this library on it (`methods.transfer`).

A loss whose teacher reads the student's state (L2T-DLF, l2t-gce, the distillation
weights) depends on the training's progress ``step / num_steps`` and on two running
statistics, the train cross-entropy and the dev error (`teachers.student_features`).
Pass them as ``stats`` when you track them; without, they are estimated from the batch
(its cross-entropy and its error), which is what the running values average.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from l2t_jax import data, engine, train
from l2t_jax import workdir as run_workdir
from l2t_jax.errors import ConfigError
from l2t_jax.methods import dlf
from l2t_jax.methods import teaching as teaching_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LearnedLoss:
    """The loss a finished run trained its student under, frozen.

    Attributes:
        loss_fn: the run's ``loss_fn(params, output, batch, state)`` (`engine.LossFn`).
        params: what it reads (the loss teacher's parameters, the DLN's phi), as they
            stand at the end of the run; None for a loss without parameters.
        num_classes: C of the run's data.
        num_steps: the run's training length: the clock of a loss that reads the
            iteration fraction (``step / num_steps``).
        initial_stats: the running statistics the loss reads, as they start (``{}``:
            it reads none).
        reads_target: the loss reads a target model's output (distillation); pass
            ``target``.
        self_target: the loss reads the student's own output as its target (l2t-one).
        activations: the student's named activations the loss reads (attention
            transfer); pass ``activations``.
        config: the run's config.
        workdir: the run's directory.
    """

    loss_fn: engine.LossFn
    params: PyTree
    num_classes: int
    num_steps: int
    initial_stats: PyTree
    reads_target: bool
    self_target: bool
    activations: tuple[str, ...]
    config: ml_collections.ConfigDict
    workdir: str

    @property
    def method(self) -> str:
        """The method of the run that learned the loss."""
        return self.config.method

    def __call__(self, logits: jax.Array, labels: jax.Array, *, step=None,
                 num_steps: int | None = None, stats: dict | None = None,
                 target: jax.Array | engine.ModelOutput | None = None,
                 activations: dict | None = None) -> jax.Array:
        """The loss of a batch (a scalar, averaged over it as the run's student saw it).

        Args:
            logits: (B, C) the network's scores.
            labels: (B,) integer labels.
            step: the training step the batch is at; None: the end of training (the
                loss as it landed).
            num_steps: the training's length; `step / num_steps` is read where the
                run's loss read its own progress. None: the run's `num_steps`.
            stats: the running statistics the loss reads (keys of `initial_stats`:
                ``train_loss``, the running train cross-entropy in nats, and
                ``dev_error``, a fraction); None: estimated from this batch.
            target: the target model's logits (or `engine.ModelOutput`), for a
                distillation loss.
            activations: the network's named activations, for attention transfer.

        Returns:
            The loss, a scalar in the logits' dtype.

        Raises:
            ValueError: a distillation loss without its `target` or `activations`.
        """
        if self.reads_target and target is None:
            raise ValueError(f"the loss of {self.workdir} ({self.method}) distills from a "
                             "target model: pass target=its logits")
        if self.activations and activations is None:
            raise ValueError(f"the loss of {self.workdir} ({self.method}) reads the "
                             f"activations {self.activations}: pass activations=")
        output = engine.ModelOutput(logits, activations or {})
        batch = {"y": labels}
        if self.self_target:
            batch["target"] = jax.lax.stop_gradient(output)
        elif target is not None:
            batch["target"] = (target if isinstance(target, engine.ModelOutput)
                               else engine.ModelOutput(target))
        if stats is None and self.initial_stats:
            stats = batch_stats(logits, labels, self.initial_stats)
        clock = self.num_steps if step is None else step * self.num_steps / (
            num_steps or self.num_steps)
        state = engine.StudentState(params=None, model_state=None, opt_state=None,
                                    step=jnp.asarray(clock, logits.dtype), rng=None,
                                    stats=stats or {})
        return self.loss_fn(self.params, output, batch, state)

    def student_loss_fn(self, num_steps: int) -> engine.LossFn:
        """The loss as this library's student step reads it, for a training of
        `num_steps` steps (its clock scaled to the run's)."""
        scale = self.num_steps / num_steps

        def loss_fn(params, output, batch, state):
            clock = state.step.astype(output.logits.dtype) * scale
            return self.loss_fn(params, output, batch, state.replace(step=clock))

        return loss_fn


def batch_stats(logits: jax.Array, labels: jax.Array, like: dict) -> dict:
    """The running statistics a state-feature loss reads, estimated from one batch.

    Args:
        logits: (B, C) scores.
        labels: (B,) labels.
        like: the statistics' keys and dtypes (`LearnedLoss.initial_stats`).

    Returns:
        ``train_loss``: the batch's mean cross-entropy; ``dev_error``: its error rate.

    Raises:
        ValueError: `like` holds other statistics.
    """
    estimates = {
        "train_loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
        "dev_error": jnp.mean(jnp.argmax(logits, -1) != labels),
    }
    if set(like) != set(estimates):
        raise ValueError(f"cannot estimate the statistics {sorted(like)} from a batch: "
                         "pass stats=")
    return {k: jax.lax.stop_gradient(estimates[k]).astype(like[k].dtype) for k in like}


def load(workdir: str) -> LearnedLoss:
    """Restores the loss of the finished run in `workdir`.

    Builds the run's method from its recorded config (loading the run's data, training
    nothing) and restores the last phase's final state from its orbax checkpoint,
    verified against its digest.

    Args:
        workdir: a finished run's directory (``launch.train --workdir``).

    Returns:
        Its `LearnedLoss`.

    Raises:
        ConfigError: not a finished run, a damaged checkpoint, or a method whose student
            trains under no loss of its own (in one line).
    """
    config = run_workdir.read_config(workdir)
    splits = data.load_splits(config.data)
    plan, state = train.restore_final_state(config, workdir, splits)
    loop = plan.phases[-1].loop
    student_loop = loop if isinstance(loop, teaching_lib.Teaching) else getattr(
        loop, "student_teaching", None)
    if not isinstance(student_loop, teaching_lib.Teaching):
        raise ConfigError(f"the run in {workdir} ({config.method}) trains its student "
                          "under no loss of its own to export")
    stats = {} if student_loop.stats_builder is None else student_loop.initial_stats
    return LearnedLoss(
        loss_fn=student_loop.loss_fn,
        params=jax.device_get(state.loss_params),
        num_classes=splits.num_classes,
        num_steps=config.train.num_steps,
        initial_stats=jax.device_get(stats),
        reads_target=student_loop.target_model is not None,
        self_target=student_loop.self_target,
        activations=student_loop.activations,
        config=config,
        workdir=workdir,
    )


def stats_builder(loss: LearnedLoss, model) -> teaching_lib.StatsBuilder | None:
    """The running statistics' update for a new student `model` under `loss`, as the run
    kept them; None for a loss that reads none."""
    return dlf.stats_builder(loss.config, model) if loss.initial_stats else None
