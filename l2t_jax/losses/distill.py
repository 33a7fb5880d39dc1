"""Distillation loss terms: Hinton KD and attention transfer, and their sums with CE.

Pure functions of the student's and the target model's outputs (the *target model* is
the network distilled from; this library never calls it a teacher: the teacher is the
loss teacher that sets these terms' weights). Reductions are stated on every function,
since public code differs: with the per-sample KL below, KD's ``alpha`` is the weight of
the same quantity as cross-entropy (a mean over the batch of a sum over classes).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from l2t_jax.losses.ce import mean_cross_entropy


def kd_divergence(student_logits: jax.Array, target_logits: jax.Array,
                  temperature: jax.Array) -> jax.Array:
    """Hinton et al.'s KD term, ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))``.

    Reduction: the KL of each example is summed over classes, then averaged over the
    batch (as cross-entropy is), and scaled by T^2 so that its gradient in the logits
    keeps its size as T changes. (The attention-transfer code sums over the batch and
    divides by B, the same; the Moonshine code averages over batch x classes and
    multiplies by 2, which makes the same ``alpha`` a 2 / C times smaller weight.)

    Args:
        student_logits: (B, C).
        target_logits: (B, C); the caller stops its gradient (`engine.TargetModel`).
        temperature: T > 0, scalar (may be traced: a loss teacher can set it).

    Returns:
        Scalar.
    """
    log_p_student = jax.nn.log_softmax(student_logits / temperature)
    log_p_target = jax.nn.log_softmax(target_logits / temperature)
    per_example = jnp.sum(jnp.exp(log_p_target) * (log_p_target - log_p_student), axis=-1)
    return temperature**2 * jnp.mean(per_example)


def kd_loss(alpha: jax.Array, temperature: jax.Array, student_logits: jax.Array,
            target_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``(1 - alpha) CE(y, z_s) + alpha T^2 KL(p_t^T || p_s^T)`` (`kd_divergence`).

    Args:
        alpha: weight of the KD term in [0, 1].
        temperature: T > 0.
        student_logits: (B, C).
        target_logits: (B, C).
        labels: (B,) integer training labels.

    Returns:
        Scalar; CE is the batch mean.
    """
    ce = mean_cross_entropy(student_logits, labels)
    return (1.0 - alpha) * ce + alpha * kd_divergence(student_logits, target_logits,
                                                      temperature)


def attention_map(activation: jax.Array) -> jax.Array:
    """Zagoruyko & Komodakis's attention map of a channel-last activation.

    ``q = normalize(flatten(mean_c A^2))``: the squared activation averaged over
    channels (the last axis: Flax is NHWC), flattened over the spatial axes and scaled
    to unit L2 norm per example.

    Args:
        activation: (B, *spatial, C), e.g. (B, H, W, C) or a 1-D network's (B, L, C).

    Returns:
        (B, prod(spatial)).
    """
    energy = jnp.mean(jnp.square(activation), axis=-1).reshape(activation.shape[0], -1)
    # The reference's F.normalize(eps=1e-12): a zero map (a stage all ReLU-dead) stays
    # zero. The floor goes under the square root, whose derivative at 0 is infinite.
    squared_norm = jnp.sum(jnp.square(energy), axis=-1, keepdims=True)
    return energy / jnp.sqrt(jnp.maximum(squared_norm, 1e-24))


def attention_distance(student_activation: jax.Array,
                       target_activation: jax.Array) -> jax.Array:
    """``mean((q_s - q_t)^2)`` over the batch and spatial positions of one stage.

    Args:
        student_activation: (B, *spatial, C_s).
        target_activation: (B, *spatial, C_t); channel counts may differ, the spatial
            shape may not.

    Returns:
        Scalar.

    Raises:
        ValueError: the spatial shapes differ.
    """
    if student_activation.shape[:-1] != target_activation.shape[:-1]:
        raise ValueError(
            f"attention transfer needs equal spatial shapes, got student "
            f"{student_activation.shape} and target {target_activation.shape}")
    difference = attention_map(student_activation) - attention_map(target_activation)
    return jnp.mean(jnp.square(difference))


def attention_transfer(betas: Mapping[str, jax.Array], student: Mapping[str, jax.Array],
                       target: Mapping[str, jax.Array]) -> jax.Array:
    """``sum_s beta_s mean((q_s - q_t)^2)`` over the stages named in `betas`.

    Args:
        betas: stage name -> weight (1e3 in the reference code at every stage).
        student: stage name -> the student's activation there.
        target: stage name -> the target model's activation there.

    Returns:
        Scalar.
    """
    return sum(beta * attention_distance(student[name], target[name])
               for name, beta in betas.items())


def online_ensemble_loss(kl_weight: jax.Array, temperature: jax.Array,
                         branch_logits: jax.Array, ensemble_logits: jax.Array,
                         target_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """ONE's loss: ``sum_i CE(z_i) + CE(z_e) + w sum_i T^2 KL(p_t^T || p_i^T)``.

    Each branch distils (`kd_divergence`, the same reduction as KD) from `target_logits`:
    the gated ensemble's logits with their gradient stopped, so that the gate learns
    only from the ensemble's cross-entropy.

    Args:
        kl_weight: w, the weight of the distillation terms (ONE's ramp, or a loss
            teacher's).
        temperature: T > 0.
        branch_logits: (B, m, C), the branches' logits z_i.
        ensemble_logits: (B, C), the gated ensemble's z_e (its cross-entropy).
        target_logits: (B, C), z_e as the branches' target; the caller stops its
            gradient (`jax.lax.stop_gradient`, or computed outside the student's
            gradient: `engine.make_student_step`'s ``self_target``).
        labels: (B,) integer training labels.

    Returns:
        Scalar; each CE is the batch mean.
    """
    branch_ce = jax.vmap(mean_cross_entropy, in_axes=(1, None))(branch_logits, labels)
    branch_kl = jax.vmap(kd_divergence, in_axes=(1, None, None))(branch_logits, target_logits,
                                                                temperature)
    return (jnp.sum(branch_ce) + mean_cross_entropy(ensemble_logits, labels)
            + kl_weight * jnp.sum(branch_kl))
