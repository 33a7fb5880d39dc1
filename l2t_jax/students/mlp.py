"""Multi-layer perceptron student: flatten, hidden Dense layers, linear read-out."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from l2t_jax import config_checks
from l2t_jax.errors import ConfigError

ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh, "gelu": nn.gelu}


class MLP(nn.Module):
    """Fully connected classifier on flattened inputs.

    Dense layers use Flax's defaults (LeCun-normal kernels, zero biases).

    Attributes:
      num_classes: number of logits.
      hidden: widths of the hidden layers, input side first.
      activation: key of `ACTIVATIONS` applied after every hidden layer.
      dtype: parameter and computation dtype.
    """

    num_classes: int
    hidden: tuple[int, ...] = (128,)
    activation: str = "relu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns logits (B, num_classes) for inputs (B, ...); `train` is unused."""
        x = jnp.asarray(x, self.dtype).reshape(x.shape[0], -1)
        for layer, width in enumerate(self.hidden):
            x = ACTIVATIONS[self.activation](
                nn.Dense(width, dtype=self.dtype, param_dtype=self.dtype)(x)
            )
            self.sow("intermediates", f"hidden_{layer}", x)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.dtype)(x)


def build(config: ml_collections.ConfigDict, num_classes: int, dtype: Any,
          section: str) -> MLP:
    """Builds an `MLP` from `config.hidden` and `config.activation`.

    Args:
      config: student config.
      num_classes: number of logits.
      dtype: parameter and computation dtype.
      section: the config's path, for messages (``"config.student"``).

    Returns:
      The module.

    Raises:
      ConfigError: on an unknown activation or a bad width.
    """
    activation = config.get("activation", "relu")
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"unknown mlp activation {activation!r} ({section}.activation); "
            f"choose one of: {', '.join(ACTIVATIONS)}"
        )
    hidden = config.get("hidden", (128,))
    config_checks.check_fields([config_checks.sizes(f"{section}.hidden", hidden)])
    return MLP(
        num_classes=num_classes, hidden=tuple(hidden), activation=activation, dtype=dtype
    )
