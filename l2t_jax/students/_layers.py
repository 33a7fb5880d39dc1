"""Layers shared by the students: convolutions, BatchNorm, ResNet/WRN convs, image inputs."""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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


# Convolutions whose derivatives stay fast inside `lax.scan` on CPU.
#
# JAX differentiates a convolution into convolutions with permuted dimension numbers (the
# kernel gradient treats input channels as the batch: labels like `f01b_i01o->01bf`),
# and XLA's simplifier swaps the operands of a convolution whose kernel window is wider
# than its input (as in the derivatives of a kernel gradient), which permutes the labels
# and reverses the window. XLA:CPU runs only channel-last convolutions (NHWC input, HWIO
# kernel, no window reversal) on its fast Eigen kernels. Its ConvCanonicalization pass
# rewrites the others into that form with explicit transposes, but only in the entry
# computation: inside a while loop, i.e. a `lax.scan` body, they stay on a generic loop
# emitter, and a student's SGD step runs 5-25x slower there than unrolled
# (jax-ml/jax#12868; `benchmarks/conv_in_scan.py`). Here every convolution, including
# those of the gradient and of the gradient's gradient, is emitted channel-last with
# explicit transposes and reverses (plain JAX ops, for every backend): the backward rule
# calls the same function, so each order of reverse-mode differentiation keeps the form
# and XLA finds nothing to swap.


def _channel_last_numbers(num_spatial: int) -> lax.ConvDimensionNumbers:
    """Dimension numbers of (B, *S, I) x (*K, I, O) -> (B, *S_out, O)."""
    lhs = (0, num_spatial + 1, *range(1, num_spatial + 1))
    rhs = (num_spatial + 1, num_spatial, *range(num_spatial))
    return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def _xla_swaps_operands(
    x_shape, kernel_shape, strides, padding, lhs_dilation, rhs_dilation
):
    """Whether XLA's simplifier would swap the operands of this convolution.

    Restates XLA's test (ConvOperandSwapper): spatial dimensions that are pure
    contractions (kernel as wide as the input, no padding, dilation or stride) or
    groupings are left out; then it swaps if the product of the remaining kernel sizes
    exceeds that of their input sizes.
    """
    kernel_product = input_product = 1
    for n, k, s, (lo, hi), d, r in zip(
        x_shape[1:-1], kernel_shape[:-2], strides, padding, lhs_dilation, rhs_dilation
    ):
        unpadded = lo == hi == 0 and r == 1
        if unpadded and ((k == n and d == 1 and s == 1) or (d == k and s == k - 1)):
            continue
        kernel_product *= k
        input_product *= (
            k if (n == 1 and s == 1 and r == 1 and lo == hi == k - 1) else n
        )
    return kernel_product > input_product


def _conv_impl(x, kernel, strides, padding, lhs_dilation, rhs_dilation, precision):
    """The channel-last convolution, with the operands in the order XLA keeps."""
    num_spatial = kernel.ndim - 2
    numbers = _channel_last_numbers(num_spatial)
    if not _xla_swaps_operands(
        x.shape, kernel.shape, strides, padding, lhs_dilation, rhs_dilation
    ):
        return lax.conv_general_dilated(
            x,
            kernel,
            strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=numbers,
            precision=precision,
        )
    # Swap here, channel-last. Per spatial dimension, with xd / kd the input / kernel
    # dilated to lengths n_d / k_d, y[o] = sum_j xd[j] kd[j - o * s + lo]. Reversing
    # both gives y[o] = sum_j kd'[o * s + j - (n_d - k_d + lo)] xd'[j]: a convolution
    # of the reversed kernel (output channels as its batch) with the reversed input as
    # its kernel (the batch as its output channels).
    pads = tuple(
        ((n - 1) * d - (k - 1) * r + lo, (n - 1) * d - (k - 1) * r + hi)
        for n, k, (lo, hi), d, r in zip(
            x.shape[1:-1], kernel.shape[:-2], padding, lhs_dilation, rhs_dilation
        )
    )
    spatial = tuple(range(num_spatial))
    kernel_as_input = jnp.moveaxis(jnp.flip(kernel, spatial), -1, 0)  # (O, *K, I)
    # (*S, I, B)
    x_as_kernel = jnp.moveaxis(jnp.flip(x, [1 + i for i in spatial]), 0, -1)
    y_t = lax.conv_general_dilated(
        kernel_as_input,
        x_as_kernel,
        strides,
        pads,
        lhs_dilation=rhs_dilation,
        rhs_dilation=lhs_dilation,
        dimension_numbers=numbers,
        precision=precision,
    )  # (O, *S_out, B)
    return jnp.swapaxes(y_t, 0, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv(x, kernel, strides, padding, lhs_dilation, rhs_dilation, precision):
    """Channel-last convolution whose VJP is built from channel-last convolutions.

    Args:
      x: (B, *S, I) input.
      kernel: (*K, I, O).
      strides: window stride per spatial dimension.
      padding: (low, high) per spatial dimension; may be negative.
      lhs_dilation: input dilation per spatial dimension.
      rhs_dilation: kernel dilation per spatial dimension.
      precision: as in `lax.conv_general_dilated` (hashable).

    Returns:
      (B, *S_out, O).
    """
    return _conv_impl(
        x, kernel, strides, padding, lhs_dilation, rhs_dilation, precision
    )


def _conv_fwd(x, kernel, strides, padding, lhs_dilation, rhs_dilation, precision):
    # `_conv`, not `_conv_impl`: differentiating a gradient differentiates this forward
    # pass too, and that must take the rule below again.
    y = _conv(x, kernel, strides, padding, lhs_dilation, rhs_dilation, precision)
    return y, (x, kernel)


def _conv_bwd(strides, padding, lhs_dilation, rhs_dilation, precision, residuals, g):
    # Per spatial dimension, with n / k / m the input / kernel / output lengths, s the
    # stride, d / r the input / kernel dilation, lo the low padding and xd the input
    # dilated by d:  y[o] = sum_i xd[o * s + i * r - lo] . kernel[i].
    x, kernel = residuals
    num_spatial = kernel.ndim - 2
    dims = tuple(
        zip(
            x.shape[1:-1],
            kernel.shape[:-2],
            g.shape[1:-1],
            strides,
            padding,
            lhs_dilation,
            rhs_dilation,
        )
    )

    # dxd[p] = sum_i gd[p + i * r - ((k - 1) * r - lo)] . flip(kernel)[i]^T with gd the
    # cotangent dilated by s; dx is every d-th entry of dxd.
    x_pads = tuple(
        ((k - 1) * r - lo, (n - 1) * d - (m - 1) * s + lo)
        for n, k, m, s, (lo, _), d, r in dims
    )
    # (*K, O, I)
    flipped = jnp.swapaxes(jnp.flip(kernel, tuple(range(num_spatial))), -1, -2)
    dx = _conv(g, flipped, lhs_dilation, x_pads, strides, rhs_dilation, precision)

    # dkernel[i] = sum_{b, q} xd[b, i * r + q * s - lo]^T g[b, q]: a convolution of the
    # input with its channels as the batch and the batch as the channels, with the
    # cotangent as the kernel (dilated by s), strided by r.
    kernel_pads = tuple(
        (lo, (k - 1) * r + (m - 1) * s - (n - 1) * d - lo)
        for n, k, m, s, (lo, _), d, r in dims
    )
    x_t = jnp.swapaxes(x, 0, -1)  # (I, *S, B)
    g_t = jnp.moveaxis(g, 0, -2)  # (*S_out, B, O)
    dkernel_t = _conv(
        x_t, g_t, rhs_dilation, kernel_pads, lhs_dilation, strides, precision
    )
    return dx, jnp.moveaxis(dkernel_t, 0, -2)  # (I, *K, O) -> (*K, I, O)


_conv.defvjp(_conv_fwd, _conv_bwd)


# Grouped convolutions (feature_group_count G > 1: depthwise and grouped 3x3s).
#
# XLA:CPU runs these slowly at every order, inside loops and out. Its grouped forward
# convolution is off the fast path (a depthwise 3x3 on 32 channels took 4x as long as
# the ungrouped 3x3 with 32 times its FLOPs); JAX differentiates it into a kernel
# gradient with batch_group_count G, which XLA rewrites into a 3-D convolution doing
# G times the work; inside `lax.scan` the permuted labels of the section above come on
# top. A meta-gradient through a small CNN of 4-group 3x3s (`group_cnn` in
# `benchmarks/conv_in_scan.py`) took 0.97 s per step unrolled and 0.72 s in
# `lax.scan`, the ungrouped CNN of the same FLOPs 0.05 s. So here a grouped
# convolution is made of ungrouped ones of the channel-last path above: the channels
# are cut into chunks of whole groups, and each chunk is convolved with its
# block-diagonal kernel (zeros between groups). That spends chunk width / group width
# times the grouped convolution's FLOPs, but keeps every derivative of every order on
# XLA's fast kernels: 0.08 s per step for that CNN in `lax.scan`. Chunks of at least
# `_CHUNK_CHANNELS` input channels measured best (meta-gradients of two-layer CNNs,
# 32-256 channels, depthwise to 2 groups): every convolution has a fixed cost, which
# many narrow chunks pay many times over (one chunk per channel of a 32-channel
# depthwise 3x3 was 10x slower than one chunk; chunks of 8 or 16 channels up to 1.8x
# slower than of 32), while wide chunks spend more on zeros (chunks of 64 channels, or
# one chunk, up to 2.5x slower). Shifted slices of the input contracted with the
# kernel per tap, which never convolve, were 1.1-4.5x slower than chunks of 32.
_CHUNK_CHANNELS = 32


def _num_chunks(channels: int, groups: int) -> int:
    """How many chunks of whole groups to cut `channels` input channels into.

    The most chunks that split the groups evenly and keep at least `_CHUNK_CHANNELS`
    channels each, or one if none do. Groups at least that wide are a chunk each: no
    FLOPs are spent on zeros.
    """
    return max(
        n
        for n in range(1, groups + 1)
        if groups % n == 0 and (n == 1 or channels // n >= _CHUNK_CHANNELS)
    )


def _block_diagonal(kernel: jax.Array, groups: int) -> jax.Array:
    """(*K, I, G * O') grouped kernel -> (*K, G * I, G * O') ungrouped, zero off-group.

    Input channel h * I + i feeds output channel g * O' + o only where h == g, as in a
    channel-last grouped convolution. A select, not a product with an identity, so an
    infinite weight stays in its group.
    """
    if groups == 1:
        return kernel
    *window, per_group, out = kernel.shape
    blocks = kernel.reshape(*window, 1, per_group, groups, out // groups)
    same_group = jnp.eye(groups, dtype=bool)[:, None, :, None]
    full = jnp.where(same_group, blocks, jnp.zeros((), kernel.dtype))
    return full.reshape(*window, groups * per_group, out)


def _grouped_conv(
    x, kernel, groups, strides, padding, lhs_dilation, rhs_dilation, precision
):
    """Channel-last grouped convolution from `_conv`s of block-diagonal kernels.

    Args:
      x: (B, *S, G * I) input.
      kernel: (*K, I, O), O a multiple of G.
      groups: G, the feature group count.
      strides, padding, lhs_dilation, rhs_dilation, precision: as in `_conv`.

    Returns:
      (B, *S_out, O).
    """
    chunks = _num_chunks(x.shape[-1], groups)
    outputs = [
        _conv(
            x_chunk,
            _block_diagonal(kernel_chunk, groups // chunks),
            strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            precision,
        )
        for x_chunk, kernel_chunk in zip(
            jnp.split(x, chunks, axis=-1), jnp.split(kernel, chunks, axis=-1)
        )
    ]
    return jnp.concatenate(outputs, axis=-1)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated` whose derivatives run at full speed in `lax.scan`.

    Same arguments and values as `lax.conv_general_dilated`. Channel-last convolutions
    ((B, *S, C) inputs, (*K, C / G, O) kernels, (B, *S_out, O) outputs, as
    `flax.linen.Conv` makes them) with any strides, padding (explicit or a string),
    input and kernel dilation and feature group count G (G = 1: ungrouped; G = C:
    depthwise, with a channel multiplier if O > C), and all their reverse-mode
    derivatives, are computed by ungrouped channel-last convolutions and explicit
    transposes (see the comments above `_channel_last_numbers` and `_CHUNK_CHANNELS`).
    A grouped convolution is computed with block-diagonal kernels over chunks of at
    least 32 input channels (or of one group where a group is wider): the zeros make
    no difference to finite values, but an infinite or NaN input spreads NaN to the
    other groups of its chunk. Any other call
    (other layouts, `batch_group_count` > 1, `preferred_element_type`, invalid
    shapes) goes to `lax.conv_general_dilated` unchanged. The channel-last path is a
    `jax.custom_vjp`, so forward-mode differentiation (`jax.jvp`, `jax.jacfwd`) of it
    raises.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type: as in
        `lax.conv_general_dilated`.

    Returns:
      The convolution's output.
    """
    num_spatial = rhs.ndim - 2
    ones = (1,) * num_spatial
    lhs_dilation = ones if lhs_dilation is None else tuple(int(d) for d in lhs_dilation)
    rhs_dilation = ones if rhs_dilation is None else tuple(int(d) for d in rhs_dilation)
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if (
        numbers != _channel_last_numbers(num_spatial)
        or batch_group_count != 1
        or preferred_element_type is not None
        # Groups that do not divide the channels: let lax say so.
        or feature_group_count < 1
        or lhs.shape[-1] != rhs.shape[-2] * feature_group_count
        or rhs.shape[-1] % feature_group_count
        # lax rejects string padding with input dilation; let it say so.
        or (isinstance(padding, str) and lhs_dilation != ones)
    ):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(
            lhs.shape[1:-1],
            [(k - 1) * r + 1 for k, r in zip(rhs.shape[:-2], rhs_dilation)],
            strides,
            padding,
        )
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if isinstance(precision, list):  # custom_vjp's static arguments must be hashable
        precision = tuple(precision)
    if feature_group_count == 1:
        return _conv(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, precision)
    return _grouped_conv(
        lhs,
        rhs,
        feature_group_count,
        strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        precision,
    )


class Conv(nn.Conv):
    """`flax.linen.Conv` whose derivatives run at full speed inside `lax.scan`.

    The same module (attributes, parameter names, shapes, initialisers and values) with
    `conv_general_dilated` above as its convolution. Training a student inside
    `lax.scan`, and differentiating through that scan, then runs as fast on CPU as the
    unrolled loop; with grouped or depthwise convolutions (`feature_group_count` > 1),
    several times faster than Flax's conv unrolled (`benchmarks/conv_in_scan.py`).
    """

    conv_general_dilated: Any = conv_general_dilated


def conv_no_bias(
    features: int,
    kernel: int,
    strides: int,
    dtype: Any,
    groups: int = 1,
    name: str | None = None,
) -> Conv:
    """Returns a bias-free square conv with He-normal fan-out init and PyTorch padding.

    Padding is kernel // 2 on every side (not "SAME"), so stride-2 convolutions sample
    the same positions as the reference PyTorch code.

    Args:
      features: output channels.
      kernel: kernel height and width.
      strides: stride in both spatial dimensions.
      dtype: parameter and computation dtype.
      groups: feature groups (1: a plain convolution; the input channels: depthwise).
      name: the submodule's name (None: Flax's automatic ``Conv_<i>``).

    Returns:
      The conv layer.
    """
    return Conv(
        features,
        (kernel, kernel),
        strides=strides,
        padding=kernel // 2,
        feature_group_count=groups,
        use_bias=False,
        kernel_init=he_normal_fan_out,
        dtype=dtype,
        param_dtype=dtype,
        name=name,
    )
