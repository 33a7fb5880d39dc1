#!/usr/bin/env python
"""Throughput of population meta-gradients, and their scaling across (fake) devices.

The meta-gradient is the one of `benchmarks/remat.py` (dev cross-entropy after T plain-SGD
steps of an MLP 64-128-10 on batches of 128, through a class-weighted, tempered
cross-entropy), taken by `FullBackprop` for every student of a population and averaged
by `l2t_jax.population.PopulationEstimator`. Each student has its own initialisation and
random batches.

Two parts:

* ``population``: on one device, P in {1, 4, 16, 64} students as one vmapped program
  (``population_vmap``) vs P calls of the jitted single-student meta-gradient
  (``population_sequential``).
* ``scaling``: the vmapped program jitted on a mesh
  (`l2t_jax.population.jit_population_meta_gradient`) over 1, 2, 4, 8 devices: P = 16
  students split over the ``population`` axis
  (``mesh_population``), and P = 2 students with each batch of 128 split over the
  ``data`` axis (``mesh_data``). Gradients are checked equal to the 1-device ones
  (rtol 1e-4) before timing.

Records (`docs/population.json`) follow the project layout plus ``P``, ``devices``,
``mesh`` and ``students_steps_per_s`` = P * T / median_s; ``peak_mb`` is XLA's temp
buffer size of the compiled program (the sum over the P calls' single program is not
meaningful, so the sequential records give the single-student program's).

The devices are fake: ``--xla_force_host_platform_device_count=8`` splits the host CPU
into 8 XLA devices that share its cores (2 here), so "scaling" measures partitioning
overhead, not speed-up. Results: docs/population.md.

Launch, from the repository root (about 2 minutes on 2 idle cores):

    python -m benchmarks.population            # (or python benchmarks/population.py)
    python -m benchmarks.population --quick    # P in {1, 4}, devices in {1, 2}: ~30 s
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

# Before JAX is imported: 8 fake CPU devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from benchmarks._records import timing_record, write_records
from benchmarks.remat import (
    compile_timed,
    host_cpu_seconds,
    make_problem,
    peak_rss_mb,
    wall_times,
)
from l2t_jax import engine, mesh
from l2t_jax.population import PopulationEstimator, jit_population_meta_gradient

STUDENT = "mlp64-128-10"
NUM_STEPS = 10
POPULATIONS = (1, 4, 16, 64)
DEVICE_COUNTS = (1, 2, 4, 8)
SCALING_POPULATION = 16
DATA_POPULATION = 2
MB = 2.0**20


def make_population(population: int, seed: int):
    """``(step_fn, objective, (meta_params, states, batches))`` for P students.

    Member i is `remat.make_problem` with key ``fold_in(seed, i)`` (its own initialisation
    and batches); they share member 0's meta-parameters and dev set.
    """
    problems = [
        make_problem(STUDENT, NUM_STEPS, jax.random.fold_in(jax.random.PRNGKey(seed), i))
        for i in range(population)
    ]
    step_fn, objective, (meta_params, _, _) = problems[0]
    states, batches = jax.tree_util.tree_map(
        lambda *leaves: np.stack(leaves), *[p[2][1:] for p in problems]
    )
    return step_fn, objective, (meta_params, states, batches)


def record(benchmark, population, times, memory, threads, devices=1, mesh=None, **extra):
    """One record in the project layout (peak_mb: XLA's temporary memory)."""
    return timing_record(
        benchmark, "jax", STUDENT, NUM_STEPS, threads, times,
        memory.temp_size_in_bytes / MB, P=population, devices=devices, mesh=mesh,
        students_steps_per_s=population * NUM_STEPS / float(np.median(times)), **extra)


def bench_population(population: int, repeats: int, threads: int, seed: int) -> list[dict]:
    """Vmapped population vs P sequential single-student calls, on one device."""
    step_fn, objective, (meta_params, states, batches) = make_population(population, seed)
    estimator = PopulationEstimator(engine.FullBackprop())

    def population_grad(mp, s, b):
        result = estimator(step_fn, objective, mp, s, b)
        return result.value, result.grad

    def single_grad(mp, s, b):
        result = engine.FullBackprop()(step_fn, objective, mp, s, b)
        return result.value, result.grad

    args = (meta_params, states, batches)
    vmapped, compile_s = compile_timed(population_grad, args)
    value, grad = jax.block_until_ready(vmapped(*args))
    members = [jax.tree_util.tree_map(lambda a, i=i: a[i], (states, batches))
               for i in range(population)]
    single, single_compile_s = compile_timed(single_grad, (meta_params, *members[0]))
    grads = [single(meta_params, *m)[1] for m in members]
    mean_grad = jax.tree_util.tree_map(lambda *g: np.mean(g, axis=0), *grads)
    check_close(grad, mean_grad, f"P={population}: vmapped vs sequential")

    def sequential():
        return [single(meta_params, *m) for m in members]

    seq_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(sequential())
        seq_times.append(time.perf_counter() - start)
    return [
        record("population_vmap", population, wall_times(vmapped, args, repeats),
               vmapped.memory_analysis(), threads, compile_s=compile_s),
        record("population_sequential", population, seq_times, single.memory_analysis(),
               threads, compile_s=single_compile_s),
    ]


def bench_scaling(axis: str, population: int, repeats: int, threads: int, seed: int,
                  device_counts) -> list[dict]:
    """The population meta-gradient on meshes of 1, 2, ... devices along `axis`."""
    step_fn, objective, args = make_population(population, seed)
    estimator = PopulationEstimator(engine.FullBackprop())
    records, reference = [], None
    for count in device_counts:
        spec = {"population": count, "data": 1} if axis == "population" else {
            "population": 1, "data": count}
        device_mesh = mesh.make_mesh(spec, jax.devices()[:count])
        fn = jit_population_meta_gradient(estimator, step_fn, objective, device_mesh)
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        placed = jax.device_put(args, (mesh.replicated(device_mesh),
                                       mesh.population_sharding(device_mesh),
                                       mesh.batch_sharding(device_mesh)))
        grad = jax.block_until_ready(compiled(*placed)).grad
        if reference is None:
            reference = grad
        check_close(grad, reference, f"mesh {spec} vs 1 device")
        records.append(record(
            f"mesh_{axis}", population, wall_times(compiled, placed, repeats),
            compiled.memory_analysis(), threads, devices=count,
            mesh=f"{spec['population']}x{spec['data']}", compile_s=compile_s,
        ))
    return records


def check_close(a, b, what: str) -> None:
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7,
                                   err_msg=what)


HEADER = (f"{'benchmark':>22} {'P':>3} {'dev':>3} {'mesh':>5} {'median_s':>9} {'min_s':>8}"
          f" {'max_s':>8} {'stud*steps/s':>12} {'temp_MB':>8} {'compile':>7}")


def format_row(r: dict) -> str:
    return (f"{r['benchmark']:>22} {r['P']:>3} {r['devices']:>3} {r['mesh'] or '-':>5}"
            f" {r['median_s']:>9.4f} {r['min_s']:>8.4f} {r['max_s']:>8.4f}"
            f" {r['students_steps_per_s']:>12.1f} {r['peak_mb']:>8.2f} {r['compile_s']:>7.2f}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="P in {1, 4}, devices in {1, 2} (about 30 s).")
    parser.add_argument("--out", default="docs/population.json", help="JSON output path.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls per case (>= 5).")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.repeats < 5:
        raise SystemExit("--repeats must be >= 5")
    threads = os.cpu_count()
    populations = POPULATIONS[:2] if args.quick else POPULATIONS
    device_counts = DEVICE_COUNTS[:2] if args.quick else DEVICE_COUNTS
    print(f"jax {jax.__version__}, {jax.device_count()} fake {jax.devices()[0].platform} "
          f"devices on {threads} cores, {STUDENT}, T={NUM_STEPS}, repeats={args.repeats}")
    print(HEADER, flush=True)
    records = []
    host_start, own_start = host_cpu_seconds()
    start = time.perf_counter()
    cases = [lambda p=p: bench_population(p, args.repeats, threads, args.seed)
             for p in populations]
    cases.append(lambda: bench_scaling("population", SCALING_POPULATION, args.repeats,
                                       threads, args.seed, device_counts))
    cases.append(lambda: bench_scaling("data", DATA_POPULATION, args.repeats, threads,
                                       args.seed, device_counts))
    for case in cases:
        for r in case():
            records.append(r)
            print(format_row(r), flush=True)
    wall = time.perf_counter() - start
    host_end, own_end = host_cpu_seconds()
    other_load = ((host_end - host_start) - (own_end - own_start)) / wall
    # None (JSON null) where /proc/stat is unavailable.
    other_load = max(0.0, other_load) if math.isfinite(other_load) else None
    for r in records:
        r["other_load"] = other_load
    print(f"total {wall:.1f} s; other processes kept {other_load} cores busy; "
          f"process peak RSS {peak_rss_mb():.0f} MB")
    write_records(records, args.out)


if __name__ == "__main__":
    main()
