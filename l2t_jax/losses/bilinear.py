"""The L2T-DLF loss family: a bilinear sigmoid loss on the student's log-probabilities.

``L(x, y) = - mean_i sigmoid( log p(x_i)^T W + b )[y_i]`` with p = softmax(logits), W a
C x C matrix and b a C-vector (the L2T-DLF demo's form; the paper writes it
``-sigmoid(y^T W log p + b)``, the same numbers). At W = I, b = 0 the loss is
``-sigmoid(log p_y)`` = ``-p_y / (1 + p_y)``: bounded and monotone in p_y, hence robust
to label noise but slow to learn (small gradients when p_y is small).

The optional mix with cross-entropy, ``a * CE + (1 - a) * scale * L_bilinear``, is the
demo's ``--combine_loss`` idea with the weight ``a`` open to the teacher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from l2t_jax.losses.ce import mean_cross_entropy


def identity_bilinear(num_classes: int, dtype=jnp.float32) -> dict:
    """The untaught bilinear parameters: ``{"W": I (C, C), "b": 0 (C,)}``."""
    return {"W": jnp.eye(num_classes, dtype=dtype), "b": jnp.zeros(num_classes, dtype)}


def bilinear_sigmoid_loss(
    weight: jax.Array, bias: jax.Array, logits: jax.Array, labels: jax.Array
) -> jax.Array:
    """The bilinear sigmoid loss, averaged over the batch.

    Args:
        weight: W, (C, C).
        bias: b, (C,).
        logits: (B, C) student scores.
        labels: (B,) integer labels.

    Returns:
        Scalar ``-mean_i sigmoid(log_softmax(logits_i) @ W + b)[y_i]``, in [-1, 0].
    """
    scores = jax.nn.log_softmax(logits) @ weight + bias
    return -jnp.mean(jnp.take_along_axis(jax.nn.sigmoid(scores), labels[:, None], -1))


def mixed_loss(
    weight: jax.Array, bias: jax.Array, mix: jax.Array | float, scale: float,
    logits: jax.Array, labels: jax.Array,
) -> jax.Array:
    """``mix * CE + (1 - mix) * scale * bilinear``; ``mix = 0`` is the pure bilinear loss.

    Args:
        weight: W, (C, C).
        bias: b, (C,).
        mix: weight of cross-entropy in [0, 1] (a scalar, possibly teacher-set).
        scale: multiplier of the bilinear term (it only rescales its small gradients).
        logits: (B, C).
        labels: (B,).

    Returns:
        Scalar loss.
    """
    bilinear = scale * bilinear_sigmoid_loss(weight, bias, logits, labels)
    return mix * mean_cross_entropy(logits, labels) + (1.0 - mix) * bilinear
