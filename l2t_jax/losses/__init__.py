"""Loss families: pure functions of a family's parameters, the logits and the labels.

A family ``family(params, logits, labels) -> scalar`` becomes the engine's loss
(`engine.LossFn`, which sees the student's whole output and the batch) through
`logits_loss`; a family that reads more (the student's activations, the target
model's output: distillation) is ``family(params, output, batch)``, through
`output_loss`.
"""

from l2t_jax.losses.ce import cross_entropy_loss, mean_cross_entropy


def logits_loss(family):
    """The engine's ``loss_fn(params, output, batch, state)`` of a logits-only family.

    Args:
        family: ``family(params, logits (B, C), labels (B,)) -> scalar``.

    Returns:
        ``loss_fn(params, output, batch, state) = family(params, output.logits,
        batch["y"])``.
    """

    def loss_fn(params, output, batch, state):
        del state
        return family(params, output.logits, batch["y"])

    return loss_fn


def output_loss(family):
    """The engine's ``loss_fn(params, output, batch, state)`` of a family of the output.

    Args:
        family: ``family(params, output, batch) -> scalar`` with ``output`` the
            student's `engine.ModelOutput` and ``batch`` the batch it saw.

    Returns:
        ``loss_fn(params, output, batch, state) = family(params, output, batch)``.
    """

    def loss_fn(params, output, batch, state):
        del state
        return family(params, output, batch)

    return loss_fn


__all__ = ["cross_entropy_loss", "logits_loss", "mean_cross_entropy", "output_loss"]
