"""Loss families: pure `loss(meta_params, logits, labels, state) -> scalar` functions."""

from l2t_jax.losses.ce import cross_entropy_loss, mean_cross_entropy

__all__ = ["cross_entropy_loss", "mean_cross_entropy"]
