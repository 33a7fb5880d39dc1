"""Dev objectives a teacher minimises: differentiable stand-ins for the dev error."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2t_jax import engine
from l2t_jax.errors import ConfigError
from l2t_jax.losses.ce import mean_cross_entropy

DEV_OBJECTIVES = ("smoothed_error", "cross_entropy")


def smoothed_error(logits: jax.Array, labels: jax.Array, sharpness: float = 50.0) -> jax.Array:
    """L2T-DLF's smoothed 0-1 error: ``mean(2 sigmoid(k (max_j p_j - p_y)) - 1)``.

    Zero when every example is classified right with a margin, near 1 for confident
    errors; k = 50 in the demo.

    Args:
        logits: (N, C).
        labels: (N,).
        sharpness: k.

    Returns:
        Scalar in [0, 1).
    """
    probs = jax.nn.softmax(logits)
    p_true = jnp.take_along_axis(probs, labels[:, None], -1)[:, 0]
    return jnp.mean(2 * jax.nn.sigmoid(sharpness * (jnp.max(probs, -1) - p_true)) - 1)


def dev_objective(name: str, logits: jax.Array, labels: jax.Array,
                  sharpness: float = 50.0) -> jax.Array:
    """The dev objective `name` (one of `DEV_OBJECTIVES`) of a student's dev logits."""
    if name == "smoothed_error":
        return smoothed_error(logits, labels, sharpness)
    if name == "cross_entropy":
        return mean_cross_entropy(logits, labels)
    raise _unknown_objective(name)


def _unknown_objective(name: str) -> ConfigError:
    return ConfigError(f"unknown config.teacher.objective {name!r}; choose one of "
                       f"{DEV_OBJECTIVES}")


def dev_objective_fn(model: nn.Module, dev: dict, name: str = "smoothed_error",
                     sharpness: float = 50.0) -> engine.Objective:
    """The objective a teacher minimises: `dev_objective` of the trained student.

    Args:
        model: the Flax student.
        dev: the dev arrays, ``{"x": (N, ...), "y": (N,)}``.
        name: one of `DEV_OBJECTIVES`.
        sharpness: k of the smoothed error.

    Returns:
        ``objective(meta_params, final_state) -> (value, {"dev_error": fraction})``
        (`engine.Objective`), the student run in eval mode on all of `dev`; the dev
        error (argmax, not differentiable) is reported beside the value.

    Raises:
        ConfigError: an unknown `name`.
    """
    if name not in DEV_OBJECTIVES:
        raise _unknown_objective(name)

    def objective(meta_params, final: engine.StudentState):
        del meta_params
        logits, _ = engine.apply_student(
            model, final.params, final.model_state, dev["x"], train=False
        )
        error = (logits.argmax(-1) != dev["y"]).mean()
        return dev_objective(name, logits, dev["y"], sharpness), {"dev_error": error}

    return objective
