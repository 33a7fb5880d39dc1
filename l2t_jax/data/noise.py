"""Training-label noise: symmetric ("flip to another class") and pair flips."""

from __future__ import annotations

import numpy as np

from l2t_jax.errors import ConfigError

NOISE_TYPES = ("none", "symmetric", "pair")


def validate_noise(noise_type: str, noise_rate: float) -> None:
    """Checks a noise type and rate as given in the data config.

    Args:
        noise_type: one of `NOISE_TYPES`.
        noise_rate: probability that a label is corrupted, in [0, 1); must be 0 for
            noise type "none".

    Raises:
        ConfigError: one line naming the field and what to change.
    """
    if noise_type not in NOISE_TYPES:
        raise ConfigError(
            f"unknown config.data.noise_type {noise_type!r}; choose one of {NOISE_TYPES}"
        )
    if not (isinstance(noise_rate, (int, float)) and 0.0 <= noise_rate < 1.0):
        raise ConfigError(f"config.data.noise_rate must be a number in [0, 1), got {noise_rate!r}")
    if noise_type == "none" and noise_rate:
        raise ConfigError(
            f"config.data.noise_rate is {noise_rate} but config.data.noise_type is 'none'; "
            "set noise_type to 'symmetric' or 'pair', or noise_rate to 0"
        )


def corrupt_labels(
    labels: np.ndarray, *, num_classes: int, noise_type: str, noise_rate: float, seed: int
) -> np.ndarray:
    """Returns labels with each one corrupted independently with probability `noise_rate`.

    * "symmetric" uses the "flip to another class" convention: a corrupted label is
      replaced by one of the *other* `num_classes - 1` classes, uniformly, so the
      expected fraction of true labels is exactly `1 - noise_rate` (not
      `1 - noise_rate * (C - 1) / C` as when the new label may equal the old one).
    * "pair" maps a corrupted label `y` to `(y + 1) % num_classes`.
    * "none" returns the labels unchanged.

    Which labels are corrupted depends only on `seed`, `noise_rate` and the number of
    labels, so "symmetric" and "pair" with the same seed corrupt the same examples.

    Args:
        labels: (N,) integer clean labels in [0, num_classes).
        num_classes: number of classes C.
        noise_type: one of `NOISE_TYPES`.
        noise_rate: corruption probability in [0, 1).
        seed: seed of the corruption.

    Returns:
        (N,) int32 noisy labels.
    """
    validate_noise(noise_type, noise_rate)
    rng = np.random.default_rng(seed)
    corrupt = rng.random(labels.shape) < noise_rate
    if noise_type == "symmetric":
        shift = rng.integers(1, num_classes, size=labels.shape)
    else:
        shift = 1 if noise_type == "pair" else 0
    return np.where(corrupt, (labels + shift) % num_classes, labels).astype(np.int32)
