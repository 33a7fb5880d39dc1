"""The dynamic loss network (DLN) of L2T-DLN: a small bias-free MLP as the student's loss.

The network reads "1-vs-1" features of the student's sigmoid (not softmax) outputs
s = sigmoid(z): for each example b and each wrong class j != y_b the row
``[s[b, y_b], s[b, j], 1, 0]``; the row of the true class is all zeros (it still counts
in the mean, and with no biases the network maps it to 0). The loss is the mean of the
network's output over all B x C rows. Layers 4 -> 40 -> 40 -> 40 -> 40 -> 1, no biases,
LeakyReLU(0.01) between them: 5,000 weights, as in the authors' released code.

The parameters ``phi`` are a plain dict ``{"layer_0": (4, 40), ..., "layer_4": (40, 1)}``
(input-major kernels, so ``x @ w``).

The output is unbounded below: a learned DLN can come to reward wrong predictions.
`probe_dln` measures that (see `L2T-DLN` in `l2t_jax.methods.dln`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

NUM_FEATURES = 4
LEAKY_SLOPE = 0.01


def init_dln(rng: jax.Array, hidden: int = 40, depth: int = 4) -> dict:
    """The released initialisation: He normal in fan-out mode, std sqrt(2 / fan_out).

    With fan_out = 40 for the hidden layers and 1 for the last (std ~1.41 there).

    Args:
        rng: PRNG key.
        hidden: width of the hidden layers (40 in the paper).
        depth: number of hidden layers (4 in the paper).

    Returns:
        ``phi``: ``{"layer_i": (fan_in, fan_out)}`` for i = 0 .. depth.
    """
    widths = (NUM_FEATURES,) + (hidden,) * depth + (1,)
    keys = jax.random.split(rng, depth + 1)
    return {
        f"layer_{i}": jax.random.normal(key, (fan_in, fan_out)) * jnp.sqrt(2.0 / fan_out)
        for i, (key, fan_in, fan_out) in enumerate(zip(keys, widths[:-1], widths[1:]))
    }


def pair_features(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The 1-vs-1 features of a batch.

    Args:
        logits: (B, C).
        labels: (B,) integer.

    Returns:
        (B, C, 4): ``[s_y, s_j, 1, 0]`` for j != y, zeros for j == y.
    """
    s = jax.nn.sigmoid(logits)
    s_true = jnp.take_along_axis(s, labels[:, None], -1)
    wrong = 1.0 - jax.nn.one_hot(labels, logits.shape[-1], dtype=s.dtype)
    rows = jnp.stack(
        [jnp.broadcast_to(s_true, s.shape), s, jnp.ones_like(s), jnp.zeros_like(s)], -1
    )
    return rows * wrong[..., None]


def apply_dln(phi: dict, features: jax.Array) -> jax.Array:
    """The network on feature rows (..., 4) -> (...)."""
    x = features
    num_layers = len(phi)
    for i in range(num_layers):
        x = x @ phi[f"layer_{i}"].astype(x.dtype)
        if i < num_layers - 1:
            x = jax.nn.leaky_relu(x, LEAKY_SLOPE)
    return x[..., 0]


def dln_loss(phi: dict, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The DLN loss of a batch (a family for `losses.logits_loss`).

    Args:
        phi: DLN parameters (`init_dln`).
        logits: (B, C).
        labels: (B,).

    Returns:
        Scalar: the mean network output over all B x C 1-vs-1 rows.
    """
    return jnp.mean(apply_dln(phi, pair_features(logits, labels)))


def match_surface_scale(phi: dict, reference: dict, grid_size: int = 21) -> dict:
    """Rescales `phi`'s last layer so its surface has the spread of `reference`'s.

    The spread is the standard deviation of the network over a ``grid_size`` squared
    grid of (s_true, s_other) in [0, 1]^2 (`pair_surface`). The output is linear in the
    last layer, so this is exact: the loss keeps the reference's scale, and with it the
    student's effective learning rate, and only its shape changes.
    """
    def spread(params):
        return probe_dln(params, grid_size)["spread"]

    last = f"layer_{len(phi) - 1}"
    return {**phi, last: phi[last] * (spread(reference) / spread(phi))}


def pair_surface(phi: dict, s_true: jax.Array, s_other: jax.Array) -> jax.Array:
    """The network's value on a row ``[s_true, s_other, 1, 0]`` (broadcast), for plots."""
    s_true, s_other = jnp.broadcast_arrays(jnp.asarray(s_true), jnp.asarray(s_other))
    rows = jnp.stack([s_true, s_other, jnp.ones_like(s_true), jnp.zeros_like(s_true)], -1)
    return apply_dln(phi, rows)


def soft_margin_target(s_true: jax.Array, s_other: jax.Array, sharpness: float) -> jax.Array:
    """A pairwise soft margin, ``softplus(k (s_other - s_true))``: the default warm target."""
    return jax.nn.softplus(sharpness * (s_other - s_true))


def bce_target(s_true: jax.Array, s_other: jax.Array, eps: float = 0.01) -> jax.Array:
    """Pairwise binary cross-entropy, ``-log(1 - s_other) - log(s_true)``, s clipped to
    [eps, 1 - eps].

    Its slope in s grows like 1 / s_true and 1 / (1 - s_other), which cancels the
    s (1 - s) factor of the sigmoid in the student's gradient: unlike the soft margin it
    still pushes a wrong class whose output has saturated near 1 (or a true class near 0).
    Summed over a sample's rows it is one-vs-all BCE with the true class weighted C - 1.
    """
    s_true = jnp.clip(s_true, eps, 1.0 - eps)
    s_other = jnp.clip(s_other, eps, 1.0 - eps)
    return -jnp.log1p(-s_other) - jnp.log(s_true)


WARM_TARGETS = ("soft_margin", "bce")


def warm_start_dln(phi: dict, rng: jax.Array, *, target: str = "soft_margin", steps: int = 500,
                   sharpness: float = 4.0, learning_rate: float = 1e-2,
                   num_points: int = 1024) -> dict:
    """Regresses a DLN onto a target surface over random (s_true, s_other) in [0, 1]^2.

    Not in the released code (which starts from the random network): a documented
    option, because a random DLN can point the wrong way and the teacher's 1e-3 steps
    are slow to undo it (see ``docs/l2t_dln.md``).

    Args:
        phi: the network to start from (usually `init_dln`).
        rng: PRNG key for the regression points.
        target: ``"soft_margin"`` (`soft_margin_target`) or ``"bce"`` (`bce_target`).
        steps: Adam steps (a fresh batch of points each step).
        sharpness: k of the soft margin.
        learning_rate: Adam learning rate.
        num_points: points per step.

    Returns:
        The fitted ``phi``.
    """
    if target not in WARM_TARGETS:
        raise ValueError(f"unknown warm-start target {target!r}; choose one of {WARM_TARGETS}")
    tx = optax.adam(learning_rate)

    def surface_target(s_true, s_other):
        if target == "bce":
            return bce_target(s_true, s_other)
        return soft_margin_target(s_true, s_other, sharpness)

    def mse(params, points):
        value = pair_surface(params, points[:, 0], points[:, 1])
        return jnp.mean((value - surface_target(points[:, 0], points[:, 1])) ** 2)

    def step(carry, key):
        params, opt_state = carry
        points = jax.random.uniform(key, (num_points, 2))
        grads = jax.grad(mse)(params, points)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (phi, _), _ = jax.lax.scan(step, (phi, tx.init(phi)), jax.random.split(rng, steps))
    return phi


def probe_dln(phi: dict, grid_size: int = 21) -> dict:
    """Health of a DLN over the unit square of (s_true, s_other).

    Returns:
        ``{"margin": L(s_true=0, s_other=1) - L(s_true=1, s_other=0)`` (> 0 when the loss
        still prefers right answers to the opposite corner), ``"grid_min"``,
        ``"grid_max"``: the extremes of the network over a ``grid_size`` x ``grid_size``
        grid, ``"spread"``: its standard deviation there (the loss's scale: the student's
        effective learning rate grows with it), ``"corner_gap"``: (L(1, 0) - grid_min) /
        spread, 0 when the right answer (s_true = 1, s_other = 0) is the loss's minimum;
        when it is > 0 a student lowers its loss by moving elsewhere (e.g. every sigmoid
        output to 1), which the margin alone does not show.
    """
    axis = jnp.linspace(0.0, 1.0, grid_size)
    surface = pair_surface(phi, axis[:, None], axis[None, :])
    right = pair_surface(phi, 1.0, 0.0)
    spread = surface.std()
    return {
        "margin": pair_surface(phi, 0.0, 1.0) - right,
        "grid_min": surface.min(),
        "grid_max": surface.max(),
        "spread": spread,
        "corner_gap": (right - surface.min()) / spread,
    }
