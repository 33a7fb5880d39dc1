"""Cross-entropy: the loss family with no teacher-controlled parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def mean_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy.

    Args:
        logits: (B, C) unnormalised scores.
        labels: (B,) integer class labels.

    Returns:
        Scalar mean over the batch, in nats.
    """
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def cross_entropy_loss(meta_params, output, batch, state) -> jax.Array:
    """`mean_cross_entropy` as the engine's loss (`engine.LossFn`); reads nothing else.

    Args:
        meta_params: unused (plain CE has nothing for a teacher to set).
        output: the student's `engine.ModelOutput`.
        batch: the batch (its labels ``"y"``).
        state: unused student state.

    Returns:
        Scalar mean cross-entropy.
    """
    del meta_params, state
    return mean_cross_entropy(output.logits, batch["y"])
