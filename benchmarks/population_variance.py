#!/usr/bin/env python
"""Does a student population reduce the teacher's meta-gradient variance?

On digits with 40% training-label noise, for the two methods' own configs:

* L2T-DLF (``configs/l2t_dlf.py:digits,noisy``): the teacher's exact meta-gradient of one
  episode (T = 150 steps from a fresh student, own data order), per student.
* L2T-DLN (``configs/l2t_dln.py:digits,noisy,released,warm``): stage A's hypergradient
  d CE_val / d phi through K = 15 steps (what the LSTM teacher reads), per student,
  on the iteration's shared validation batch.

For each, 16 students (`population.PopulationEstimator.per_student`) at the untaught
teacher and after a few teacher updates (DLF: 10 episodes of the P = 1 method; DLN: 20
iterations of the P = 16 method, so the students have trained 300 steps). Reported:
the total variance across students sigma^2 = E ||g_i - mean g||^2
(`grad_variance`), the squared norm of the mean, and for P in {1, 4, 16} the variance of
the P-averaged estimate: measured across the 16 / P disjoint groups of P (P < 16;
needs >= 2 groups) and sigma^2 / P (independent members). ``noise_to_signal`` =
variance / ||mean g||^2.

Launch from the repository root (about 2 minutes on 2 idle cores):

    python -m benchmarks.population_variance

Writes ``docs/population_variance.json``: one record per (method, teacher, P) with keys
``method, teacher_updates, P, num_students, per_student_variance, mean_grad_sq_norm,
variance_of_mean_predicted, variance_of_mean_measured, noise_to_signal, seconds``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from benchmarks._records import write_records  # noqa: E402
from configs import l2t_dlf, l2t_dln  # noqa: E402
from l2t_jax import data, population  # noqa: E402
from l2t_jax.methods import dlf, dln  # noqa: E402

NUM_STUDENTS = 16
POPULATION_SIZES = (1, 4, 16)
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "population_variance.json")


def grad_variance(grads) -> jax.Array:
    """Total variance of per-student meta-gradients: E ||g_i - mean g||^2 (unbiased).

    The population average of P independent students has total variance this / P: the
    quantity to report when asking whether a population reduces meta-gradient noise.

    Args:
        grads: a gradient pytree whose leaves have a leading P axis, P >= 2.

    Returns:
        Scalar: the sum over coordinates of the across-student variance (ddof=1).
    """
    leaves = jax.tree_util.tree_leaves(grads)
    if leaves[0].shape[0] < 2:
        raise ValueError(f"grad_variance needs P >= 2 students, got {leaves[0].shape[0]}")
    return sum(jnp.sum(jnp.var(g, axis=0, ddof=1)) for g in leaves)


def summarise(method: str, updates: int, grads: np.ndarray, seconds: float) -> list[dict]:
    """Records for P in POPULATION_SIZES from (NUM_STUDENTS, N) per-student gradients."""
    sigma2 = float(grad_variance(jnp.asarray(grads)))
    mean_sq = float(np.sum(grads.mean(axis=0) ** 2))
    records = []
    for p in POPULATION_SIZES:
        groups = grads.reshape(NUM_STUDENTS // p, p, -1).mean(axis=1)
        measured = float(groups.var(axis=0, ddof=1).sum()) if len(groups) >= 2 else None
        records.append(dict(
            method=method, teacher_updates=updates, P=p, num_students=NUM_STUDENTS,
            per_student_variance=sigma2, mean_grad_sq_norm=mean_sq,
            variance_of_mean_predicted=sigma2 / p, variance_of_mean_measured=measured,
            noise_to_signal=sigma2 / p / mean_sq, seconds=seconds))
    return records


def dlf_records(updates: int) -> list[dict]:
    config = l2t_dlf.get_config("digits,noisy")
    splits = data.load_splits(config.data)
    single = dlf.build_episodic(config, splits, dlf.build_teacher(config, splits.num_classes))
    state = single.init(jax.random.PRNGKey(0), splits)
    step = jax.jit(single.outer_step)
    for episode in range(updates):
        state, _ = step(state, single.batches(splits, 0, episode * single.steps_per_call))
    method = dataclasses.replace(single, population=population.Population(NUM_STUDENTS))
    batches = method.batches(splits, 1, updates * method.steps_per_call)
    step_fn = method._teaching(
        dlf.make_dlf_loss_fn(method.teacher, method.steps_per_call, method.features_grad),
    ).step_fn(batches)
    objective = method.update.dev_objective_fn(method.model, batches["dev"])
    estimator = population.PopulationEstimator(method.update.estimator)

    @jax.jit
    def per_student(teacher, rng):
        students = method._student_init(rng, batches["sample_x"])
        return estimator.per_student(step_fn, objective, teacher, students,
                                     batches["train"]).grad

    start = time.perf_counter()
    grads = per_student(state.teacher_params, jax.random.PRNGKey(100 + updates))
    grads = np.asarray(jax.vmap(lambda g: ravel_pytree(g)[0])(grads), np.float64)
    return summarise("l2t-dlf", updates, grads, time.perf_counter() - start)


def dln_records(updates: int) -> list[dict]:
    config = l2t_dln.get_config("digits,noisy,released,warm")
    config.dln.population_size = NUM_STUDENTS
    splits = data.load_splits(config.data)
    method = dln.build_dln_teaching(config, splits)
    phi = dln.initial_dln(config, jax.random.PRNGKey(1))
    state = method.init(jax.random.PRNGKey(0), splits, phi)
    step = jax.jit(method.outer_step)
    for iteration in range(updates):
        state, _ = step(state, method.batches(splits, 0, iteration * method.steps_per_call))
    batches = method.batches(splits, 0, updates * method.steps_per_call)
    step_fn = method.student_teaching.step_fn(batches)
    objective = method.update.dev_objective_fn(method.model, batches["val"])
    estimator = population.PopulationEstimator(method.update.estimator)

    @jax.jit
    def per_student(dln, students):
        return estimator.per_student(step_fn, objective, dln, students, batches["train"]).grad

    start = time.perf_counter()
    grads = per_student(state.loss_params, state.student)
    grads = np.asarray(jax.vmap(lambda g: ravel_pytree(g)[0])(grads), np.float64)
    return summarise("l2t-dln", updates, grads, time.perf_counter() - start)


def main() -> None:
    records = []
    for build, updates in ((dlf_records, 0), (dlf_records, 10), (dln_records, 0),
                           (dln_records, 20)):
        records += build(updates)
    print(f"{'method':8s} {'updates':>7s} {'P':>3s} {'sigma^2 (1 student)':>20s} "
          f"{'|mean g|^2':>11s} {'var of P-mean':>14s} {'measured':>10s} {'noise/signal':>12s}")
    for r in records:
        measured = ("-" if r["variance_of_mean_measured"] is None
                    else f"{r['variance_of_mean_measured']:.3g}")
        print(f"{r['method']:8s} {r['teacher_updates']:7d} {r['P']:3d} "
              f"{r['per_student_variance']:20.3g} {r['mean_grad_sq_norm']:11.3g} "
              f"{r['variance_of_mean_predicted']:14.3g} {measured:>10s} "
              f"{r['noise_to_signal']:12.3g}")
    write_records(records, OUT)


if __name__ == "__main__":
    main()
