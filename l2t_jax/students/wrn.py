"""Wide residual network WRN-d-k (Zagoruyko & Komodakis 2016) for CIFAR-sized images.

Pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3), (d - 4) / 6 blocks in
each of three stages of 16k, 32k and 64k channels after a 16-channel 3x3 stem, then
BN-ReLU, global average pooling and a linear read-out. A 1x1 conv shortcut on the
pre-activated input is used where the shape changes. Convolutions have no bias and
He-normal fan-out kernels as in the reference PyTorch code; the classifier keeps Flax's
Dense defaults (LeCun-normal kernels, zero bias).

`config.student.conv` (default "conv") swaps every block's two 3x3 convolutions for one
of Moonshine's cheap convolutions (`cheap`); the stem and the 1x1 shortcuts stay full, as
in the Moonshine code. With "conv" this is the Moonshine code's WRN, layer for layer (same
parameter counts).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from l2t_jax.config_checks import is_integer, is_number
from l2t_jax.errors import ConfigError
from l2t_jax.students import branched, cheap
from l2t_jax.students._layers import as_images, batch_norm, conv_no_bias


class PreActBlock(nn.Module):
    """Pre-activation residual block with optional dropout between its convolutions.

    Attributes:
      features: output channels.
      strides: stride of the first conv (and of the shortcut).
      dropout_rate: dropout probability; > 0 needs a 'dropout' rng when training.
      dtype: parameter and computation dtype.
      conv: the 3x3 convolutions' `config.student.conv` string (`cheap`).
    """

    features: int
    strides: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    conv: str = cheap.PLAIN

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps (B, H, W, C) to (B, H / strides, W / strides, features)."""
        norm = batch_norm(train, self.dtype)
        y = nn.relu(norm()(x))
        if self.strides != 1 or x.shape[-1] != self.features:
            # As in the reference code, the projection reads the pre-activated input.
            x = conv_no_bias(self.features, 1, self.strides, self.dtype)(y)
        y = cheap.conv3x3(self.conv, self.features, self.strides, self.dtype)(y, train)
        y = nn.relu(norm()(y))
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = cheap.conv3x3(self.conv, self.features, 1, self.dtype)(y, train)
        return x + y


class WideResNet(nn.Module):
    """WRN-d-k classifier.

    Attributes:
      num_classes: number of logits.
      blocks_per_stage: blocks in each of the three stages ((depth - 4) / 6).
      widen_factor: k; stage widths are 16k, 32k, 64k.
      dropout_rate: dropout probability inside every block.
      dtype: parameter and computation dtype.
      conv: the blocks' 3x3 convolutions' `config.student.conv` string (`cheap`).
      part: ``"whole"``, or the ``"trunk"`` / ``"tail"`` of a multi-branch network
        (`branched`): the stem and first two stages / the last stage, BN-ReLU, pooling
        and read-out.
    """

    num_classes: int
    blocks_per_stage: int
    widen_factor: int = 1
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    conv: str = cheap.PLAIN
    part: str = "whole"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns logits (B, num_classes) for images (B, H, W, C) or (B, H, W).

        `train` switches BatchNorm to batch statistics (and running-average updates) and
        turns dropout on. A trunk returns its feature map; a tail maps that to logits.
        """
        widths = (16, 32, 64)
        first, stop = branched.stage_range(self.part, len(widths))
        if first == 0:
            x = as_images(x, self.dtype)
            x = conv_no_bias(16, 3, 1, self.dtype)(x)
        for stage in range(first, stop):
            width = widths[stage]
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = PreActBlock(
                    width * self.widen_factor,
                    strides,
                    self.dropout_rate,
                    self.dtype,
                    self.conv,
                )(x, train)
            self.sow("intermediates", f"group_{stage + 1}", x)
        if stop < len(widths):
            return x
        x = nn.relu(batch_norm(train, self.dtype)()(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.dtype)(x)


def build(
    config: ml_collections.ConfigDict, num_classes: int, dtype: Any, section: str
) -> WideResNet:
    """Builds WRN-`config.depth`-`config.widen_factor` (defaults 16 and 1).

    Args:
      config: student config; also reads `dropout_rate` (default 0.0) and `conv`
        (default "conv": plain 3x3 convolutions; see `cheap` for the others).
      num_classes: number of logits.
      dtype: parameter and computation dtype.
      section: the config's path, for messages (``"config.student"``).

    Returns:
      The module.

    Raises:
      ConfigError: on a depth that is not 6n + 4, a widen factor below 1, a dropout
        rate outside [0, 1), or a conv string that is unknown or does not divide the
        widths.
    """
    depth = config.get("depth", 16)
    widen_factor = config.get("widen_factor", 1)
    dropout_rate = config.get("dropout_rate", 0.0)
    if not is_integer(depth) or depth < 10 or (depth - 4) % 6 != 0:
        raise ConfigError(
            f"wrn depth {depth!r} is not 6n+4 with n >= 1 ({section}.depth); "
            "use e.g. 10, 16, 22, 28 or 40"
        )
    if not is_integer(widen_factor) or widen_factor < 1:
        raise ConfigError(
            f"wrn widen_factor {widen_factor!r} < 1 ({section}.widen_factor); "
            "use an integer, 1 or more"
        )
    if not is_number(dropout_rate) or not 0.0 <= dropout_rate < 1.0:
        raise ConfigError(
            f"wrn dropout_rate {dropout_rate!r} is outside [0, 1) "
            f"({section}.dropout_rate); use e.g. 0.0 or 0.3"
        )
    widths = [16] + [w * widen_factor for w in (16, 32, 64)]
    conv = cheap.from_config(
        config,
        f"wrn-{depth}-{widen_factor}",
        # Each stage's first block maps the previous width to its own; every second conv
        # and every later block keep the stage's width.
        [(c_in, c_out) for c_in, c_out in zip(widths, widths[1:])]
        + [(c_out, c_out) for c_out in widths[1:]],
        section,
    )
    return WideResNet(
        num_classes=num_classes,
        blocks_per_stage=(depth - 4) // 6,
        widen_factor=widen_factor,
        dropout_rate=dropout_rate,
        dtype=dtype,
        conv=conv,
    )
