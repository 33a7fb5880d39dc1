"""Small 1-D CNN for MNIST-1D, after the MNIST-1D paper's ConvBase.

Three ReLU convolutions with `channels` filters (kernel 5, 3, 3; stride 2; padding 1),
then flatten and a linear read-out. A length-40 signal leaves 5 positions, so
5 x 25 = 125 features feed the classifier, as in the paper. Flax's default initialisers
(LeCun-normal kernels, zero biases).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from l2t_jax import config_checks
from l2t_jax.students import branched
from l2t_jax.students._layers import Conv


class CNN1D(nn.Module):
    """1-D convolutional classifier.

    Attributes:
      num_classes: number of logits.
      channels: filters in each convolution.
      dtype: parameter and computation dtype.
      part: ``"whole"``, or the ``"trunk"`` / ``"tail"`` of a multi-branch network
        (`branched`): the first two convolutions / the last one and the read-out.
    """

    num_classes: int
    channels: int = 25
    dtype: Any = jnp.float32
    part: str = "whole"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns logits (B, num_classes) for signals (B, L) or (B, L, 1).

        `train` is unused (no BatchNorm or dropout). A trunk returns its feature map
        (B, L', channels); a tail maps that to logits.
        """
        kernels = (5, 3, 3)
        first, stop = branched.stage_range(self.part, len(kernels))
        if first == 0:
            x = jnp.asarray(x, self.dtype)
            if x.ndim == 2:
                x = x[..., None]
        for layer in range(first, stop):
            x = Conv(
                self.channels,
                (kernels[layer],),
                strides=2,
                padding=1,
                dtype=self.dtype,
                param_dtype=self.dtype,
            )(x)
            x = nn.relu(x)
            self.sow("intermediates", f"conv_{layer}", x)
        if stop < len(kernels):
            return x
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.dtype)(x)


def build(config: ml_collections.ConfigDict, num_classes: int, dtype: Any,
          section: str) -> CNN1D:
    """Builds a `CNN1D` with `config.channels` filters (default 25).

    Args:
      config: student config.
      num_classes: number of logits.
      dtype: parameter and computation dtype.
      section: the config's path, for messages (``"config.student"``).

    Returns:
      The module.

    Raises:
      ConfigError: on a channel count below 1.
    """
    channels = config.get("channels", 25)
    config_checks.check_fields([config_checks.integer(f"{section}.channels", channels)])
    return CNN1D(num_classes=num_classes, channels=channels, dtype=dtype)
