"""Plain cross-entropy training: the baseline every learned loss is compared with."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import optax

from l2t_jax import data, engine
from l2t_jax.losses import cross_entropy_loss


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """A student trained by its inner optimizer on mean cross-entropy.

    The state is the `engine.StudentState`; one outer step is `steps_per_call` inner
    steps in one `lax.scan`.

    Attributes:
        model: the Flax student.
        tx: the inner optimizer.
        augment: augmentation kind (see `l2t_jax.data.augment_batch`).
        steps_per_call: inner steps per `outer_step`.
    """

    model: nn.Module
    tx: optax.GradientTransformation
    augment: str
    steps_per_call: int

    def init(self, rng: jax.Array, sample_x: np.ndarray) -> engine.StudentState:
        """Initialises the student from `rng` (input shape from `sample_x`)."""
        return engine.init_student_state(self.model, self.tx, rng, sample_x)

    def outer_step(self, state: engine.StudentState, batches: dict):
        """Trains `steps_per_call` steps on stacked batches; returns (state, metrics)."""
        augment = None
        if self.augment != "none":
            def augment(key, x):
                return data.augment_batch(key, x, self.augment)
        step_fn = engine.make_student_step(self.model, cross_entropy_loss, self.tx, augment)
        return engine.unroll(step_fn, None, state, batches)

    def student(self, state: engine.StudentState) -> engine.StudentState:
        """The student to evaluate."""
        return state
