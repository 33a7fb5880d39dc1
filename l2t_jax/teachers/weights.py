"""A loss teacher that sets the hand-set weights of a loss from the student's state.

Hand-made losses carry a few scalars chosen by hand: GCE's q, SCE's alpha and beta, a
distillation loss's weights and temperature (whose terms read the target model's
output in the batch and the student's activations: a family sees both).
`WeightTeacher` sets each one from the student-state features s_t
(`teachers.features`):

    w_i(s_t) = low_i + (high_i - low_i) * sigmoid(theta_i . s_t + b_i)

theta starts at 0 and b_i at the value that gives the hand-set w_i, so the untaught
teacher is the hand-set loss and every parameter has a meta-gradient from the start.
It has the `DLFTeacher` interface (``init``, ``student_loss``, ``num_classes``), so the L2T-DLF
machinery trains it (episodes or online, exact meta-gradients).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class WeightTeacher:
    """The teacher's static structure; its parameters are a separate pytree.

    Attributes:
        family: ``family(weights, output, batch) -> scalar``, with ``weights`` a dict
            of scalars by name, ``output`` the student's `engine.ModelOutput` and
            ``batch`` its batch (labels ``"y"``, the target model's output ``"target"``).
        names: the weights' names.
        initial: their hand-set values (the untaught teacher's), each inside its bounds.
        bounds: ``(low, high)`` per weight: the open interval it stays in.
        num_classes: C (read by the student-state features).
        num_features: length of s_t.
    """

    family: Callable[[dict, Any, dict], jax.Array]
    names: tuple[str, ...]
    initial: tuple[float, ...]
    bounds: tuple[tuple[float, float], ...]
    num_classes: int
    num_features: int

    def __post_init__(self):
        for name, value, (low, high) in zip(self.names, self.initial, self.bounds):
            if not low < value < high:
                raise ValueError(f"the initial {name} = {value} is outside ({low}, {high})")

    def init(self, rng: jax.Array, dtype=jnp.float32) -> dict:
        """The untaught teacher (the hand-set weights at every state).

        Args:
            rng: unused (the start is deterministic).
            dtype: parameter dtype.

        Returns:
            ``{"theta": (W, F) zeros, "bias": (W,)}``.
        """
        del rng
        fractions = [(value - low) / (high - low)
                     for value, (low, high) in zip(self.initial, self.bounds)]
        bias = jnp.log(jnp.asarray(fractions, dtype)) - jnp.log1p(-jnp.asarray(fractions, dtype))
        return {"theta": jnp.zeros((len(self.names), self.num_features), dtype), "bias": bias}

    def weights(self, params: dict, features: jax.Array) -> dict:
        """The loss weights at state features s_t, by name."""
        low, high = jnp.asarray(self.bounds, features.dtype).T
        values = low + (high - low) * jax.nn.sigmoid(params["theta"] @ features + params["bias"])
        return dict(zip(self.names, values))

    def student_loss(self, params: dict, features: jax.Array, output: Any,
                     batch: dict) -> jax.Array:
        """The student's loss under this teacher at state features s_t."""
        return self.family(self.weights(params, features), output, batch)
