"""Moonshine's cheap convolutions: substitutes for a residual block's 3x3 convolutions.

Crowley, Gray & Storkey, "Moonshine: Distilling with Cheap Convolutions" (NeurIPS 2018),
reference code github.com/BayesWatch/pytorch-moonshine (`models/blocks.py`). A student
(`wrn`, `resnet_he`, `resnet_wide`) takes the block from the string field
`config.student.conv`:

==============  ==============  =========================================================
config string   Moonshine name  block (C_in input channels, C output channels)
==============  ==============  =========================================================
``conv``        Conv            the plain 3x3 convolution (the student's default)
``dconv``       DConv           depthwise 3x3 on C_in, BN-ReLU, pointwise 1x1 to C
``dconv_g<N>``  DConvG<N>       as dconv with a grouped 3x3 of N channels per group
                                (C_in / N groups)
``dconv_a<N>``  DConvA<N>       as dconv with a grouped 3x3 of N groups
``b<N>``        ConvB<N>        1x1 to C / N, BN-ReLU, 3x3 (C / N -> C / N), BN-ReLU,
                                1x1 to C
``g<N>b<M>``    G<N>B<M>        as b<M> with a grouped middle 3x3 of N channels per group
``a<N>b<M>``    A<N>B<M>        as b<M> with a grouped middle 3x3 of N groups
``dconv_b<N>``  DConvB<N>       as b<N> with a depthwise middle 3x3
==============  ==============  =========================================================

Mind the trap the names keep from the reference code: ``g<N>`` counts channels per
group, ``a<N>`` counts groups. The Moonshine names themselves (any case, e.g.
``DConvG8``, ``ConvB2``, ``G8B2``) are accepted too and mean the same blocks; `parse`
turns either spelling into the canonical one above.

Structure, following the reference code where it is more specific than the paper:

* Every 3x3 convolution of every residual block is replaced (both of a basic block's),
  including the strided one that opens a stage: the block's stride goes to its 3x3.
* The stem convolution, the 1x1 projection shortcuts (and their BatchNorm in
  `resnet_wide`), the final BatchNorm and the classifier stay as they are.
* The separable blocks (dconv*) convolve the block's *input* channels spatially and only
  the pointwise 1x1 changes the width; the bottleneck blocks (b, g, a, dconv_b) take the
  bottleneck width from the *output* channels (C / M).
* Inside a cheap block, BatchNorm (affine) and ReLU follow every convolution but the
  last; the block's output goes wherever the replaced convolution's went, so the
  surrounding network's BatchNorms and ReLUs are unchanged. No convolution has a bias.
* Kernels are He-normal fan-out as in the reference code (variance 2 / (k * k * C_out),
  counting all output channels also for grouped convolutions).

The reference code floors channel counts (C_in // N groups, C // M bottleneck); here a
count must divide exactly (N divides C_in or the bottleneck width, M divides C) or the
builder raises `ConfigError`, so ``g<N>`` always means exactly N channels per group. For
the reference students (widths multiples of 16, N and M powers of two up to 16) the
blocks and parameter counts are the same.

The reference code's other convolutions (ACDC, Conv2x2, DConv3D) are not implemented.
"""

import functools
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2t_jax.errors import ConfigError
from l2t_jax.students._layers import batch_norm, conv_no_bias

PLAIN = "conv"
VALID_FORMS = (
    "conv, dconv, dconv_g<N> (N channels per group), dconv_a<N> (N groups), b<M>, "
    "g<N>b<M>, a<N>b<M>, dconv_b<M> (N, M >= 1; Moonshine's names such as DConvG8, "
    "ConvB2, G8B2 also work)"
)


class ConvSpec(NamedTuple):
    """A parsed cheap-convolution string.

    Attributes:
      family: "conv" (plain 3x3), "separable" (dconv*: spatial conv on the input
        channels, then pointwise) or "bottleneck" (1x1 down, 3x3, 1x1 up).
      grouping: how the spatial 3x3 is grouped: "full" (one group), "depthwise" (one
        channel per group), "per_group" (`n` channels per group) or "groups" (`n`
        groups).
      n: channels per group or number of groups (0 for "full" and "depthwise").
      reduction: bottleneck width divisor M (0 unless family is "bottleneck").
    """

    family: str
    grouping: str = "full"
    n: int = 0
    reduction: int = 0

    @property
    def name(self) -> str:
        """The canonical config string."""
        if self.family == PLAIN:
            return PLAIN
        if self.family == "separable":
            return {
                "depthwise": "dconv",
                "per_group": f"dconv_g{self.n}",
                "groups": f"dconv_a{self.n}",
            }[self.grouping]
        prefix = {
            "full": "",
            "depthwise": "dconv_",
            "per_group": f"g{self.n}",
            "groups": f"a{self.n}",
        }[self.grouping]
        return f"{prefix}b{self.reduction}"

    def groups(self, channels: int) -> int:
        """Number of groups of the spatial 3x3 convolution over `channels` channels."""
        return {
            "full": 1,
            "depthwise": channels,
            "per_group": channels // max(self.n, 1),
            "groups": self.n,
        }[self.grouping]


# Each pattern (matched against the lower-cased string, whole) and its spec's maker.
_PATTERNS: tuple[tuple[re.Pattern, Callable[..., ConvSpec]], ...] = (
    (re.compile(r"conv"), lambda: ConvSpec(PLAIN)),
    (re.compile(r"dconv"), lambda: ConvSpec("separable", "depthwise")),
    (re.compile(r"dconv_?g(\d+)"), lambda n: ConvSpec("separable", "per_group", n)),
    (re.compile(r"dconv_?a(\d+)"), lambda n: ConvSpec("separable", "groups", n)),
    (re.compile(r"(?:conv)?b(\d+)"), lambda m: ConvSpec("bottleneck", "full", 0, m)),
    (re.compile(r"g(\d+)b(\d+)"), lambda n, m: ConvSpec("bottleneck", "per_group", n, m)),
    (re.compile(r"a(\d+)b(\d+)"), lambda n, m: ConvSpec("bottleneck", "groups", n, m)),
    (re.compile(r"dconv_?b(\d+)"), lambda m: ConvSpec("bottleneck", "depthwise", 0, m)),
)


@functools.cache
def _parse(conv: str) -> ConvSpec | None:
    for pattern, make in _PATTERNS:
        match = pattern.fullmatch(conv.strip().lower())
        if match:
            numbers = [int(g) for g in match.groups()]
            return make(*numbers) if all(k >= 1 for k in numbers) else None
    return None


def parse(conv: Any, field: str = "config.student.conv") -> ConvSpec:
    """Parses a `config.student.conv` string.

    Args:
      conv: a canonical string (see the module docstring) or a Moonshine class name,
        in any case.
      field: the config field it came from, for the message.

    Returns:
      The spec; `spec.name` is the canonical string.

    Raises:
      ConfigError: if `conv` is not one of the valid forms.
    """
    spec = _parse(conv) if isinstance(conv, str) else None
    if spec is None:
        raise ConfigError(
            f"unknown student conv {conv!r} ({field}); choose one of: "
            f"{VALID_FORMS}"
        )
    return spec


def check_fits(
    conv: str, student: str, in_out_channels: Iterable[tuple[int, int]],
    field: str = "config.student.conv",
) -> None:
    """Checks that a cheap convolution divides every replaced convolution's channels.

    Args:
      conv: a valid `config.student.conv` string.
      student: the student's name, for the message.
      in_out_channels: (input, output) channels of every 3x3 convolution it replaces.
      field: the config field `conv` came from, for the message.

    Raises:
      ConfigError: if a bottleneck width or a group count does not come out whole.
    """
    spec = parse(conv)
    for c_in, c_out in in_out_channels:
        problem = None
        width = c_in
        if spec.family == "bottleneck":
            width = c_out // spec.reduction
            if c_out % spec.reduction:
                problem = f"{c_out} output channels do not divide by {spec.reduction}"
        if problem is None and spec.grouping in ("per_group", "groups") and width % spec.n:
            split = (
                f"groups of {spec.n} channels"
                if spec.grouping == "per_group"
                else f"{spec.n} groups"
            )
            problem = f"its {width}-channel 3x3 convolution does not split into {split}"
        if problem is not None:
            raise ConfigError(
                f"student conv {spec.name!r} ({field}) does not fit "
                f"{student}: {problem}; choose a smaller N or M, or a wider student"
            )


class CheapConv(nn.Module):
    """A cheap substitute for a bias-free 3x3 convolution (any spec but "conv").

    Parameters live in named submodules: ``spatial`` (the 3x3, grouped or depthwise) and
    ``spatial_bn``; separable blocks add ``pointwise``, bottleneck blocks ``reduce``,
    ``reduce_bn`` and ``expand``.

    Attributes:
      features: output channels.
      strides: stride of the 3x3 convolution.
      conv: a `config.student.conv` string other than "conv".
      dtype: parameter and computation dtype.
    """

    features: int
    strides: int
    conv: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps (B, H, W, C_in) to (B, H / strides, W / strides, features)."""
        spec = parse(self.conv)
        if spec.family == PLAIN:
            raise ValueError("CheapConv needs a cheap spec; use conv_no_bias for 'conv'")
        norm = batch_norm(train, self.dtype)
        if spec.family == "separable":
            width = x.shape[-1]
        else:
            width = self.features // spec.reduction
            x = conv_no_bias(width, 1, 1, self.dtype, name="reduce")(x)
            x = nn.relu(norm(name="reduce_bn")(x))
        x = conv_no_bias(width, 3, self.strides, self.dtype, spec.groups(width), "spatial")(x)
        x = nn.relu(norm(name="spatial_bn")(x))
        name = "pointwise" if spec.family == "separable" else "expand"
        return conv_no_bias(self.features, 1, 1, self.dtype, name=name)(x)


def conv3x3(
    conv: str, features: int, strides: int, dtype: Any
) -> Callable[[jax.Array, bool], jax.Array]:
    """Returns a residual block's 3x3 convolution as `layer(x, train)`.

    Call it inside the block's compact `__call__`, where the layer becomes the block's
    submodule: for "conv" a plain `conv_no_bias` 3x3 (auto-named ``Conv_<i>`` as before
    the field existed, so plain students keep their parameter trees), otherwise a
    `CheapConv` (``CheapConv_<i>``).

    Args:
      conv: the `config.student.conv` string.
      features: output channels.
      strides: stride in both spatial dimensions.
      dtype: parameter and computation dtype.

    Returns:
      A function of (x, train) applying the layer.
    """
    if parse(conv).family == PLAIN:
        layer = conv_no_bias(features, 3, strides, dtype)
        return lambda x, train: layer(x)
    return CheapConv(features, strides, conv, dtype)


def from_config(config: Any, student: str, in_out_channels: Iterable[tuple[int, int]],
                section: str = "config.student") -> str:
    """Reads, validates and canonicalises `config.student.conv` (default "conv").

    Args:
      config: the student config.
      student: the student's name, for messages.
      in_out_channels: (input, output) channels of every 3x3 convolution it replaces.
      section: the config's path, for messages.

    Returns:
      The canonical conv string.

    Raises:
      ConfigError: on an unknown string or one that does not fit the student's widths.
    """
    field = f"{section}.conv"
    name = parse(config.get("conv", PLAIN), field).name
    check_fits(name, student, in_out_channels, field)
    return name


__all__ = ["CheapConv", "ConvSpec", "VALID_FORMS", "check_fits", "conv3x3", "from_config",
           "parse"]
