"""Student-state features s_t that an L2T-DLF teacher reads, computed inside the scan.

Four features, each normalised to roughly [0, 1]:

0. iteration fraction: ``step / total_steps`` (the demo meant ``t / 25000`` but its
   Python-2 integer division made it always 0; here it is real).
1. minibatch error of the current student on the current batch (before the step).
2. running train cross-entropy (exponential moving average over steps) / log(C).
3. dev error at the last evaluation (every ``dev_every`` steps, on a fixed dev subset).

Features 2 and 3 live in `StudentState.stats`, updated by `make_stats_fn`. A teacher may
read a subset of them (`feature_indices`, ``config.teacher.features``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2t_jax import engine
from l2t_jax.config_checks import is_integer
from l2t_jax.errors import ConfigError

NUM_FEATURES = 4
FEATURE_NAMES = ("iteration_fraction", "minibatch_error", "train_loss", "dev_error")
# features_fn(state, logits, labels, total_steps, num_classes) -> s_t, as `student_features`.
FeaturesFn = Callable[[engine.StudentState, jax.Array, jax.Array, int, int], jax.Array]


def initial_stats(num_classes: int, dtype=None) -> dict:
    """Stats of an untrained student: chance-level loss and error.

    Args:
        num_classes: C.
        dtype: the stats' dtype; default the widest float JAX computes in (float64
            under ``jax_enable_x64``, else float32). A student takes them in its own
            parameters' dtype (`engine.StudentState.create`), so that a float64
            student's features (and meta-gradients) are float64 and a float32
            student's float32.

    Returns:
        ``{"train_loss": log C, "dev_error": 1 - 1 / C}``, scalars of `dtype`.
    """
    if dtype is None:
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    return {
        "train_loss": jnp.asarray(math.log(num_classes), dtype),
        "dev_error": jnp.asarray(1.0 - 1.0 / num_classes, dtype),
    }


def feature_indices(subset: Sequence[str | int]) -> tuple[int, ...]:
    """The positions in s_t of a subset of the features, in the order given.

    Args:
        subset: names from `FEATURE_NAMES` or indices into them (0 to
            ``NUM_FEATURES - 1``); non-empty, without repeats.

    Returns:
        The indices, e.g. ``(0, 3)`` for ``("iteration_fraction", "dev_error")``.

    Raises:
        ConfigError: an unknown name, an index out of range, a repeat, or no feature.
    """
    indices = []
    for item in subset:
        if isinstance(item, str) and item in FEATURE_NAMES:
            indices.append(FEATURE_NAMES.index(item))
        elif is_integer(item) and 0 <= item < NUM_FEATURES:
            indices.append(int(item))
        else:
            raise ConfigError(f"unknown student feature {item!r}; choose names from "
                              f"{FEATURE_NAMES} or indices 0-{NUM_FEATURES - 1}")
    if not indices or len(set(indices)) != len(indices):
        raise ConfigError(f"a feature subset needs at least one feature and no repeats, "
                          f"got {tuple(subset)!r}")
    return tuple(indices)


def student_features(
    state: engine.StudentState, logits: jax.Array, labels: jax.Array, total_steps: int,
    num_classes: int,
) -> jax.Array:
    """The feature vector s_t (see the module docstring), shape (NUM_FEATURES,).

    Args:
        state: the student before the step (its step counter and stats).
        logits: (B, C) the student's scores on the current batch.
        labels: (B,) the batch's training labels.
        total_steps: the training length the iteration fraction is relative to.
        num_classes: C, for normalising the loss.

    Returns:
        Features in the logits' dtype (so float64 students get float64 features and
        exact meta-gradients). Not stop-gradiented here; the caller decides.
    """
    error = jnp.mean((jnp.argmax(logits, -1) != labels).astype(logits.dtype))
    return jnp.stack([
        state.step.astype(logits.dtype) / total_steps,
        error,
        state.stats["train_loss"] / math.log(num_classes),
        state.stats["dev_error"],
    ]).astype(logits.dtype)


def make_stats_fn(
    model: nn.Module, dev_x: jax.Array, dev_y: jax.Array, dev_every: int, decay: float = 0.9,
) -> engine.StatsFn:
    """Builds the step's stats update: running train loss and periodic dev error.

    Args:
        model: the Flax student.
        dev_x: (N, ...) the dev inputs used for the dev-error feature.
        dev_y: (N,) their labels.
        dev_every: evaluate the dev error every this many steps.
        decay: EMA decay of the running train cross-entropy.

    Returns:
        ``stats_fn(new_state, metrics) -> stats``.
    """

    def stats_fn(new_state: engine.StudentState, metrics: dict) -> dict:
        stats = new_state.stats
        train_loss = decay * stats["train_loss"] + (1 - decay) * metrics["cross_entropy"]
        params = jax.lax.stop_gradient(new_state.params)

        dtype = stats["dev_error"].dtype  # the carry's dtype stays fixed

        def dev_error():
            logits, _ = engine.apply_student(
                model, params, new_state.model_state, dev_x, train=False
            )
            return jnp.mean((jnp.argmax(logits, -1) != dev_y).astype(dtype))

        error = jax.lax.cond(
            new_state.step % dev_every == 0, dev_error, lambda: stats["dev_error"]
        )
        # The dev error is an argmax count (zero derivative); the running loss keeps its
        # gradient, used only when the features are not stop-gradiented.
        return {"train_loss": train_loss.astype(dtype), "dev_error": error}

    return stats_fn
