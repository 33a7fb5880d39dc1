"""L2T-DLF teachers: from the student's state s_t to the loss parameters (W_t, b_t, a_t).

Forms (``config.teacher.form``):

* ``"static"``: W_t = W, b_t = b (a learned but time-constant loss).
* ``"state_gate"``: the demo's dynamic form ``W_t = W + h_t W2`` with the scalar gate
  ``h_t = 2 sigmoid(theta . s_t + b2) - 1``. W2 and b2 start at 0, theta at random
  values of std ``gate_init_scale / sqrt(len(s_t))``. (The demo starts theta at 0 too,
  ``gate_init_scale = 0``: then h_t = 0 and W2 = 0, a saddle where the meta-gradients of
  W2, theta and b2 are exactly 0, so the gate never opens and the "dynamic" teacher
  stays the static one.)
* ``"mlp"``: the paper's "small neural network": an MLP s_t -> (dW_t, db_t) added to
  (W, b); its last layer starts at 0, so every form starts at the same loss.

With ``combine`` the teacher also sets the cross-entropy weight a_t = sigmoid(m) of
`l2t_jax.losses.bilinear.mixed_loss` (m starts at 0: a = 0.5).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from l2t_jax.errors import ConfigError
from l2t_jax.losses.bilinear import identity_bilinear, mixed_loss

TEACHER_FORMS = ("static", "state_gate", "mlp")


@dataclasses.dataclass(frozen=True)
class DLFTeacher:
    """The teacher's static structure; its parameters are a separate pytree.

    Attributes:
        form: one of `TEACHER_FORMS`.
        num_classes: C.
        num_features: length of s_t.
        hidden: hidden width of the ``"mlp"`` form.
        combine: whether the teacher mixes in cross-entropy (a_t), else a_t = 0.
        bilinear_scale: multiplier of the bilinear term in the mix.
        gate_init_scale: the ``"state_gate"`` theta's initial std times sqrt(len(s_t)).
    """

    form: str
    num_classes: int
    num_features: int
    hidden: int = 32
    combine: bool = False
    bilinear_scale: float = 1.0
    gate_init_scale: float = 1.0

    def __post_init__(self):
        if self.form not in TEACHER_FORMS:
            raise ConfigError(
                f"unknown config.teacher.form {self.form!r}; choose one of {TEACHER_FORMS}"
            )

    def init(self, rng: jax.Array, dtype=jnp.float32) -> dict:
        """The untaught teacher: W = I, b = 0, the loss's dynamic part (W2, the MLP's last
        layer) at zero; the gate's theta and the MLP's first layer random, so that every
        parameter gets a meta-gradient from the first update.

        Args:
            rng: PRNG key (the ``"state_gate"`` theta, the ``"mlp"`` form's first layer).
            dtype: parameter dtype.

        Returns:
            The parameter pytree.
        """
        c, f = self.num_classes, self.num_features
        params = identity_bilinear(c, dtype)
        if self.form == "state_gate":
            params.update(W2=jnp.zeros((c, c), dtype),
                          theta=self.gate_init_scale / jnp.sqrt(f)
                          * jax.random.normal(rng, (f,), dtype),
                          b2=jnp.zeros((), dtype))
        elif self.form == "mlp":
            params["mlp"] = {
                "w1": jax.random.normal(rng, (f, self.hidden), dtype) / jnp.sqrt(f),
                "b1": jnp.zeros(self.hidden, dtype),
                "w2": jnp.zeros((self.hidden, c * c + c), dtype),
                "b2": jnp.zeros(c * c + c, dtype),
            }
        if self.combine:
            params["mix_logit"] = jnp.zeros((), dtype)
        return params

    def gate(self, params: dict, features: jax.Array) -> jax.Array:
        """The ``"state_gate"`` form's h_t = 2 sigmoid(theta . s_t + b2) - 1 in (-1, 1)."""
        return 2 * jax.nn.sigmoid(params["theta"] @ features + params["b2"]) - 1

    def loss_parameters(self, params: dict, features: jax.Array):
        """Maps s_t to ``(W_t (C, C), b_t (C,), a_t scalar)``."""
        weight, bias = params["W"], params["b"]
        if self.form == "state_gate":
            weight = weight + self.gate(params, features) * params["W2"]
        elif self.form == "mlp":
            mlp = params["mlp"]
            out = jnp.tanh(features @ mlp["w1"] + mlp["b1"]) @ mlp["w2"] + mlp["b2"]
            c = self.num_classes
            weight = weight + out[: c * c].reshape(c, c)
            bias = bias + out[c * c :]
        mix = jax.nn.sigmoid(params["mix_logit"]) if self.combine else 0.0
        return weight, bias, mix

    def describe(self, params: dict, features: jax.Array) -> dict[str, jax.Array]:
        """Scalars that describe the loss the teacher sets at s_t (logged per step).

        Args:
            params: the teacher's parameters.
            features: s_t, (num_features,).

        Returns:
            ``dlf/W_diag_mean`` and ``dlf/W_offdiag_mean`` (the means of W_t's diagonal
            and off-diagonal entries: 1 and 0 untaught), ``dlf/b_mean``, and with the
            form or option that has them ``dlf/gate`` (h_t) and ``dlf/mix`` (a_t).
        """
        weight, bias, mix = self.loss_parameters(params, features)
        c = self.num_classes
        diag = jnp.trace(weight) / c
        scalars = {"dlf/W_diag_mean": diag,
                   "dlf/W_offdiag_mean": (jnp.sum(weight) - c * diag) / (c * (c - 1)),
                   "dlf/b_mean": jnp.mean(bias)}
        if self.form == "state_gate":
            scalars["dlf/gate"] = self.gate(params, features)
        if self.combine:
            scalars["dlf/mix"] = mix
        return scalars

    def loss(self, params: dict, features: jax.Array, logits: jax.Array,
             labels: jax.Array) -> jax.Array:
        """The student's loss under this teacher at state features s_t."""
        weight, bias, mix = self.loss_parameters(params, features)
        return mixed_loss(weight, bias, mix, self.bilinear_scale, logits, labels)

    def student_loss(self, params: dict, features: jax.Array, output, batch: dict) -> jax.Array:
        """`loss` on a student's `engine.ModelOutput` and its batch (the labels ``"y"``):
        the interface the L2T-DLF machinery trains a teacher through."""
        return self.loss(params, features, output.logits, batch["y"])
