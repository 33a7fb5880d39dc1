"""Methods: what is trained and how, as `init` / `outer_step` pure functions."""

from __future__ import annotations

from l2t_jax import optimizers, students
from l2t_jax.data import Splits
from l2t_jax.errors import ConfigError
from l2t_jax.methods.ce import CrossEntropy

METHOD_NAMES = ("ce",)


def build_method(config, splits: Splits):
    """Builds the method named by ``config.method`` for a dataset.

    Args:
        config: the full experiment ConfigDict.
        splits: the loaded dataset (number of classes, input shape).

    Returns:
        An object with ``init(rng, sample_x)``, ``outer_step(state, batches)``,
        ``student(state)``, ``model`` and ``steps_per_call``.
    """
    if config.method not in METHOD_NAMES:
        raise ConfigError(
            f"unknown config.method {config.method!r}; choose one of {METHOD_NAMES}"
        )
    model = students.build_student(config.student, splits.num_classes)
    tx = optimizers.make_inner_optimizer(config.optimizer, config.train.num_steps)
    return CrossEntropy(model, tx, config.data.get("augment", "none"), config.train.log_every)
