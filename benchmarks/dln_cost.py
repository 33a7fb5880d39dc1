r"""What one L2T-DLN iteration costs on this machine, per student, before renting a GPU.

  python -m benchmarks.dln_cost [--repeats=3] [--threads=2] [--remat=none,sqrt] \
      [--students=resnet_wide8,...]

One iteration is `l2t_jax.methods.dln.DLNTeaching.outer_step` jitted: stage A (K = 15
differentiable SGD steps and the DLN hypergradient), stage B (the LSTM's proposal, the
same K steps again and the teacher's second-order gradient) and stage C, at the authors'
batch sizes (train 25, validation 100), built from `configs/l2t_dln.py` exactly as a run
builds it. Inputs are random arrays of the dataset's shape (cost does not depend on the
values). Reports the median wall time over repeats (min-max), the compile time, XLA's
temporary memory for the compiled iteration and the process's peak RSS, and writes
docs/dln_cost.json. The authors' CIFAR run is 10 x 250 = 2,500 iterations.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import remat
from benchmarks._records import timing_record, write_records

# name -> (config variant, input shape, classes)
STUDENTS = {
    "resnet_wide8": ("fake_cifar10", (32, 32, 3), 10),
    "lenet5_bn": ("mnist_5k", (28, 28, 1), 10),
    "mlp_digits": ("digits", (64,), 10),
}


def _splits(input_shape, num_classes, n=400):
    from l2t_jax import data

    rng = np.random.default_rng(0)

    def split():
        y = rng.integers(0, num_classes, n).astype(np.int32)
        return data.ArraySplit(rng.normal(size=(n, *input_shape)).astype(np.float32), y, y)

    return data.Splits("random", num_classes, input_shape, split(), split(), split())


def bench(name: str, remat_policy: str, repeats: int, threads: int) -> dict:
    """Compiles and times one iteration for student `name`; returns its record."""
    import jax

    from configs import l2t_dln
    from l2t_jax.methods import dln

    variant, input_shape, num_classes = STUDENTS[name]
    config = l2t_dln.get_config(variant + ",released")
    config.engine.remat = remat_policy
    splits = _splits(input_shape, num_classes)
    method = dln.build_dln_teaching(config, splits)
    phi = dln.initial_dln(config, jax.random.PRNGKey(0))
    state = method.init(jax.random.PRNGKey(1), splits, phi)
    batches = method.batches(splits, seed=0, start_step=0)
    compiled, compile_s = remat.compile_timed(method.outer_step, (state, batches))
    memory = compiled.memory_analysis()
    temp_mb = memory.temp_size_in_bytes / 2**20 if memory is not None else float("nan")
    others_before = remat.host_cpu_seconds()
    start = time.perf_counter()
    times = remat.wall_times(compiled, (state, batches), repeats)
    wall = time.perf_counter() - start
    others_after = remat.host_cpu_seconds()
    other_cores = ((others_after[0] - others_before[0]) - (others_after[1] - others_before[1])
                   ) / wall
    params = sum(x.size for x in jax.tree_util.tree_leaves(state["student"].params))
    return timing_record(
        f"dln_iteration_cost_remat-{remat_policy}", "jax", name, method.steps_per_call, threads,
        times, remat.peak_rss_mb(), xla_temp_mb=temp_mb, compile_s=compile_s,
        student_params=int(params), train_batch=config.train.batch_size,
        val_batch=config.dln.val_batch_size, other_processes_cores=other_cores,
        hours_for_2500_iterations=float(np.median(times)) * 2500 / 3600)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--students", default=",".join(STUDENTS))
    parser.add_argument("--remat", default="none,sqrt", help="engine remat policies")
    parser.add_argument("--out", default="docs/dln_cost.json")
    args = parser.parse_args(argv)
    remat.pin_threads(args.threads)
    records = []
    print(f"{'student':>13} {'remat':>5} {'params':>9} {'median_s':>9} {'min_s':>8} {'max_s':>8} "
          f"{'compile_s':>9} {'xla_tmp_MB':>10} {'rss_MB':>7} {'h/2500 it':>9} {'others':>6}")
    for name, policy in ((n, p) for n in args.students.split(",")
                         for p in args.remat.split(",")):
        r = bench(name, policy, args.repeats, args.threads)
        records.append(r)
        print(f"{name:>13} {policy:>5} {r['student_params']:>9,} {r['median_s']:>9.3f} "
              f"{r['min_s']:>8.3f} {r['max_s']:>8.3f} {r['compile_s']:>9.1f} "
              f"{r['xla_temp_mb']:>10.1f} {r['peak_mb']:>7.0f} "
              f"{r['hours_for_2500_iterations']:>9.2f} {r['other_processes_cores']:>6.2f}")
    write_records(records, args.out)


if __name__ == "__main__":
    main()
