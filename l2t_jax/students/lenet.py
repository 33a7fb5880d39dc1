"""LeNet-5 student for 28x28 grayscale images (MNIST-style).

Two 5x5 VALID convolutions (20 then 50 channels), each followed by ReLU and 2x2
max-pool, then fully connected ReLU layers and a linear read-out. Two published
variants:

* L2T-DLF demo: `fc_hidden=(500,)`, no BatchNorm: 431,080 parameters with 10 classes.
* L2T-DLN MNIST LeNet ("BatchNorm, conv 20/50 and FC 800-500", 1,072,020 parameters with
  10 classes): `fc_hidden=(800, 500)` and `batch_norm=True`. The count pins the layout:
  the 4x4x50 = 800 conv features feed FC 800 then FC 500, and BatchNorm follows only
  the two (biased) convolutions (2 x (20 + 50) = 140 parameters). BatchNorm after a
  fully connected layer would add 1,000 or more.

Layers use Flax's default initialisers (LeCun-normal kernels, zero biases).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from l2t_jax import config_checks
from l2t_jax.students._layers import Conv, as_images, batch_norm


class LeNet5(nn.Module):
    """LeNet-5 classifier.

    Attributes:
      num_classes: number of logits.
      fc_hidden: widths of the ReLU fully connected layers after the convolutions.
      use_batch_norm: BatchNorm between each convolution and its ReLU.
      dtype: parameter and computation dtype.
    """

    num_classes: int
    fc_hidden: tuple[int, ...] = (500,)
    use_batch_norm: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns logits (B, num_classes) for images (B, H, W) or (B, H, W, C).

        `train` switches BatchNorm to batch statistics (and running-average updates).
        """
        norm = batch_norm(train, self.dtype)
        x = as_images(x, self.dtype)
        for layer, features in enumerate((20, 50)):
            x = Conv(
                features,
                (5, 5),
                padding="VALID",
                dtype=self.dtype,
                param_dtype=self.dtype,
            )(x)
            if self.use_batch_norm:
                x = norm()(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
            self.sow("intermediates", f"conv_{layer}", x)
        x = x.reshape(x.shape[0], -1)
        for width in self.fc_hidden:
            x = nn.relu(nn.Dense(width, dtype=self.dtype, param_dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.dtype)(x)


def build(config: ml_collections.ConfigDict, num_classes: int, dtype: Any,
          section: str) -> LeNet5:
    """Builds a `LeNet5` from `config.fc_hidden` and `config.batch_norm`.

    Args:
      config: student config.
      num_classes: number of logits.
      dtype: parameter and computation dtype.
      section: the config's path, for messages (``"config.student"``).

    Returns:
      The module.

    Raises:
      ConfigError: on a bad width or a batch_norm that is not a bool.
    """
    fc_hidden = config.get("fc_hidden", (500,))
    batch_norm = config.get("batch_norm", False)
    config_checks.check_fields([config_checks.sizes(f"{section}.fc_hidden", fc_hidden),
                                config_checks.flag(f"{section}.batch_norm", batch_norm)])
    return LeNet5(
        num_classes=num_classes,
        fc_hidden=tuple(fc_hidden),
        use_batch_norm=batch_norm,
        dtype=dtype,
    )
