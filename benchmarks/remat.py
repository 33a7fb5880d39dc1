#!/usr/bin/env python
"""Time and memory of exact meta-gradients under each remat policy of the engine.

The meta-gradient is d(dev cross-entropy of the trained student) / d(loss parameters),
taken by `FullBackprop` through T plain-SGD student steps for each remat policy
("none", "step", "sqrt"). The teacher-controlled loss is a small smooth one defined
here: per-class weights and a temperature on the student's cross-entropy. Data are
random Gaussian inputs with uniformly random labels (only shapes matter for cost).

For each (student, T, policy) the script records:

* ``compile_s``: compile time of the jitted meta-gradient (`lower` + `compile`).
* ``median_s``, ``min_s``, ``max_s``: wall time of the compiled call over `--repeats`
  runs.
* ``forward_s``: wall time of the forward unroll alone (same policy, no gradient).
* ``peak_mb``: from XLA's memory analysis of the compiled meta-gradient, its temp buffer
  size. This is the memory the policy controls. Arguments and outputs are the same for
  every policy and are recorded as ``argument_mb`` and ``output_mb``.
* ``other_load``: the mean number of cores other (un-niced) processes kept busy while
  this (student, T) ran. On a shared host a value near 1 means the times are inflated.

Before timing, all policies' gradients are checked equal (rtol 1e-4). Results:
docs/remat.md.

Launch, from the repository root:

    python benchmarks/remat.py --quick        # MLP 64-128-10, T in {10, 100}: ~20 s
    python benchmarks/remat.py                # both MLPs, T up to 1000: ~3 min
    python benchmarks/remat.py --threads=1    # pin to one core

Run times are for 2 otherwise idle CPU cores; another busy process can double them.

Threads: by default XLA uses every core it is given, and ``threads`` is recorded as
``os.cpu_count()``. ``--threads=N`` restricts the process to N cores with
``os.sched_setaffinity`` before JAX starts its backend. For N = 1 it also sets
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``. On
jax 0.10 that flag alone leaves a CPU matmul running on two cores, so the affinity is
what actually pins it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Importing jax does not start its backend, so `pin_threads` in `main` still runs before
# XLA reads XLA_FLAGS and starts its thread pool.

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from benchmarks._records import timing_record, write_records
from l2t_jax import engine
from l2t_jax.losses import logits_loss
from l2t_jax.optimizers import make_inner_optimizer
from l2t_jax.students import build_student

NUM_CLASSES = 10
BATCH_SIZE = 128
DEV_SIZE = 512
LEARNING_RATE = 0.05
# name -> (input dimension, hidden widths)
STUDENTS = {"mlp784-256-10": (784, (256,)), "mlp64-128-10": (64, (128,))}
FULL_STEPS = (10, 50, 100, 200, 1000)
QUICK_STUDENTS = ("mlp64-128-10",)
QUICK_STEPS = (10, 100)
MB = 2.0**20


def weighted_tempered_ce(meta_params, logits, labels):
    """The teacher-controlled student loss: class-weighted cross-entropy at a temperature.

    Args:
        meta_params: ``{"log_class_weight": (C,), "log_temperature": ()}``.
        logits: student logits (B, C).
        labels: integer labels (B,).

    Returns:
        mean_b w[y_b] * CE(logits_b / tau, y_b), with w = exp(log_class_weight) and
        tau = exp(log_temperature); plain cross-entropy at zero meta-parameters.
    """
    weights = jnp.exp(meta_params["log_class_weight"])[labels]
    temperature = jnp.exp(meta_params["log_temperature"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits / temperature, labels)
    return jnp.mean(weights * ce)


def make_problem(student_name: str, num_steps: int, rng: jax.Array):
    """Builds the student, its SGD step, the dev objective and the inputs.

    Args:
        student_name: a key of `STUDENTS`.
        num_steps: T, the number of inner SGD steps.
        rng: PRNG key for data, initialisation and meta-parameters.

    Returns:
        ``(step_fn, objective, args)`` with ``args = (meta_params, state, batches)``;
        ``batches`` holds ``x`` (T, B, D) float32 and ``y`` (T, B) int32.
    """
    in_dim, hidden = STUDENTS[student_name]
    model = build_student(
        ml_collections.ConfigDict(
            {"name": "mlp", "hidden": hidden, "activation": "relu"}
        ),
        NUM_CLASSES,
    )
    tx = make_inner_optimizer(
        ml_collections.ConfigDict({"name": "sgd", "learning_rate": LEARNING_RATE}),
        num_steps,
    )
    step_fn = engine.make_student_step(model, logits_loss(weighted_tempered_ce), tx)
    k_x, k_y, k_dx, k_dy, k_init, k_w, k_t = jax.random.split(rng, 7)
    batches = {
        "x": jax.random.normal(k_x, (num_steps, BATCH_SIZE, in_dim), jnp.float32),
        "y": jax.random.randint(k_y, (num_steps, BATCH_SIZE), 0, NUM_CLASSES),
    }
    dev_x = jax.random.normal(k_dx, (DEV_SIZE, in_dim), jnp.float32)
    dev_y = jax.random.randint(k_dy, (DEV_SIZE,), 0, NUM_CLASSES)
    state = engine.init_student_state(model, tx, k_init, dev_x[:1])
    # Small random meta-parameters, so no gradient coordinate sits at a symmetric point.
    meta_params = {
        "log_class_weight": 0.1 * jax.random.normal(k_w, (NUM_CLASSES,)),
        "log_temperature": 0.1 * jax.random.normal(k_t, ()),
    }

    def objective(mp, final):
        del mp
        logits, _ = engine.apply_student(
            model, final.params, final.model_state, dev_x, train=False
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, dev_y)
        return jnp.mean(ce), None

    return step_fn, objective, (meta_params, state, batches)


def make_meta_grad(step_fn, objective, remat: str):
    """``(meta_params, state, batches) -> (dev CE, its gradient in meta_params)``."""
    estimator = engine.FullBackprop(remat=remat)

    def meta_grad(meta_params, state, batches):
        result = estimator(step_fn, objective, meta_params, state, batches)
        return result.value, result.grad

    return meta_grad


def make_forward(step_fn, objective, remat: str):
    """``(meta_params, state, batches) -> dev CE`` after the unroll, without gradient."""

    def forward(meta_params, state, batches):
        final, _ = engine.unroll(step_fn, meta_params, state, batches, remat=remat)
        return objective(meta_params, final)[0]

    return forward


def compile_timed(fn, args):
    """Returns ``(compiled, seconds spent in lower + compile)``."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def host_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds un-niced processes have used, CPU seconds this process has used).

    The first is read from /proc/stat (NaN off Linux). Over a stretch of wall time, the
    difference of the two is the CPU other processes took meanwhile: on a shared host it
    explains slow runs. Niced processes are left out: they yield to this one.
    """
    own = sum(os.times()[:2])
    try:
        with open("/proc/stat") as f:
            user, _, system, _, _, irq, softirq = map(int, f.readline().split()[1:8])
    except (OSError, ValueError):
        return float("nan"), own
    return (user + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), own


def wall_times(compiled, args, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls, each waited for with block_until_ready."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return times


def check_same_gradient(grads: dict, reference: str = "none") -> None:
    """Asserts every policy's meta-gradient matches `reference`'s (rtol 1e-4)."""
    for policy, grad in grads.items():
        leaves = zip(
            jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(grads[reference])
        )
        for a, b in leaves:
            np.testing.assert_allclose(
                np.asarray(a),
                np.asarray(b),
                rtol=1e-4,
                err_msg=f"remat={policy!r} differs from remat={reference!r}",
            )


def bench_case(
    student_name: str, num_steps: int, repeats: int, threads: int, seed: int
):
    """Benchmarks every remat policy on one (student, T); returns one record per policy."""
    host_start, own_start = host_cpu_seconds()
    wall_start = time.perf_counter()
    step_fn, objective, args = make_problem(
        student_name, num_steps, jax.random.PRNGKey(seed)
    )
    compiled, grads = {}, {}
    for policy in engine.REMAT_POLICIES:
        compiled[policy] = compile_timed(
            make_meta_grad(step_fn, objective, policy), args
        )
        # This first call also warms the executable up before it is timed.
        _, grads[policy] = jax.block_until_ready(compiled[policy][0](*args))
    check_same_gradient(grads)

    records = []
    for policy in engine.REMAT_POLICIES:
        meta_exe, compile_s = compiled.pop(policy)
        times = wall_times(meta_exe, args, repeats)
        memory = meta_exe.memory_analysis()
        del meta_exe
        forward_exe, _ = compile_timed(make_forward(step_fn, objective, policy), args)
        jax.block_until_ready(forward_exe(*args))
        forward_s = float(np.median(wall_times(forward_exe, args, repeats)))
        records.append(timing_record(
            f"meta_grad_remat_{policy}", "jax", student_name, num_steps, threads, times,
            memory.temp_size_in_bytes / MB, compile_s=compile_s, forward_s=forward_s,
            argument_mb=memory.argument_size_in_bytes / MB,
            output_mb=memory.output_size_in_bytes / MB,
        ))
    host_end, own_end = host_cpu_seconds()
    other_load = (host_end - host_start) - (own_end - own_start)
    other_load /= time.perf_counter() - wall_start
    # None (JSON null) where /proc/stat is unavailable.
    other_load = max(0.0, other_load) if math.isfinite(other_load) else None
    for record in records:
        record["other_load"] = other_load
    return records


def format_row(r: dict) -> str:
    return (
        f"{r['student']:>14} {r['T']:>5} {r['benchmark'].rsplit('_', 1)[1]:>5}"
        f" {r['peak_mb']:>9.1f} {r['argument_mb']:>7.1f} {r['median_s']:>9.4f}"
        f" {r['min_s']:>9.4f} {r['max_s']:>9.4f} {r['forward_s']:>9.4f}"
        f" {r['median_s'] / r['forward_s']:>6.2f} {r['compile_s']:>8.2f}"
        f" {'-' if r['other_load'] is None else format(r['other_load'], '.2f'):>6}"
    )


HEADER = (
    f"{'student':>14} {'T':>5} {'remat':>5} {'temp_MB':>9} {'arg_MB':>7} {'median_s':>9}"
    f" {'min_s':>9} {'max_s':>9} {'fwd_s':>9} {'meta/f':>6} {'compile':>8} {'others':>6}"
)


def proc_mb(path: str, key: str, missing: float) -> float:
    """A kB field of a Linux /proc file (``VmHWM:`` of /proc/self/status, ...) in MB;
    `missing` where there is none (off Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return missing


def peak_rss_mb() -> float:
    """The process's peak resident set size (VmHWM), in MB; NaN off Linux."""
    return proc_mb("/proc/self/status", "VmHWM:", float("nan"))


def pin_threads(threads: int) -> None:
    """Restricts the process to `threads` cores; must run before JAX's first computation."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise SystemExit(
            f"--threads={threads} but only {len(cpus)} cores are available"
        )
    os.sched_setaffinity(0, cpus[:threads])
    if threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="MLP 64-128-10 only, T in {10, 100} (under 2 minutes).",
    )
    parser.add_argument("--out", default="docs/remat.json", help="JSON output path.")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="Pin to this many cores (default: leave as is).",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="Timed calls per case (>= 5)."
    )
    parser.add_argument(
        "--students",
        default=None,
        help=f"Comma-separated subset of {', '.join(STUDENTS)} (default: all, or the "
        "quick one with --quick).",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.repeats < 5:
        raise SystemExit("--repeats must be >= 5")
    if args.threads is not None:
        pin_threads(args.threads)
    threads = args.threads if args.threads is not None else os.cpu_count()
    students = QUICK_STUDENTS if args.quick else tuple(STUDENTS)
    if args.students:
        students = tuple(args.students.split(","))
        unknown = [name for name in students if name not in STUDENTS]
        if unknown:
            raise SystemExit(
                f"unknown --students {unknown}; choose from {list(STUDENTS)}"
            )
    steps = QUICK_STEPS if args.quick else FULL_STEPS

    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, threads={threads}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, repeats={args.repeats}"
    )
    print(HEADER, flush=True)
    records = []
    start = time.perf_counter()
    for student_name in students:
        for num_steps in steps:
            for record in bench_case(
                student_name, num_steps, args.repeats, threads, args.seed
            ):
                records.append(record)
                print(format_row(record), flush=True)
    print(
        f"total {time.perf_counter() - start:.1f} s; "
        f"process peak RSS {peak_rss_mb():.0f} MB"
    )

    write_records(records, args.out)


if __name__ == "__main__":
    main()
