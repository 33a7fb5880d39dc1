"""The L2T-DLN teacher: a coordinate-wise LSTM that proposes updates of the loss network.

Four stacked LSTM cells (2 -> 64 -> 64 -> 64 -> 1 by default), with PyTorch's
`LSTMCell` equations and gate order (i, f, g, o) and its two bias vectors, shared by all
coordinates of the DLN and run independently on each (`jax.vmap` over coordinates).
Each coordinate's input is its hypergradient g, preprocessed as in Andrychowicz et al.
(2016) with p = 10; its output h in (-1, 1) is the proposed step (the method applies
``phi <- phi - step_size * h``). Hidden and cell states persist over the whole run: the
teacher's memory.

Initialisation is PyTorch's default for `LSTMCell`, as in the released code (which never
calls its own `init_weight`): uniform(-1/sqrt(H), 1/sqrt(H)) for every kernel and bias,
with H the cell's own hidden size, so the last cell (H = 1) draws from uniform(-1, 1).

Optionally (an extension the paper describes and the code does not have), E extra
student-state features are appended to every coordinate's input.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def preprocess_gradient(g: jax.Array, factor: float = 10.0) -> jax.Array:
    """Andrychowicz et al.'s gradient preprocessing, element-wise.

    Args:
        g: (N,) gradients.
        factor: p.

    Returns:
        (N, 2): ``(log(|g| + 1e-8) / p, sign g)`` where ``|g| >= e^-p``, else
        ``(-1, e^p g)``.
    """
    keep = jnp.abs(g) >= jnp.exp(-factor)
    # The log branch is evaluated everywhere; its value is discarded where `keep` is False.
    log_part = jnp.log(jnp.abs(g) + 1e-8) / factor
    first = jnp.where(keep, log_part, -1.0)
    second = jnp.where(keep, jnp.sign(g), jnp.exp(factor) * g)
    return jnp.stack([first, second], -1)


def _lstm_cell(params: dict, x: jax.Array, h: jax.Array, c: jax.Array):
    """One PyTorch `LSTMCell` step for one coordinate: x (in,), h, c (H,)."""
    gates = x @ params["w_ih"] + params["b_ih"] + h @ params["w_hh"] + params["b_hh"]
    i, f, g, o = jnp.split(gates, 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return h, c


@dataclasses.dataclass(frozen=True)
class CoordinateLSTM:
    """The teacher's structure; parameters and memory are explicit pytrees.

    Attributes:
        hidden: width of the hidden cells (64).
        num_cells: stacked cells (4); the last has hidden size 1.
        num_extra_inputs: student-state features appended to each coordinate's input.
        preprocess_factor: p of `preprocess_gradient` (10).
    """

    hidden: int = 64
    num_cells: int = 4
    num_extra_inputs: int = 0
    preprocess_factor: float = 10.0

    @property
    def sizes(self) -> tuple[int, ...]:
        """Input width followed by each cell's hidden size."""
        return (2 + self.num_extra_inputs,) + (self.hidden,) * (self.num_cells - 1) + (1,)

    def init(self, rng: jax.Array) -> dict:
        """PyTorch's default `LSTMCell` initialisation, cell by cell.

        Returns:
            ``{"cell_i": {"w_ih": (in, 4H), "w_hh": (H, 4H), "b_ih": (4H,), "b_hh": (4H,)}}``.
        """
        params = {}
        keys = jax.random.split(rng, self.num_cells)
        for i, (key, fan_in, size) in enumerate(zip(keys, self.sizes[:-1], self.sizes[1:])):
            bound = 1.0 / jnp.sqrt(size)
            shapes = {"w_ih": (fan_in, 4 * size), "w_hh": (size, 4 * size),
                      "b_ih": (4 * size,), "b_hh": (4 * size,)}
            subkeys = jax.random.split(key, len(shapes))
            params[f"cell_{i}"] = {
                name: jax.random.uniform(k, shape, minval=-bound, maxval=bound)
                for k, (name, shape) in zip(subkeys, shapes.items())
            }
        return params

    def init_memory(self, num_coordinates: int) -> dict:
        """Zero hidden and cell states for `num_coordinates` coordinates.

        Returns:
            ``{"cell_i": {"h": (N, H), "c": (N, H)}}``.
        """
        return {
            f"cell_{i}": {"h": jnp.zeros((num_coordinates, size)),
                          "c": jnp.zeros((num_coordinates, size))}
            for i, size in enumerate(self.sizes[1:])
        }

    def __call__(self, params: dict, grads: jax.Array, memory: dict,
                 extra_inputs: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Proposes one step per coordinate.

        Args:
            params: from `init`.
            grads: (N,) hypergradients, one per DLN coordinate.
            memory: from `init_memory(N)` or a previous call.
            extra_inputs: (E,) student-state features shared by all coordinates, when
                ``num_extra_inputs`` = E > 0.

        Returns:
            ``(steps, memory)``: steps (N,) in (-1, 1) and the new memory.
        """
        inputs = preprocess_gradient(grads, self.preprocess_factor)
        if self.num_extra_inputs:
            shared = jnp.broadcast_to(extra_inputs, (grads.shape[0], self.num_extra_inputs))
            inputs = jnp.concatenate([inputs, shared.astype(inputs.dtype)], -1)

        def one_coordinate(x, states):
            new_states = {}
            for i in range(self.num_cells):
                name = f"cell_{i}"
                x, c = _lstm_cell(params[name], x, states[name]["h"], states[name]["c"])
                new_states[name] = {"h": x, "c": c}
            return x[0], new_states

        return jax.vmap(one_coordinate)(inputs, memory)
