"""A GPU check, ready to run: the headline benchmarks on one CUDA GPU, beside PyTorch.

Launch, from the repository root, on a machine with one CUDA GPU and jax (with CUDA),
torch, flax, optax, orbax, chex and absl installed. Nothing is downloaded or installed:
every input is synthetic, of the benchmarks' real shapes.

    benchmarks/gpu_check.sh                      # writes gpu_check.json; sized for < 5 min
    python -m benchmarks.gpu_check --out=x.json  # the same without the wrapper's settings
    python -m benchmarks.gpu_check --dry         # the same plan on CPU, tiny shapes, 1 repeat

Without ``--dry`` it refuses (exit code 2) when JAX sees no GPU. What it runs, in order,
each case through the code of the CPU benchmarks (`docs/benchmarks.md`):

* ``gemm``: one float32 8192 x 8192 x 8192 matmul, JAX and PyTorch: the device's attained
  GEMM rate. The faster of the two is the ``peak_gflops`` that every record's
  ``frac_of_peak`` divides by.
* ``meta_grad`` and ``forward_unroll`` (`benchmarks.meta_grad.bench_case`, remat "none"),
  MLP 784-256-10 and 64-128-10 at T = 200: JAX against every PyTorch variant installed
  (`benchmarks.torch_meta`; higher and TorchOpt only if installed), gradients checked
  equal (relative error <= 1e-3) before anything is timed.
* ``population16_vmap`` and ``population16_sequential``
  (`benchmarks.meta_grad.bench_population`): 16 students of 64-128-10, T = 50, as one
  vmapped program and as 16 sequential calls.
* ``dln_iteration`` (`benchmarks.dln_iteration.bench`): one L2T-DLN iteration on the
  released LeNet-BN (K = 15, batch 25, validation batch 100), JAX against PyTorch.

Both frameworks multiply and convolve float32 in full precision (JAX:
``default_matmul_precision("highest")``; PyTorch: TF32 off), as the meta-gradients are
compared to 1e-3; PyTorch autotunes its convolutions (``cudnn.benchmark``), as XLA does.
Times are medians of `repeats` calls (5; 1 with ``--dry``) after a warm-up call, each call
waited for: JAX with ``block_until_ready``, PyTorch with ``torch.cuda.synchronize`` or by
copying its result to the host.

``--out`` (default ``gpu_check.json``, rewritten after every case) holds a list of records
in the project layout (`benchmarks._records.timing_record`: ``benchmark``, ``framework``,
``student``, ``T``, ``median_s`` in seconds, ...) plus:

* ``backend``: ``jax`` or ``torch``; ``device``: JAX's ``device_kind`` or
  ``torch.cuda.get_device_name``;
* ``gflop``: XLA's count of the program's floating-point operations (counted on the host
  CPU, `benchmarks.meta_grad.xla_gflop`; the PyTorch record of the same math gets the
  same count; the GEMM's is 2 n^3), with ``gflop_source``; ``gflops`` = gflop / median_s;
  ``frac_of_peak`` = gflops / ``peak_gflops``;
* ``ratio_vs_torch``: the best PyTorch variant's median over this record's (above 1:
  faster than PyTorch); None where PyTorch has no such case;
* the JAX ``meta_grad`` records: ``meta_over_forward``; the vmapped population:
  ``ratio_vs_sequential``, the throughput ratio whose goal on a GPU is >= 10.

A PyTorch side that cannot run is one record with ``skipped`` saying why; a case that
failed is one record with ``error``, and the script exits 1 after running the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from benchmarks import dln_iteration, meta_grad
from benchmarks._records import timing_record, write_records
from benchmarks.remat import compile_timed
from benchmarks.run import find

STUDENTS = ("mlp784-256-10", "mlp64-128-10")
POPULATION_STUDENT = "mlp64-128-10"
POPULATION_GOAL = 10.0
PRECISION = "highest"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of one run (see the module docstring).

    Attributes:
        gemm_size: n of the n x n x n float32 matmul.
        meta_steps: T of the meta-gradient cases.
        population_steps: T of the population case.
        dln_steps: K of the L2T-DLN iteration.
        dln_batch: its training batch size.
        dln_val_batch: its validation batch size.
        repeats: timed calls per case, after the warm-up.
    """

    gemm_size: int
    meta_steps: int
    population_steps: int
    dln_steps: int
    dln_batch: int
    dln_val_batch: int
    repeats: int


GPU_PLAN = Plan(gemm_size=8192, meta_steps=200, population_steps=50,
                dln_steps=dln_iteration.K, dln_batch=dln_iteration.BATCH,
                dln_val_batch=dln_iteration.VAL_BATCH, repeats=5)
DRY_PLAN = Plan(gemm_size=64, meta_steps=2, population_steps=2, dln_steps=2, dln_batch=2,
                dln_val_batch=4, repeats=1)


def visible_gpu() -> jax.Device | None:
    """JAX's first GPU, or None when it sees none."""
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:  # no GPU platform (or JAX_PLATFORMS leaves it out)
        return None


def setup_torch(dry: bool) -> tuple[str | None, str]:
    """Where the PyTorch side runs, set up for its best float32 speed.

    Args:
        dry: run on the CPU (``--dry``).

    Returns:
        ``(device, "")``: ``"cuda"``, or ``"cpu"`` (one thread) when `dry`;
        ``(None, why)`` when PyTorch cannot run.
    """
    if importlib.util.find_spec("torch") is None:
        return None, "torch not installed"
    if dry:
        from benchmarks import torch_meta

        # One thread: dry times mean nothing, and PyTorch's spinning pool would slow
        # JAX's compiles beside it.
        torch_meta.configure(1)
        return "cpu", ""
    import torch

    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    return "cuda", ""


def torch_device_name(device: str | None) -> str | None:
    """``torch.cuda.get_device_name`` for ``"cuda"``, ``"cpu"`` for the CPU, else None."""
    if device != "cuda":
        return device
    import torch

    return torch.cuda.get_device_name(0)


def bench_gemm(size: int, threads: int, repeats: int, torch_device: str | None) -> list[dict]:
    """``gemm`` records: a float32 (size, size) @ (size, size) matmul, JAX and PyTorch."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (size, size), jnp.float32)
    b = jax.random.normal(key_b, (size, size), jnp.float32)
    matmul, _ = compile_timed(jnp.matmul, (a, b))
    calls = {"jax": lambda: jax.block_until_ready(matmul(a, b))}
    if torch_device is not None:
        import numpy as np
        import torch

        ta, tb = (torch.from_numpy(np.array(m)).to(torch_device) for m in (a, b))

        def torch_matmul():
            torch.matmul(ta, tb)
            if torch_device == "cuda":
                torch.cuda.synchronize()

        calls["torch"] = torch_matmul
    for call in calls.values():
        call()  # warm-up
    times = meta_grad.interleaved_times(calls, repeats)
    return [
        timing_record("gemm", name, f"{size}x{size}x{size}", None, threads, times[name], None,
                      gflop=2 * size**3 / 1e9, gflop_source="counted: 2 n^3")
        for name in calls
    ]


def bench_meta_grad(student: str, num_steps: int, threads: int, repeats: int,
                    torch_device: str | None) -> list[dict]:
    """``meta_grad`` (JAX and each PyTorch variant) and ``forward_unroll`` records."""
    variants = {}
    if torch_device is not None:
        from benchmarks import torch_meta

        variants = {name: functools.partial(make, device=torch_device)
                    for name, make in torch_meta.available_variants().items()}
    records = [r for r in meta_grad.bench_case(student, num_steps, threads, repeats, variants,
                                               remat_policies=("none",))
               if r["benchmark"] in ("meta_grad", "forward_unroll")]
    gflop = meta_grad.unroll_gflop(student, num_steps)
    for r in records:
        r.update(gflop=gflop[r["benchmark"]], gflop_source="xla")
    return records


def bench_population(num_steps: int, threads: int, repeats: int) -> list[dict]:
    """``population16_vmap`` and ``population16_sequential`` records."""
    records = meta_grad.bench_population(POPULATION_STUDENT, num_steps, threads, repeats)
    one = meta_grad.unroll_gflop(POPULATION_STUDENT, num_steps)["meta_grad"]
    for r in records:
        r.update(gflop=meta_grad.POPULATION * one,
                 gflop_source=f"xla: {meta_grad.POPULATION} x one student")
    return records


def bench_dln(plan: Plan, threads: int, torch_device: str | None) -> list[dict]:
    """``dln_iteration`` records, JAX and PyTorch."""
    records = dln_iteration.bench(threads, plan.repeats, plan.dln_steps, plan.dln_batch,
                                  plan.dln_val_batch, torch_device)
    for r in records:
        r["gflop_source"] = "xla"
    return records


def note(benchmark: str, framework: str, student: str, num_steps: int | None, threads: int,
         **why) -> dict:
    """A record of a case that did not run (``skipped=...`` or ``error=...``)."""
    return {"benchmark": benchmark, "framework": framework, "student": student,
            "T": num_steps, "threads": threads, **why}


def annotate(records: list[dict], devices: dict) -> None:
    """Adds backend, device, gflops, frac_of_peak and the ratios to timed records.

    Idempotent: every call recomputes them from all `records` (in place).
    """
    timed = [r for r in records if "median_s" in r]
    for r in timed:
        r["backend"] = "jax" if r["framework"] == "jax" else "torch"
        r["device"] = devices[r["backend"]]
        r["gflops"] = r["gflop"] / r["median_s"] if r.get("gflop") else None
    peak = max((r["gflops"] for r in timed if r["benchmark"] == "gemm"), default=None)
    for r in timed:
        r["peak_gflops"] = peak
        r["frac_of_peak"] = r["gflops"] / peak if r["gflops"] and peak else None
        torch_times = [o["median_s"] for o in timed if o["backend"] == "torch"
                       and (o["benchmark"], o["student"], o["T"])
                       == (r["benchmark"], r["student"], r["T"])]
        r["ratio_vs_torch"] = min(torch_times) / r["median_s"] if torch_times else None
    for student in STUDENTS:
        meta = find(timed, "meta_grad", "jax", student)
        forward = find(timed, "forward_unroll", "jax", student)
        if meta and forward:
            meta["meta_over_forward"] = meta["median_s"] / forward["median_s"]
    vmap = find(timed, f"population{meta_grad.POPULATION}_vmap")
    sequential = find(timed, f"population{meta_grad.POPULATION}_sequential")
    if vmap and sequential:
        vmap["ratio_vs_sequential"] = sequential["median_s"] / vmap["median_s"]


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _times(ratio) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def format_row(r: dict) -> str:
    """One record as a table row (`HEADER`)."""
    head = f"{r['benchmark']:>24} {r['framework']:>15} {r['student']:>15} {_number(r['T'], 'd'):>4}"
    if "median_s" not in r:
        return f"{head}  {'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error']}"
    return (f"{head} {r['median_s']:>9.5f} {_number(r.get('gflop'), '.3f'):>9}"
            f" {_number(r['gflops'], '.1f'):>9} {_number(r['frac_of_peak'], '.3f'):>6}"
            f" {_number(r['ratio_vs_torch'], '.2f'):>8}")


HEADER = (f"{'benchmark':>24} {'framework':>15} {'student':>15} {'T':>4} {'median_s':>9}"
          f" {'GFLOP':>9} {'GFLOP/s':>9} {'peak':>6} {'vs torch':>8}")


def summary(records: list[dict]) -> list[str]:
    """The headline measures, one line each."""
    lines = []
    for r in records:
        if r["benchmark"] == "gemm" and "median_s" in r:
            lines.append(f"float32 GEMM {r['student']}, {r['framework']} on {r['device']}: "
                         f"{r['gflops']:.0f} GFLOP/s")
    for student in STUDENTS:
        meta = find(records, "meta_grad", "jax", student)
        if meta and "median_s" in meta:
            lines.append(f"meta-gradient {student} (T={meta['T']}): "
                         f"speed-up over the best PyTorch variant {_times(meta['ratio_vs_torch'])},"
                         f" meta / forward {_number(meta.get('meta_over_forward'), '.2f')}")
    vmap = find(records, f"population{meta_grad.POPULATION}_vmap")
    if vmap and "ratio_vs_sequential" in vmap:
        ratio = vmap["ratio_vs_sequential"]
        lines.append(f"population of {meta_grad.POPULATION} (T={vmap['T']}): vmap throughput "
                     f"{ratio:.2f}x sequential (goal >= {POPULATION_GOAL:g}: "
                     f"{'met' if ratio >= POPULATION_GOAL else 'missed'})")
    dln = find(records, "dln_iteration", "jax")
    if dln and "median_s" in dln:
        lines.append(f"L2T-DLN iteration (K={dln['T']}): "
                     f"speed-up over PyTorch {_times(dln['ratio_vs_torch'])}")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true",
                        help="The same plan on CPU, tiny shapes, one repeat (no GPU needed).")
    parser.add_argument("--out", default="gpu_check.json", help="JSON output path.")
    parser.add_argument("--skip", default="",
                        help="Comma-separated benchmarks not to run (e.g. dln_iteration).")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Runs the check (see the module docstring); returns the process's exit code."""
    args = parse_args(argv)
    device = meta_grad.host_cpu() if args.dry else visible_gpu()
    if device is None:
        print(f"gpu_check: JAX {jax.__version__} sees no GPU (is it installed with CUDA?); "
              "--dry runs the plan on CPU", file=sys.stderr)
        return 2
    plan = DRY_PLAN if args.dry else GPU_PLAN
    torch_device, torch_missing = setup_torch(args.dry)
    devices = {"jax": device.device_kind, "torch": torch_device_name(torch_device)}
    threads = len(os.sched_getaffinity(0))
    print(f"jax {jax.__version__} on {devices['jax']}, torch on {devices['torch']}"
          f"{' (' + torch_missing + ')' if torch_missing else ''}; {plan}", flush=True)
    population = f"population{meta_grad.POPULATION}"
    # (benchmark, student, T, run, PyTorch cases skipped when torch cannot run)
    cases = [("gemm", f"{plan.gemm_size}x{plan.gemm_size}x{plan.gemm_size}", None,
              lambda: bench_gemm(plan.gemm_size, threads, plan.repeats, torch_device),
              ["gemm"])]
    cases += [("meta_grad", student, plan.meta_steps,
               lambda s=student: bench_meta_grad(s, plan.meta_steps, threads, plan.repeats,
                                                 torch_device), ["meta_grad"])
              for student in STUDENTS]
    cases.append((population, POPULATION_STUDENT, plan.population_steps,
                  lambda: bench_population(plan.population_steps, threads, plan.repeats), []))
    cases.append(("dln_iteration", dln_iteration.STUDENT, plan.dln_steps,
                  lambda: bench_dln(plan, threads, torch_device), ["dln_iteration"]))

    skipped = set(filter(None, args.skip.split(",")))
    cases = [case for case in cases if case[0] not in skipped]
    records = []
    start = time.perf_counter()
    with jax.default_device(device), jax.default_matmul_precision(PRECISION):
        for benchmark, student, num_steps, run, torch_cases in cases:
            case_start = time.perf_counter()
            try:
                new = run()
            except Exception as e:  # keep the other cases' results
                traceback.print_exc()
                new = [note(benchmark, "-", student, num_steps, threads,
                            error=f"{type(e).__name__}: {e}")]
            if torch_device is None:
                new += [note(name, "torch", student, num_steps, threads, skipped=torch_missing)
                        for name in torch_cases]
            records += new
            annotate(records, devices)
            print(f"{benchmark} {student}: {time.perf_counter() - case_start:.1f} s", flush=True)
            write_records(records, args.out)
    print("\n".join(["", HEADER, *map(format_row, records), "", *summary(records), ""]))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
