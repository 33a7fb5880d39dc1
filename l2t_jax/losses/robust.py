"""Noise-robust losses: the hand-designed baselines a learned loss must beat.

p = softmax(z), p_y its entry at the label.

* Generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018):
  ``L_q = (1 - p_y^q) / q``, q in (0, 1]; q -> 0 is CE, q = 1 is MAE (up to 2x).
* Symmetric cross-entropy (Wang et al., ICCV 2019): ``alpha CE + beta RCE`` with the
  reverse cross-entropy ``RCE = -sum_k p_k log q_k`` of the one-hot label q, log 0
  clipped to A < 0, which is ``-A (1 - p_y)``.

Both are averaged over the batch, like `mean_cross_entropy`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from l2t_jax.losses.ce import mean_cross_entropy


def _log_p_true(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]


def generalized_cross_entropy(q: jax.Array | float, logits: jax.Array,
                              labels: jax.Array) -> jax.Array:
    """GCE, ``mean((1 - p_y^q) / q)``, with p_y^q computed as ``exp(q log p_y)``.

    Args:
        q: the exponent in (0, 1] (a scalar, possibly teacher-set and traced).
        logits: (B, C) student scores.
        labels: (B,) integer labels.

    Returns:
        Scalar in [0, 1 / q).
    """
    return jnp.mean(-jnp.expm1(q * _log_p_true(logits, labels)) / q)


def symmetric_cross_entropy(alpha: float, beta: float, log_zero: float, logits: jax.Array,
                            labels: jax.Array) -> jax.Array:
    """SCE, ``alpha CE + beta RCE`` with ``RCE = -log_zero (1 - p_y)``.

    Args:
        alpha: weight of cross-entropy.
        beta: weight of the reverse cross-entropy.
        log_zero: A < 0, what log 0 is clipped to in the reverse cross-entropy.
        logits: (B, C).
        labels: (B,).

    Returns:
        Scalar loss.
    """
    reverse = -log_zero * (1.0 - jnp.exp(_log_p_true(logits, labels)))
    return alpha * mean_cross_entropy(logits, labels) + beta * jnp.mean(reverse)
