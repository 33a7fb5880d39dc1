"""CIFAR ResNets built from post-activation basic blocks.

Two families share one block and one body; they differ in widths, shortcut and pooling:

* `resnet_he`: He et al. 2016 CIFAR ResNet-(6n+2). 16-32-64 channels, option-A shortcuts
  (stride-2 subsample and zero-padded channels, no parameters), global average pooling.
  The L2T-DLF paper's ResNet-8/20/32.
* `resnet_wide`: the L2T-DLN code's "ResNet-8/20/32". 64-128-256 channels, option-B
  shortcuts (1x1 conv + BatchNorm) where the shape changes, 4x4 average pooling that
  leaves a 2x2x256 map (1024 features) on 32x32 inputs.

Convolutions have no bias (BatchNorm follows each) and He-normal fan-out kernels as in
the reference PyTorch code (`_layers.conv_no_bias`); the classifier keeps Flax's Dense
defaults (LeCun-normal kernels, zero bias).

`config.student.conv` (default "conv") swaps both 3x3 convolutions of every basic block
for one of Moonshine's cheap convolutions (`cheap`), as Moonshine's post-activation
ResNet block does; the stem and the option-B shortcut's 1x1 conv stay full.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from l2t_jax.config_checks import is_integer
from l2t_jax.errors import ConfigError
from l2t_jax.students import branched, cheap
from l2t_jax.students._layers import as_images, batch_norm, conv_no_bias


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(shortcut(x) + BN(conv(relu(BN(conv(x)))))).

    Attributes:
      features: output channels.
      strides: stride of the first conv (and of the shortcut).
      projection_shortcut: if the shape changes, project with 1x1 conv + BN (option B)
        instead of subsampling and zero-padding channels (option A).
      dtype: parameter and computation dtype.
      conv: the 3x3 convolutions' `config.student.conv` string (`cheap`).
    """

    features: int
    strides: int
    projection_shortcut: bool
    dtype: Any = jnp.float32
    conv: str = cheap.PLAIN

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps (B, H, W, C) to (B, H / strides, W / strides, features)."""
        norm = batch_norm(train, self.dtype)
        y = cheap.conv3x3(self.conv, self.features, self.strides, self.dtype)(x, train)
        y = nn.relu(norm()(y))
        y = cheap.conv3x3(self.conv, self.features, 1, self.dtype)(y, train)
        y = norm()(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            if self.projection_shortcut:
                x = conv_no_bias(self.features, 1, self.strides, self.dtype)(x)
                x = norm()(x)
            else:
                x = x[:, :: self.strides, :: self.strides, :]
                extra = self.features - x.shape[-1]
                x = jnp.pad(
                    x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2))
                )
        return nn.relu(x + y)


class CifarResNet(nn.Module):
    """Three-stage ResNet: 3x3 stem, basic blocks, pooling, linear read-out.

    Stages 2 and 3 halve the resolution in their first block.

    Attributes:
      num_classes: number of logits.
      blocks_per_stage: basic blocks in each of the three stages ((depth - 2) / 6).
      widths: channels of the three stages; the stem has widths[0].
      projection_shortcut: see `BasicBlock`.
      pool_window: None for global average pooling, else the side of a non-overlapping
        average-pooling window whose output is flattened.
      dtype: parameter and computation dtype.
      conv: the blocks' 3x3 convolutions' `config.student.conv` string (`cheap`).
      part: ``"whole"``, or the ``"trunk"`` / ``"tail"`` of a multi-branch network
        (`branched`): the first two stages / the last stage, pooling and read-out.
    """

    num_classes: int
    blocks_per_stage: int
    widths: tuple[int, int, int]
    projection_shortcut: bool
    pool_window: int | None = None
    dtype: Any = jnp.float32
    conv: str = cheap.PLAIN
    part: str = "whole"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns logits (B, num_classes) for images (B, H, W, C) or (B, H, W).

        `train` switches BatchNorm to batch statistics (and running-average updates).
        A trunk returns its feature map; a tail maps that to logits.
        """
        first, stop = branched.stage_range(self.part, len(self.widths))
        if first == 0:
            x = as_images(x, self.dtype)
            x = conv_no_bias(self.widths[0], 3, 1, self.dtype)(x)
            x = nn.relu(batch_norm(train, self.dtype)()(x))
        for stage in range(first, stop):
            width = self.widths[stage]
            for block in range(self.blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(
                    width, strides, self.projection_shortcut, self.dtype, self.conv
                )(x, train)
            self.sow("intermediates", f"group_{stage + 1}", x)
        if stop < len(self.widths):
            return x
        if self.pool_window is None:
            x = jnp.mean(x, axis=(1, 2))
        else:
            window = (self.pool_window, self.pool_window)
            x = nn.avg_pool(x, window, strides=window).reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.dtype)(x)


def _blocks_per_stage(name: str, depth: Any, section: str) -> int:
    """Returns n for a ResNet-(6n+2), rejecting other depths.

    Args:
      name: student name, for the error message.
      depth: total number of weighted layers.
      section: the config's path, for the error message.

    Returns:
      (depth - 2) // 6.

    Raises:
      ConfigError: if depth is not an integer 6n + 2 with n >= 1.
    """
    if not is_integer(depth) or depth < 8 or depth % 6 != 2:
        raise ConfigError(
            f"{name} depth {depth!r} is not 6n+2 with n >= 1 ({section}.depth); "
            "use one of 8, 20, 32, 44, 56, 110"
        )
    return (depth - 2) // 6


def _build(
    name: str,
    widths: tuple[int, int, int],
    projection_shortcut: bool,
    pool_window: int | None,
    config: ml_collections.ConfigDict,
    num_classes: int,
    dtype: Any,
    section: str,
) -> CifarResNet:
    """Builds a `CifarResNet` of depth `config.depth` (default 20) for one family.

    Also reads `config.conv` (default "conv"); raises `ConfigError` on a bad one, naming
    the config's path `section`.
    """
    depth = config.get("depth", 20)
    blocks_per_stage = _blocks_per_stage(name, depth, section)
    conv = cheap.from_config(
        config,
        f"{name}-{depth}",
        # The stem has widths[0] channels; each stage's first block maps the previous
        # width to its own, every second conv and every later block keep it.
        [(c_in, c_out) for c_in, c_out in zip((widths[0], *widths), widths)]
        + [(c_out, c_out) for c_out in widths],
        section,
    )
    return CifarResNet(
        num_classes=num_classes,
        blocks_per_stage=blocks_per_stage,
        widths=widths,
        projection_shortcut=projection_shortcut,
        pool_window=pool_window,
        dtype=dtype,
        conv=conv,
    )


def build_he(
    config: ml_collections.ConfigDict, num_classes: int, dtype: Any, section: str
) -> CifarResNet:
    """Builds He et al.'s CIFAR ResNet of depth `config.depth` (default 20).

    Args:
      config: student config; also reads `conv` (default "conv": plain 3x3
        convolutions; see `cheap` for the others).
      num_classes: number of logits.
      dtype: parameter and computation dtype.
      section: the config's path, for messages (``"config.student"``).

    Returns:
      The module.

    Raises:
      ConfigError: on a depth that is not 6n + 2, or a conv string that is unknown or
        does not divide the widths.
    """
    return _build("resnet_he", (16, 32, 64), False, None, config, num_classes, dtype,
                  section)


def build_wide(
    config: ml_collections.ConfigDict, num_classes: int, dtype: Any, section: str
) -> CifarResNet:
    """Builds the L2T-DLN wide CIFAR ResNet of depth `config.depth` (default 20).

    Args:
      config: student config; also reads `conv` (default "conv": plain 3x3
        convolutions; see `cheap` for the others).
      num_classes: number of logits.
      dtype: parameter and computation dtype.
      section: the config's path, for messages (``"config.student"``).

    Returns:
      The module.

    Raises:
      ConfigError: on a depth that is not 6n + 2, or a conv string that is unknown or
        does not divide the widths.
    """
    return _build("resnet_wide", (64, 128, 256), True, 4, config, num_classes, dtype,
                  section)
