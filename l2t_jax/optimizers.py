"""Inner (student) optimizers built from config: SGD, momentum SGD, Adam.

All are plain optax transformations, differentiable end to end, so meta-gradients flow
through the optimizer's state. Adam divides by sqrt(v + eps_root) + eps; with
``eps_root = 0`` the derivative of that square root is infinite wherever a gradient
coordinate is exactly zero (v = 0), and the meta-gradient becomes NaN. The default
``eps_root`` is therefore 1e-8, and it must be > 0.
"""

from __future__ import annotations

import optax

from l2t_jax import config_checks as checks

OPTIMIZER_NAMES = ("sgd", "momentum", "adam")
SCHEDULE_NAMES = ("constant", "cosine", "step")


def validate_optimizer_config(config) -> None:
    """Raises a one-line ConfigError for a bad ``optimizer`` config.

    Every field of `make_inner_optimizer` is checked, whichever optimizer reads it.
    """
    path = "config.optimizer."
    boundaries = config.get("boundaries", ())
    # Adam's sqrt(v + eps_root) has an infinite derivative at v = 0 (NaN meta-gradients).
    eps_root_bound = ({"above": 0, "note": " for Adam (e.g. 1e-8)"} if config.name == "adam"
                      else {"at_least": 0})
    checks.check_fields([
        checks.one_of(path + "name", config.name, OPTIMIZER_NAMES),
        checks.one_of(path + "schedule", config.get("schedule", "constant"), SCHEDULE_NAMES),
        checks.number(path + "learning_rate", config.learning_rate, above=0),
        checks.number(path + "momentum", config.get("momentum", 0.9), at_least=0, below=1),
        checks.flag(path + "nesterov", config.get("nesterov", False)),
        checks.number(path + "b1", config.get("b1", 0.9), at_least=0, below=1),
        checks.number(path + "b2", config.get("b2", 0.999), at_least=0, below=1),
        checks.number(path + "eps", config.get("eps", 1e-8), at_least=0),
        checks.number(path + "eps_root", config.get("eps_root", 1e-8), **eps_root_bound),
        checks.number(path + "weight_decay", config.get("weight_decay", 0.0), at_least=0),
        (isinstance(boundaries, tuple | list)
         and all(checks.is_integer(b) and b >= 1 for b in boundaries)
         and list(boundaries) == sorted(set(boundaries)),
         f"{path}boundaries must be increasing step numbers >= 1, got {boundaries!r}"),
        checks.number(path + "decay_factor", config.get("decay_factor", 0.1), above=0,
                      note=" (the learning rate's factor at each boundary)"),
    ])


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the inner step.

    Args:
        config: ``optimizer`` ConfigDict: ``learning_rate``, ``schedule`` (``"constant"``,
            ``"cosine"`` decay to 0 over `total_steps`, or ``"step"``: multiply by
            ``decay_factor`` at each of ``boundaries`` steps).
        total_steps: the length of the student's training.

    Returns:
        An optax schedule.
    """
    lr = config.learning_rate
    schedule = config.get("schedule", "constant")
    if schedule == "cosine":
        return optax.cosine_decay_schedule(lr, max(1, total_steps))
    if schedule == "step":
        factor = config.get("decay_factor", 0.1)
        return optax.piecewise_constant_schedule(
            lr, {int(b): factor for b in config.get("boundaries", ())}
        )
    return optax.constant_schedule(lr)


def make_inner_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    """Builds the student's optimizer.

    Args:
        config: ``optimizer`` ConfigDict: ``name`` in `OPTIMIZER_NAMES`,
            ``learning_rate``, optional ``momentum`` (0.9), ``nesterov`` (False),
            ``b1`` (0.9), ``b2`` (0.999), ``eps`` (1e-8), ``eps_root`` (1e-8),
            ``weight_decay`` (0: coupled L2 added to the gradient, as in SGD papers),
            and the schedule fields of `learning_rate_schedule`.
        total_steps: the length of the student's training (for decaying schedules).

    Returns:
        An optax GradientTransformation.
    """
    validate_optimizer_config(config)
    lr = learning_rate_schedule(config, total_steps)
    if config.name == "sgd":
        tx = optax.sgd(lr)
    elif config.name == "momentum":
        tx = optax.sgd(
            lr, momentum=config.get("momentum", 0.9), nesterov=config.get("nesterov", False)
        )
    else:
        tx = optax.adam(
            lr,
            b1=config.get("b1", 0.9),
            b2=config.get("b2", 0.999),
            eps=config.get("eps", 1e-8),
            eps_root=config.get("eps_root", 1e-8),
        )
    weight_decay = config.get("weight_decay", 0.0)
    if weight_decay:
        tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return tx


TEACHER_OPTIMIZER_NAMES = ("adam", "sgd", "momentum")


def make_teacher_optimizer(name: str, learning_rate: float,
                           clip_norm: float = 0.0) -> optax.GradientTransformation:
    """Builds a loss teacher's optimizer (it steps on meta-gradients).

    Args:
        name: one of `TEACHER_OPTIMIZER_NAMES` (``"momentum"``: SGD with momentum 0.9).
        learning_rate: constant step size.
        clip_norm: clip each meta-gradient to this global norm first (0: no clipping;
            hypergradients through long unrolls are noisy).

    Returns:
        An optax GradientTransformation.
    """
    if name == "adam":
        tx = optax.adam(learning_rate)
    else:
        tx = optax.sgd(learning_rate, momentum=0.9 if name == "momentum" else None)
    if clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx
