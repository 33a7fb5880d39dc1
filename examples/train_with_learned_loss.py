r"""Trains a plain Flax network with plain optax on a loss that L2T-DLF learned.

No training machinery of l2t_jax is used: only `l2t_jax.export.load`, which turns a
finished run's workdir into a pure, jittable loss function.

  python -m launch.train --config=configs/l2t_dlf.py:digits,noisy --workdir=/tmp/dlf
  python examples/train_with_learned_loss.py --workdir=/tmp/dlf
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from l2t_jax import export


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(256)(x)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a finished run's directory")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--noise", type=float, default=0.4, help="label noise rate")
    args = parser.parse_args()

    loss_fn = export.load(args.workdir)  # the learned loss, frozen as the run left it
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    x, y = (x[order] / 16.0).astype(np.float32), y[order]
    x_test, y_test, x, y = x[:500], y[:500], x[500:], y[500:]
    flip = rng.random(len(y)) < args.noise  # symmetric noise on the training labels
    y = np.where(flip, rng.integers(0, 10, len(y)), y)

    model, tx = MLP(), optax.sgd(0.1, momentum=0.9)
    params = model.init(jax.random.PRNGKey(0), x[:1])
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb, t):
        def loss(p):
            return loss_fn(model.apply(p, xb), yb, step=t, num_steps=args.steps)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    for t in range(args.steps):
        batch = rng.integers(0, len(y), 64)
        params, opt_state, value = step(params, opt_state, x[batch], y[batch], t)
        if (t + 1) % 500 == 0 or t + 1 == args.steps:
            error = jnp.mean(jnp.argmax(model.apply(params, x_test), -1) != y_test)
            print(f"step {t + 1}: loss {float(value):.4f}, test error {100 * float(error):.2f}%")


if __name__ == "__main__":
    main()
