#!/usr/bin/env python
"""Time and memory of exact meta-gradients under each remat policy of the engine.

The meta-gradient is d(dev cross-entropy of the trained student) / d(loss parameters),
taken by `FullBackprop` through T plain-SGD student steps for each remat policy
("none", "step", "sqrt"). The teacher-controlled loss is a small smooth one defined
here: per-class weights and a temperature on the student's cross-entropy. Data are
random Gaussian inputs with uniformly random labels (only shapes matter for cost).

For each (student, T, policy) the script records the compile time of the jitted
meta-gradient (`lower` + `compile`), the median/min/max wall time of the compiled call
over `--repeats` runs, the wall time of the forward unroll alone (same policy, no
gradient), and XLA's memory analysis of the compiled meta-gradient; ``peak_mb`` is its
temp buffer size (the memory the policy controls; arguments and outputs are the same
for every policy and are recorded as ``argument_mb`` / ``output_mb``). Before timing,
all policies' gradients are checked equal (rtol 1e-4).

Launch, from the repository root:

    python benchmarks/remat.py --quick          # MLP 64-128-10, T in {10, 100}: ~30 s
    python benchmarks/remat.py                  # both MLPs, T up to 1000: ~15 min
    python benchmarks/remat.py --threads=1      # pin to one core

Run times are for 2 CPU cores. Threads: by default XLA uses every core it is given and
``threads`` is recorded as ``os.cpu_count()``. ``--threads=N`` restricts the process to
N cores with ``os.sched_setaffinity`` before JAX starts its backend, and for N = 1 also
sets ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``;
on jax 0.10 that flag alone leaves a CPU matmul running on two cores, so the affinity
is what actually pins it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (XLA reads XLA_FLAGS when the backend starts, not at import)
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from l2t_jax import engine  # noqa: E402
from l2t_jax.optimizers import make_inner_optimizer  # noqa: E402
from l2t_jax.students import build_student  # noqa: E402

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


def weighted_tempered_ce(meta_params, logits, labels, state):
    """The teacher-controlled student loss: class-weighted cross-entropy at a temperature.

    Args:
        meta_params: ``{"log_class_weight": (C,), "log_temperature": ()}``.
        logits: student logits (B, C).
        labels: integer labels (B,).
        state: the student before the step (unused).

    Returns:
        mean_b w[y_b] * CE(logits_b / tau, y_b), with w = exp(log_class_weight) and
        tau = exp(log_temperature); plain cross-entropy at zero meta-parameters.
    """
    del state
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
        ml_collections.ConfigDict({"name": "mlp", "hidden": hidden, "activation": "relu"}),
        NUM_CLASSES,
    )
    tx = make_inner_optimizer(
        ml_collections.ConfigDict({"name": "sgd", "learning_rate": LEARNING_RATE}),
        num_steps,
    )
    step_fn = engine.make_student_step(model, weighted_tempered_ce, tx)
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
        for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(grads[reference])):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-4,
                err_msg=f"remat={policy!r} differs from remat={reference!r}",
            )


def bench_case(student_name: str, num_steps: int, repeats: int, threads: int, seed: int):
    """Benchmarks every remat policy on one (student, T); returns one record per policy."""
    step_fn, objective, args = make_problem(
        student_name, num_steps, jax.random.PRNGKey(seed)
    )
    compiled, grads = {}, {}
    for policy in engine.REMAT_POLICIES:
        compiled[policy] = compile_timed(make_meta_grad(step_fn, objective, policy), args)
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
        records.append({
            "benchmark": f"meta_grad_remat_{policy}",
            "framework": "jax",
            "student": student_name,
            "T": num_steps,
            "threads": threads,
            "median_s": float(np.median(times)),
            "min_s": float(np.min(times)),
            "max_s": float(np.max(times)),
            "peak_mb": memory.temp_size_in_bytes / MB,
            "compile_s": compile_s,
            "forward_s": forward_s,
            "argument_mb": memory.argument_size_in_bytes / MB,
            "output_mb": memory.output_size_in_bytes / MB,
        })
    return records


def format_row(r: dict) -> str:
    return (
        f"{r['student']:>14} {r['T']:>5} {r['benchmark'].removeprefix('meta_grad_remat_'):>5}"
        f" {r['peak_mb']:>9.1f} {r['argument_mb']:>7.1f} {r['median_s']:>9.4f}"
        f" {r['min_s']:>9.4f} {r['max_s']:>9.4f} {r['forward_s']:>9.4f}"
        f" {r['median_s'] / r['forward_s']:>6.2f} {r['compile_s']:>8.2f}"
    )


HEADER = (
    f"{'student':>14} {'T':>5} {'remat':>5} {'temp_MB':>9} {'arg_MB':>7} {'median_s':>9}"
    f" {'min_s':>9} {'max_s':>9} {'fwd_s':>9} {'meta/f':>6} {'compile':>8}"
)


def peak_rss_mb() -> float:
    """The process's peak resident set size (VmHWM), in MB; NaN off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def pin_threads(threads: int) -> None:
    """Restricts the process to `threads` cores; must run before JAX's first computation."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads > len(cpus):
        raise SystemExit(f"--threads={threads} but only {len(cpus)} cores are available")
    os.sched_setaffinity(0, cpus[:threads])
    if threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="MLP 64-128-10 only, T in {10, 100} (under 2 minutes).")
    parser.add_argument("--out", default="docs/remat.json", help="JSON output path.")
    parser.add_argument("--threads", type=int, default=None,
                        help="Pin to this many cores (default: leave as is).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls per case (>= 5).")
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
    steps = QUICK_STEPS if args.quick else FULL_STEPS

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, threads={threads}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, repeats={args.repeats}")
    print(HEADER, flush=True)
    records = []
    start = time.perf_counter()
    for student_name in students:
        for num_steps in steps:
            for record in bench_case(student_name, num_steps, args.repeats, threads, args.seed):
                records.append(record)
                print(format_row(record), flush=True)
    print(f"total {time.perf_counter() - start:.1f} s; process peak RSS {peak_rss_mb():.0f} MB")

    out_dir = os.path.dirname(args.out)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
