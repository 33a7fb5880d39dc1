"""All speed benchmarks, side by side with PyTorch: one command, a table, JSON.

Launch, from the repository root (PyTorch and friends: `pip install -r
benchmarks/requirements.txt`; without them only the JAX side runs):

    python -m benchmarks.run --quick    # 1 thread, reduced set: ~2 min
    python -m benchmarks.run            # 1 and 2 threads, everything: ~25 min on 2 idle cores

Each thread count runs in its own process (`--worker`), pinned with
`benchmarks.remat.pin_threads` before JAX starts its backend; PyTorch gets the same
number of threads. The parent merges the records into `--out` (default
`docs/benchmarks.json`), then prints the headline ratios and goals; `docs/benchmarks.md`
discusses them. What is timed: `benchmarks/meta_grad.py` (meta-gradients, forward unroll,
remat memory, compile time, population of 16) and `benchmarks/dln_iteration.py` (one
L2T-DLN iteration).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# (student, T) cases; torch variants run where listed (T = 100 is JAX-only: it is the
# reference point of the sqrt-memory goal).
FULL_CASES = [
    (student, steps) for student in ("mlp64-128-10", "mlp784-256-10")
    for steps in (10, 50, 100, 200, 1000)
]
QUICK_CASES = [("mlp64-128-10", 10), ("mlp64-128-10", 200), ("mlp784-256-10", 200)]
ALL_TORCH_AT = (10, 50, 200)  # higher and TorchOpt too; autograd and func at every T
POPULATION_T = 50


def torch_variants_for(steps: int, quick: bool) -> dict:
    try:
        from benchmarks import torch_meta
    except ImportError:
        return {}
    variants = torch_meta.available_variants()
    if quick or steps not in ALL_TORCH_AT:
        keep = ("torch-autograd", "torch-func") if steps != 100 else ()
        variants = {k: v for k, v in variants.items() if k in keep}
    return variants


def worker(args) -> None:
    from benchmarks.remat import pin_threads

    pin_threads(args.threads)
    try:
        from benchmarks import torch_meta

        torch_meta.configure(args.threads)
    except ImportError:
        print("torch not installed: JAX side only", flush=True)
    from benchmarks import dln_iteration, meta_grad

    quick = args.quick
    records = []

    def emit(new):
        for r in new:
            records.append(r)
            print(format_row(r), flush=True)
        with open(args.worker_out, "w") as f:  # after every case: an aborted run keeps them
            json.dump(records, f)

    for student, steps in QUICK_CASES if quick else FULL_CASES:
        repeats = 3 if quick or steps >= 1000 else 5
        emit(meta_grad.bench_case(
            student, steps, args.threads, repeats, torch_variants_for(steps, quick),
            compile_repeats=1 if quick else 2,
        ))
    for student in ("mlp64-128-10",) if quick else tuple(meta_grad.STUDENTS):
        emit(meta_grad.bench_population(student, POPULATION_T, args.threads, 3))
    emit(dln_iteration.bench(args.threads, repeats=3 if quick else 5))


def format_row(r: dict) -> str:
    extra = ""
    if "grad_rel_err" in r:
        extra += f" err={r['grad_rel_err']:.1e}"
    if r.get("xla_temp_mb") is not None:
        extra += f" xla_temp={r['xla_temp_mb']:.1f}MB"
    peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
    return (
        f"{r['benchmark']:>26} {r['framework']:>15} {r['student']:>14} {r['T']:>5}"
        f" {r['threads']:>2} {r['median_s']:>9.4f} [{r['min_s']:.4f}, {r['max_s']:.4f}]"
        f" rss+{peak}MB{extra}"
    )


def find(records, benchmark, framework="jax", student=None, steps=None, threads=None):
    for r in records:
        if (r["benchmark"] == benchmark and r["framework"] == framework
                and student in (None, r["student"]) and steps in (None, r["T"])
                and threads in (None, r["threads"])):
            return r
    return None


def summary(records: list[dict]) -> list[str]:
    """The headline ratios and the issue's goals, as markdown lines."""
    lines = ["| measure | student | threads | value | goal | met |", "|---|---|---:|---:|---|---|"]

    def add(measure, student, threads, value, goal, ok):
        met = "-" if value is None else ("yes" if ok else "**no**")
        text = "n/a" if value is None else f"{value:.2f}"
        lines.append(f"| {measure} | {student} | {threads} | {text} | {goal} | {met} |")

    for threads in sorted({r["threads"] for r in records}):
        for student, target in (("mlp784-256-10", 3.0), ("mlp64-128-10", 8.0)):
            jax_r = find(records, "meta_grad", "jax", student, 200, threads)
            torch_rs = [r for r in records if r["benchmark"] == "meta_grad"
                        and r["framework"] != "jax" and r["student"] == student
                        and r["T"] == 200 and r["threads"] == threads]
            if jax_r and torch_rs:
                best = min(torch_rs, key=lambda r: r["median_s"])
                ratio = best["median_s"] / jax_r["median_s"]
                add(f"meta-grad speed-up vs {best['framework']} (T=200)", student, threads,
                    ratio, f">= {target:g}", ratio >= target)
            fwd = find(records, "forward_unroll", "jax", student, 200, threads)
            if jax_r and fwd:
                ratio = jax_r["median_s"] / fwd["median_s"]
                add("meta / forward time (T=200)", student, threads, ratio, "<= 2.2",
                    ratio <= 2.2)
            lo = find(records, "meta_grad_remat_sqrt", "jax", student, 100, threads)
            hi = find(records, "meta_grad_remat_sqrt", "jax", student, 1000, threads)
            if lo and hi:
                ratio = hi["xla_temp_mb"] / lo["xla_temp_mb"]
                add("sqrt remat XLA temp, T=1000 / T=100", student, threads, ratio,
                    "<= 3.5", ratio <= 3.5)
            for policy in ("none", "sqrt"):
                lo = find(records, f"compile_remat_{policy}", "jax", student, 10, threads)
                hi = find(records, f"compile_remat_{policy}", "jax", student, 1000, threads)
                if lo and hi:
                    ratio = hi["median_s"] / lo["median_s"]
                    add(f"compile time ({policy}), T=1000 / T=10", student, threads, ratio,
                        "<= 1.3", ratio <= 1.3)
            vm = find(records, "population16_vmap", "jax", student, None, threads)
            seq = find(records, "population16_sequential", "jax", student, None, threads)
            if vm and seq:
                ratio = seq["median_s"] / vm["median_s"]
                add(f"population 16: vmap throughput / sequential (T={vm['T']})", student,
                    threads, ratio, ">= 6", ratio >= 6)
        ours = find(records, "dln_iteration", "jax", threads=threads)
        theirs = find(records, "dln_iteration", "torch", threads=threads)
        if ours and theirs:
            ratio = theirs["median_s"] / ours["median_s"]
            add("L2T-DLN iteration speed-up vs torch", "lenet5", threads, ratio, ">= 5",
                ratio >= 5)
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Reduced set, 1 thread.")
    parser.add_argument("--threads", default=None,
                        help="Comma-separated thread counts (default 1,2; quick: 1).")
    parser.add_argument("--out", default="docs/benchmarks.json", help="JSON output path.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.threads = int(args.threads)
        worker(args)
        return

    from benchmarks._records import write_records

    thread_counts = args.threads or ("1" if args.quick else "1,2")
    records = []
    start = time.perf_counter()
    for threads in thread_counts.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, "-m", "benchmarks.run", "--worker", "--threads", threads,
                   "--worker-out", tmp.name] + (["--quick"] if args.quick else [])
            print(f"== {' '.join(cmd[1:])}", flush=True)
            done = subprocess.run(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if done.returncode:
                print(f"worker for {threads} threads failed ({done.returncode}); "
                      "keeping the records it finished", flush=True)
            with open(tmp.name) as f:
                text = f.read()
            records.extend(json.loads(text) if text else [])
    print("\n".join(["", *summary(records), ""]))
    print(f"total {time.perf_counter() - start:.0f} s")
    write_records(records, args.out)


if __name__ == "__main__":
    main()
