"""Evaluation of a student on a whole split: error rate and cross-entropy."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2t_jax import engine


@functools.partial(jax.jit, static_argnames=("model",))
def _batch_sums(model: nn.Module, params, model_state, x, y, mask):
    logits, _ = engine.apply_student(model, params, model_state, x, train=False)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    wrong = (jnp.argmax(logits, -1) != y).astype(jnp.float32)
    return jnp.sum(wrong * mask), jnp.sum(nll * mask)


def evaluate(
    model: nn.Module, state: engine.StudentState, x: np.ndarray, y: np.ndarray,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Evaluates a student in eval mode (running BatchNorm statistics).

    Args:
        model: the Flax student.
        state: the student (its params and model state are used).
        x: inputs (N, ...).
        y: integer labels (N,).
        batch_size: examples per forward pass; the last batch (or a split smaller than
            it) is padded and masked so that every call has this shape: one compilation
            per network and batch size.

    Returns:
        ``{"error": percent misclassified, "loss": mean cross-entropy}``.
    """
    n = len(y)
    wrong = nll = 0.0
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        pad = batch_size - len(yb)
        mask = np.concatenate([np.ones(len(yb), np.float32), np.zeros(pad, np.float32)])
        if pad:
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
            yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
        batch_wrong, batch_nll = _batch_sums(model, state.params, state.model_state, xb, yb, mask)
        wrong += float(batch_wrong)
        nll += float(batch_nll)
    return {"error": 100.0 * wrong / n, "loss": nll / n}
