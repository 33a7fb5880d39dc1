"""Multi-branch students: a shared trunk, m copies of the last stage, a gated ensemble.

ONE's network (Lan, Zhu & Gong 2018): a student's last stage (with its pooling and
classifier) copied into m branches over the shared lower stages, and a gate
(average pool -> linear(m) -> BatchNorm -> ReLU -> softmax on the trunk's output) whose
weights g mix the branch logits into the ensemble's, ``z_e = sum_i g_i z_i``. The
branches run as one `flax.linen.vmap` over a branch axis (parameters and BatchNorm
statistics stacked (m, ...), each branch initialised from its own key), not a Python
loop.

The network is called like every student and returns logits (B, C): branch 0's (the
deployable network, the base network's cost once the other branches are dropped) or,
with ``output="ensemble"``, the gated ensemble's. It sows both, ``branch_logits``
(B, m, C) and ``ensemble_logits`` (B, C), for a loss that reads them
(`engine.student_output`). `views` gives the ensemble as a second network over the same
variables, which the driver evaluates beside the deployable branch.

A student splits into trunk and tail by its ``part`` attribute (`PARTS`): ``"whole"``
(the plain network), ``"trunk"`` (input to the end of the second-to-last stage) and
``"tail"`` (the last stage, pooling and classifier).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2t_jax.students._layers import batch_norm

PARTS = ("whole", "trunk", "tail")
OUTPUTS = ("branch", "ensemble")
BRANCH_LOGITS = "branch_logits"
ENSEMBLE_LOGITS = "ensemble_logits"


def stage_range(part: str, num_stages: int) -> tuple[int, int]:
    """The stages ``[first, stop)`` that a part of a `num_stages`-stage network runs.

    The stem runs when ``first == 0`` and the pooling and classifier when
    ``stop == num_stages``.
    """
    return {"whole": (0, num_stages), "trunk": (0, num_stages - 1),
            "tail": (num_stages - 1, num_stages)}[part]


class Branched(nn.Module):
    """A shared trunk, `num_branches` vmapped copies of a tail, and a gate.

    Attributes:
      trunk: the student with ``part="trunk"``: inputs -> feature map (B, ..., C).
      tail: the student with ``part="tail"``: feature map -> logits (B, C).
      num_branches: m.
      output: what ``__call__`` returns: ``"branch"`` (branch 0's logits) or
        ``"ensemble"`` (the gated ensemble's).
      dtype: the gate's parameter and computation dtype.
    """

    trunk: nn.Module
    tail: nn.Module
    num_branches: int = 3
    output: str = "branch"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns logits (B, C): branch 0's or the ensemble's (`output`)."""
        features = self.trunk(x, train)

        def run_tail(tail, features):
            return tail(features, train)

        branch_logits = nn.vmap(
            run_tail,
            variable_axes={"params": 0, "batch_stats": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=None, out_axes=1, axis_size=self.num_branches,
        )(self.tail, features)
        pooled = jnp.mean(features, axis=tuple(range(1, features.ndim - 1)))
        gate = nn.Dense(self.num_branches, dtype=self.dtype, param_dtype=self.dtype,
                        name="gate")(pooled)
        gate = nn.softmax(nn.relu(batch_norm(train, self.dtype)(name="gate_norm")(gate)))
        ensemble_logits = jnp.einsum("bm,bmc->bc", gate, branch_logits)
        self.sow("intermediates", BRANCH_LOGITS, branch_logits)
        self.sow("intermediates", ENSEMBLE_LOGITS, ensemble_logits)
        return ensemble_logits if self.output == "ensemble" else branch_logits[:, 0]


def views(model: nn.Module) -> dict[str, nn.Module]:
    """Other readings of a network's variables that evaluation reports beside it.

    Returns:
      ``{"ensemble": the gated ensemble}`` for a `Branched` network (which itself
      reads out branch 0), ``{}`` for any other.
    """
    if isinstance(model, Branched) and model.output == "branch":
        return {"ensemble": model.clone(output="ensemble")}
    return {}
