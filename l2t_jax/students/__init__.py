"""Student networks: Flax modules mapping a batch of inputs to logits.

Every student is called as `module.apply(variables, x, train=...)` and returns logits
(B, num_classes). Students with BatchNorm keep running statistics in the `batch_stats`
collection: apply with `mutable=["batch_stats"]` when `train=True`.

Students also `sow` named activations into the ``"intermediates"`` collection, which a
loss can ask for (`engine.student_output`; free when not asked for): the MLP's
``hidden_<i>`` (after each hidden layer's activation), LeNet-5's and the 1-D CNN's
``conv_<i>`` (after each convolution block), and the ResNets' and WRN's ``group_<g>``
(g = 1, 2, 3: the output of each residual group, where attention transfer reads).
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from l2t_jax.errors import ConfigError
from l2t_jax.students import cnn1d, lenet, mlp, resnet, wrn

_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict, int, Any], nn.Module]] = {
    "mlp": mlp.build,
    "lenet5": lenet.build,
    "resnet_he": resnet.build_he,
    "resnet_wide": resnet.build_wide,
    "wrn": wrn.build,
    "cnn1d": cnn1d.build,
}
STUDENT_NAMES = tuple(_BUILDERS)
_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def build_student(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """Builds the student network that `config` names.

    Args:
      config: the student config. `name` is one of `STUDENT_NAMES`; `dtype`
        ("float32" or "float64", default "float32") sets every layer's parameter and
        computation dtype. Each student reads its own further fields, with defaults
        for missing ones: mlp (`hidden`, `activation`), lenet5 (`fc_hidden`,
        `batch_norm`), resnet_he and resnet_wide (`depth`), wrn (`depth`,
        `widen_factor`, `dropout_rate`), cnn1d (`channels`).
      num_classes: number of logits.

    Returns:
      An unbound Flax module with `__call__(x, train=False) -> logits`.

    Raises:
      ConfigError: on an unknown name or dtype, or a field the student rejects.
    """
    name = config.get("name")
    if name not in _BUILDERS:
        raise ConfigError(
            f"unknown student {name!r} (config.student.name); "
            f"choose one of: {', '.join(STUDENT_NAMES)}"
        )
    dtype = config.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise ConfigError(
            f"unknown student dtype {dtype!r} (config.student.dtype); "
            f"choose one of: {', '.join(_DTYPES)}"
        )
    return _BUILDERS[name](config, num_classes, _DTYPES[dtype])


def count_params(params: Any) -> int:
    """Counts the scalars in a parameter pytree.

    Args:
      params: pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).

    Returns:
      Total number of elements over all leaves.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


__all__ = ["STUDENT_NAMES", "build_student", "count_params"]
