"""Per-example data augmentation of batches on the device, in pure `jax.numpy`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from l2t_jax.errors import ConfigError

AUGMENT_KINDS = ("none", "cifar")
_CIFAR_PAD = 4


def validate_augment(kind: str) -> None:
    """Checks an augmentation kind as given in the data config.

    Args:
        kind: one of `AUGMENT_KINDS`.

    Raises:
        ConfigError: one line saying which kinds exist.
    """
    if kind not in AUGMENT_KINDS:
        raise ConfigError(f"unknown config.data.augment {kind!r}; choose one of {AUGMENT_KINDS}")


def augment_batch(key: jax.Array, x: jax.Array, kind: str) -> jax.Array:
    """Augments each example of a batch independently.

    "cifar" is the standard CIFAR recipe (He et al., 2016): zero-pad by 4 pixels on
    each side, take a random crop of the original size, and flip it horizontally with
    probability 1/2. The inputs are already normalised, so the zero padding is the
    per-channel train mean rather than black.

    Jittable with `kind` static, e.g. `jax.jit(augment_batch, static_argnames="kind")`.

    Args:
        key: PRNG key; each example gets its own crop offset and flip.
        x: (B, H, W, C) batch of images.
        kind: "none" (returns `x` unchanged) or "cifar".

    Returns:
        The augmented batch, same shape and dtype as `x`.
    """
    validate_augment(kind)
    if kind == "none":
        return x
    batch, height, width, channels = x.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * _CIFAR_PAD + 1)
    pad = (_CIFAR_PAD, _CIFAR_PAD)
    padded = jnp.pad(x, ((0, 0), pad, pad, (0, 0)))

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    cropped = jax.vmap(crop)(padded, offsets)
    flip = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
    return jnp.where(flip, cropped[:, :, ::-1], cropped)
