"""Layers shared by the students: BatchNorm, ResNet/WRN convolutions, image inputs."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# kaiming_normal_(mode="fan_out") of the reference PyTorch ResNet/WRN code. JAX's
# "normal" is untruncated, so the kernel variance is exactly 2 / fan_out.
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, dtype: Any) -> functools.partial:
    """Returns a BatchNorm constructor with the students' shared settings.

    Momentum 0.9 and epsilon 1e-5 match PyTorch's BatchNorm defaults (momentum 0.1 there
    weights the new batch). Running statistics live in the `batch_stats` collection.

    Args:
      train: if True, normalise with batch statistics and update the running averages.
      dtype: parameter, running-statistic and computation dtype.

    Returns:
      A partial of `flax.linen.BatchNorm`; call it for a layer.
    """
    return functools.partial(
        nn.BatchNorm,
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=dtype,
        # Flax otherwise stores running statistics in float32 and lets them become
        # float64 after the first update, which changes the pytree's dtypes across a
        # scanned unroll. We never run in half precision, so the float32 floor buys
        # nothing here.
        force_float32_reductions=False,
    )


def as_images(x: jax.Array, dtype: Any) -> jax.Array:
    """Casts a batch of images to `dtype` and gives grayscale ones a channel axis.

    Args:
      x: images, (B, H, W, C) or grayscale (B, H, W).
      dtype: dtype to compute in.

    Returns:
      (B, H, W, C) array of `dtype`.
    """
    if x.ndim == 3:
        x = x[..., None]
    return jnp.asarray(x, dtype)


def conv_no_bias(features: int, kernel: int, strides: int, dtype: Any) -> nn.Conv:
    """Returns a bias-free square conv with He-normal fan-out init and PyTorch padding.

    Padding is kernel // 2 on every side (not "SAME"), so stride-2 convolutions sample
    the same positions as the reference PyTorch code.

    Args:
      features: output channels.
      kernel: kernel height and width.
      strides: stride in both spatial dimensions.
      dtype: parameter and computation dtype.

    Returns:
      The conv layer.
    """
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=strides,
        padding=kernel // 2,
        use_bias=False,
        kernel_init=he_normal_fan_out,
        dtype=dtype,
        param_dtype=dtype,
    )
