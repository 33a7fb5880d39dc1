"""``ce``: the student trained on cross-entropy, the baseline of every comparison."""

from l2t_jax.losses import cross_entropy_loss
from l2t_jax.methods import base, teaching


def build(config, splits, rng) -> base.Plan:
    """One phase: the student on cross-entropy (from the configured start)."""
    return teaching.fixed_loss_plan(config, splits, rng, cross_entropy_loss)


base.register(base.Method(
    name="ce",
    description="cross-entropy, the baseline (any config; --config.method=ce)",
    example="configs/ce_baseline.py:digits,noisy",
    build=build,
))
