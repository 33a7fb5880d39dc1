r"""What one distillation student step costs: l2t-kd against kd, ce, at-kd and l2t-at-kd;
ONE and l2t-one against the base network.

Launch, from the repository root:

    python -m benchmarks.distill_cost --quick   # smoke variants: ~1 min mnist1d, ~5 min mnist_5k
    python -m benchmarks.distill_cost           # the real settings (mnist_5k's l2t dominate)
    python -m benchmarks.distill_cost --settings=one-mnist1d,one-mnist_5k --out=docs/one_cost.json
    ... [--repeats=3] [--threads=N] [--settings=mnist1d,mnist_5k] [--methods=kd,l2t-kd]
        [--out=docs/distill_cost.json]

For each setting of `configs/distill.py` (``mnist1d``: 1-D CNN target, MLP student;
``mnist_5k``: WRN target and student, named in each record; ``--quick``: their ``smoke``
variants, T = 10 steps per outer step, batch 16) and each method, the plan is built as
the driver builds it (`l2t_jax.methods.get(config.method).build` on `l2t_jax.data.load_splits`),
and the student's phase (the plan's last) is initialised from the earlier phases'
freshly initialised states (the target model is not trained: cost does not depend on
its weights). Its `outer_step` is jitted with the state donated, as
`l2t_jax.train.run_phase` jits it, compiled, called once to warm up, then timed
`--repeats` times (``jax.block_until_ready``); the methods of a setting are timed in
interleaved rounds so that a busy host slows them alike.

* ``ce``: the student alone; ``kd``: Hinton KD, the frozen target model run inside each
  student step; ``l2t-kd``: the same loss with alpha and T set by a loss teacher, which
  each outer step also updates from the exact meta-gradient through its
  ``online_window`` student steps (`engine.TruncatedBackprop`; plus the dev objective
  and the dev-error feature); ``at-kd`` / ``l2t-at-kd`` (students with feature maps
  only, so ``mnist_5k``): KD plus attention transfer.
* ``one-mnist1d``, ``one-mnist_5k``: `configs/one.py`'s settings, rows as in
  `launch/results.py`: ``one-base`` (the base network, CE: the reference of the ratios),
  ``one`` (3 branches, ONE's loss), ``l2t-one`` (its KL weight set by a loss teacher,
  which also runs the student's forward pass outside its gradient: ``self_target``).
* ``ms/step``: wall time of one outer step over its student steps
  (``loop.steps_per_call``), median over repeats [min, max]; ``x kd``: that median over
  kd's (``ratio_to_kd``; ONE's: ``x one-base``, ``ratio_to_one_base``).
* ``compile_s``: ``jit(...).lower(...).compile()`` seconds of the outer step.
* ``GFLOP/step``: XLA's count (``compiled.cost_analysis()``) of one outer step, per
  student step; ``x kd``: over kd's. XLA counts a while loop's body once and a
  conditional at its costliest branch, so the count is corrected: the T - 1 uncounted
  trips of the step loop(s) are added (one student step, or with a learning teacher one
  step and its transpose, each compiled and counted on its own), and the dev-error
  feature's evaluation (a conditional) is counted every ``teacher.dev_every`` steps
  instead of every step. ``GFLOP/s``: that count over the median time; ``%GEMM``: that
  over a float32 GEMM's GFLOP/s timed in the same run on the same cores (the machine's
  own limit: about 140-170 GFLOP/s per core here).
* ``xla_tmp_MB``: XLA's temporary buffers for the compiled outer step. A method needing
  more than `MEMORY_FRACTION` of the host's available memory is compiled and counted but
  not run (its record says why).

Threads: left as the process finds them unless ``--threads=N`` pins it to N cores
(`benchmarks.remat.pin_threads`); records carry the visible cores (``threads``,
``visible_cores``), ``os.cpu_count()`` and the mean number of cores other processes kept
busy while the setting was timed (``other_processes_cores``). Writes `--out`, one record
per (setting, method) in the layout of `benchmarks._records.timing_record` (``median_s``
etc. per outer step of ``T`` student steps).
"""

from __future__ import annotations

import argparse
import os
import re
import time

# Importing jax does not start its backend: `remat.pin_threads` in `main` still applies.
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import remat
from benchmarks._records import timing_record, write_records
from benchmarks.meta_grad import interleaved_times
from configs import distill, one
from l2t_jax import data, engine, methods, train

# setting -> the methods timed in it (attention transfer needs feature maps: not the MLP);
# the one-* settings are configs/one.py's, their rows those of launch/results.py.
SETTINGS = {
    "mnist1d": ("ce", "kd", "l2t-kd"),
    "mnist_5k": ("ce", "kd", "l2t-kd", "at-kd", "l2t-at-kd"),
    "one-mnist1d": ("one-base", "one", "l2t-one"),
    "one-mnist_5k": ("one-base", "one", "l2t-one"),
}
REFERENCE = "kd"
ONE_PREFIX, ONE_REFERENCE = "one-", "one-base"
# ONE's rows: the base network is configs/one.py's student with one branch, under CE.
ONE_ROWS = {"one-base": ("ce", {"branches": 1}), "one": ("one", {}),
            "l2t-one": ("l2t-one", {})}
BENCHMARK = "distill_step_cost"
# A method whose compiled outer step needs more temporary memory than this fraction of
# the host's available memory is compiled and counted but not run.
MEMORY_FRACTION = 0.8
GEMM_SIZE, QUICK_GEMM_SIZE = 1024, 512


def _flops(compiled) -> float:
    """XLA's floating-point operation count of a compiled computation."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"])


def _jit_flops(fn, *args) -> float:
    return _flops(jax.jit(fn).lower(*args).compile())


def gemm_gflops(size: int, repeats: int = 10) -> float:
    """The best GFLOP/s of a jitted float32 (size x size) @ (size x size) on these cores."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, a))
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, a))
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def student_phase(config):
    """The student's phase of a config's plan, built as the driver builds it.

    Args:
        config: a `configs/distill.py` config with its ``method`` set.

    Returns:
        ``(phase, state, splits)``: the plan's last phase, its initial state from the
        earlier phases' initial states (initialised, not run), and the data.
    """
    train.validate_config(config)
    splits = data.load_splits(config.data)
    plan = methods.get(config.method).build(config, splits, jax.random.PRNGKey(config.seed))
    finished = {}
    for phase in plan.phases[:-1]:
        finished[phase.name] = phase.init(finished)
    phase = plan.phases[-1]
    return phase, phase.init(finished), splits


def network_name(model) -> str:
    """A student config's network, with its WRN depth and width (``wrn-10-2``)."""
    if model.name == "wrn":
        return f"wrn-{model.depth}-{model.widen_factor}"
    return model.name


def available_mb() -> float:
    """The host's available memory (MemAvailable), in MB; infinite off Linux."""
    return remat.proc_mb("/proc/meminfo", "MemAvailable:", float("inf"))


def _cotangent(x):
    if np.issubdtype(x.dtype, np.inexact):
        return x
    return np.zeros(x.shape, jax.dtypes.float0)


def step_loop_trips(compiled) -> list[int]:
    """The known trip counts of the compiled program's while loops."""
    return [int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}',
                                       compiled.as_text())]


def gflop_per_step(loop, compiled, state, batches, dev_every: int) -> float:
    """XLA's count of one outer step's GFLOP per student step (module docstring).

    Args:
        loop: the student phase's `Teaching` loop.
        compiled: its compiled outer step.
        state: the phase's state (not yet donated).
        batches: one outer step's inputs.
        dev_every: steps between evaluations of the dev-error feature.

    Returns:
        GFLOP per student step; NaN when the step loops are not the plain while loops of
        `loop.steps_per_call` trips this accounting assumes.
    """
    num_steps = loop.steps_per_call
    trips = step_loop_trips(compiled)
    loops = 1 if loop.teacher_update is None else 2  # forward (and transposed) unroll
    if sorted(trips)[-loops:] != [num_steps] * loops:
        print(f"  warning: while-loop trip counts {trips}, expected {loops} of {num_steps}: "
              "no FLOP count")
        return float("nan")
    # Everything the step reads is an argument, as in the outer step: XLA would fold a
    # step of constant batches and target weights.
    def step(loss_params, student, batches, target_variables):
        one = jax.tree_util.tree_map(lambda a: a[0], batches["train"])
        return loop.step_fn(batches, target_variables)(loss_params, student, one)[0]

    def step_and_transpose(loss_params, student, batches, target_variables):
        new, pullback = jax.vjp(lambda p, s: step(p, s, batches, target_variables),
                                loss_params, student)
        return pullback(jax.tree_util.tree_map(_cotangent, new))

    per_step = step if loop.teacher_update is None else step_and_transpose
    total = _flops(compiled) + (num_steps - 1) * _jit_flops(
        per_step, state.loss_params, state.student, batches, state.target_variables)
    if loop.stats_builder is not None:  # counted at every step, runs every dev_every
        def dev_forward(student, dev_x):
            return engine.apply_student(loop.model, student.params, student.model_state,
                                        dev_x, train=False)[0].argmax(-1)

        total -= num_steps * (1 - 1 / dev_every) * _jit_flops(
            dev_forward, state.student, batches["feature_dev"]["x"])
    return total / num_steps / 1e9


def _networks(config) -> dict:
    """The record fields naming a config's student (and target model)."""
    names = {"student": network_name(config.student)}
    if "target" in config:
        names["target"] = network_name(config.target.model)
    return names


def bench_setting(setting: str, configs: dict, config_file: str, quick: bool, repeats: int,
                  threads: int, gemm_size: int, reference: str = REFERENCE) -> list[dict]:
    """Compiles, counts and times each method's student step in one setting.

    Args:
        setting: the setting's name (``configs/x.py:<setting>``).
        configs: the configs to time by row name (``config.method`` set), the
            reference among them.
        config_file: their config file, for the records.
        quick: whether they are the setting's ``smoke`` variant.
        repeats: timed outer steps per method.
        threads: the visible cores (recorded).
        gemm_size: the side of the reference GEMM.
        reference: the row the ratios divide by (``ratio_to_<reference>``,
            ``gflop_ratio_to_<reference>``, with '_' for '-').

    Returns:
        One record per row (module docstring); a row too big to run has one with
        ``skipped`` (why) instead of times.
    """
    arg = f"{setting},smoke" if quick else setting
    ratio = reference.replace("-", "_")
    entries, skipped = {}, []
    for name, config in configs.items():
        phase, state, splits = student_phase(config)
        loop = phase.loop
        batches = loop.batches(splits, config.seed, 0)
        start = time.perf_counter()
        compiled = jax.jit(loop.outer_step, donate_argnums=0).lower(state, batches).compile()
        compile_s = time.perf_counter() - start
        gflop = gflop_per_step(loop, compiled, state, batches, config.teacher.dev_every)
        memory = compiled.memory_analysis()
        temp_mb = memory.temp_size_in_bytes / 2**20 if memory is not None else float("nan")
        available = available_mb()
        if temp_mb > MEMORY_FRACTION * available:
            # Running it could take the host's memory from every other process.
            reason = (f"XLA temp {temp_mb:.0f} MB > {MEMORY_FRACTION:.0%} of the "
                      f"{available:.0f} MB available")
            print(f"  {setting} {name}: not timed: {reason}", flush=True)
            skipped.append(dict(benchmark=BENCHMARK, framework="jax", **_networks(config),
                                T=loop.steps_per_call,
                                threads=threads, setting=setting, method=name,
                                config=f"{config_file}:{arg}", skipped=reason,
                                compile_s=compile_s, gflop_per_step=gflop,
                                xla_temp_mb=temp_mb))
            continue
        holder = {"state": state}

        def call(compiled=compiled, holder=holder, batches=batches):
            holder["state"], metrics = compiled(holder["state"], batches)
            jax.block_until_ready((holder["state"], metrics))

        call()  # warm-up
        entries[name] = dict(config=config, loop=loop, call=call, compile_s=compile_s,
                             gflop=gflop, temp_mb=temp_mb)
    gemm = gemm_gflops(gemm_size)
    others_before = remat.host_cpu_seconds()
    start = time.perf_counter()
    times = interleaved_times({name: e["call"] for name, e in entries.items()}, repeats)
    wall = time.perf_counter() - start
    others_after = remat.host_cpu_seconds()
    other_cores = ((others_after[0] - others_before[0])
                   - (others_after[1] - others_before[1])) / wall
    reference_ms = reference_gflop = float("nan")
    if reference in entries:
        steps = entries[reference]["loop"].steps_per_call
        reference_ms = 1e3 * np.median(times[reference]) / steps
        reference_gflop = entries[reference]["gflop"]
    records = []
    for name, e in entries.items():
        config, num_steps = e["config"], e["loop"].steps_per_call
        ms = [1e3 * t / num_steps for t in times[name]]
        median_ms = float(np.median(ms))
        achieved = e["gflop"] / (median_ms / 1e3)
        networks = _networks(config)
        records.append(timing_record(
            BENCHMARK, "jax", networks.pop("student"), num_steps, threads, times[name],
            remat.peak_rss_mb(), setting=setting, config=f"{config_file}:{arg}",
            method=name, **networks, batch_size=config.train.batch_size,
            ms_per_step_median=median_ms, ms_per_step_min=float(np.min(ms)),
            ms_per_step_max=float(np.max(ms)),
            **{f"ratio_to_{ratio}": median_ms / reference_ms,
               f"gflop_ratio_to_{ratio}": e["gflop"] / reference_gflop},
            compile_s=e["compile_s"], gflop_per_step=e["gflop"],
            gflops_achieved=achieved,
            gemm_gflops=gemm, gemm_size=gemm_size, fraction_of_gemm=achieved / gemm,
            xla_temp_mb=e["temp_mb"], visible_cores=threads, cpu_count=os.cpu_count(),
            other_processes_cores=other_cores, quick=quick))
    return records + skipped


def header(reference: str = REFERENCE) -> str:
    """The table's header, its ratios over `reference`."""
    ratio = f"x {reference}"
    return (f"{'setting':>8} {'method':>9} {'T':>3} {'ms/step':>8} {'[min, max]':>17} "
            f"{ratio:>5} {'compile_s':>9} {'GFLOP/step':>10} {ratio:>5} {'GFLOP/s':>8} "
            f"{'%GEMM':>6} {'xla_tmp_MB':>10}")


def format_row(r: dict, reference: str = REFERENCE) -> str:
    """One table row of a record (a method that was not timed says why)."""
    if "skipped" in r:
        return f"{r['setting']:>8} {r['method']:>9} {r['T']:>3} not timed: {r['skipped']}"
    span = f"[{r['ms_per_step_min']:.2f}, {r['ms_per_step_max']:.2f}]"
    ratio = reference.replace("-", "_")
    return (f"{r['setting']:>8} {r['method']:>9} {r['T']:>3} {r['ms_per_step_median']:>8.2f} "
            f"{span:>17} {r[f'ratio_to_{ratio}']:>5.2f} {r['compile_s']:>9.1f} "
            f"{r['gflop_per_step']:>10.4f} {r[f'gflop_ratio_to_{ratio}']:>5.2f} "
            f"{r['gflops_achieved']:>8.2f} "
            f"{100 * r['fraction_of_gemm']:>5.1f}% {r['xla_temp_mb']:>10.1f}")


def print_records(records: list[dict], reference: str = REFERENCE) -> None:
    """Prints one setting's GEMM line and table."""
    timed = [r for r in records if "skipped" not in r]
    if timed:
        print(f"{records[0]['setting']}: float32 GEMM {timed[0]['gemm_size']}^3 "
              f"{timed[0]['gemm_gflops']:.1f} GFLOP/s; other processes kept "
              f"{timed[0]['other_processes_cores']:.2f} cores busy")
    print(header(reference))
    for r in records:
        print(format_row(r, reference), flush=True)


def setting_configs(setting: str, names, quick: bool) -> tuple[dict, str, str]:
    """The configs of one setting's rows, their config file and the reference row."""
    one_setting = setting.startswith(ONE_PREFIX)
    arg = setting.removeprefix(ONE_PREFIX) + (",smoke" if quick else "")
    configs = {}
    for name in names:
        if one_setting:
            method, student = ONE_ROWS[name]
            config = one.get_config(arg)
            config.student.update(student)
        else:
            method, config = name, distill.get_config(arg)
        config.method = method
        configs[name] = config
    if one_setting:
        return configs, "configs/one.py", ONE_REFERENCE
    return configs, "configs/distill.py", REFERENCE


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--quick", action="store_true",
                        help="The settings' smoke variants (T = 10, batch 16).")
    parser.add_argument("--repeats", type=int, default=None,
                        help="Timed outer steps per method (default 3).")
    parser.add_argument("--threads", type=int, default=None,
                        help="Pin to this many cores (default: leave as is).")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"Comma-separated subset of {', '.join(SETTINGS)}.")
    parser.add_argument("--methods", default=None,
                        help="Comma-separated methods (default: each setting's own).")
    parser.add_argument("--out", default="docs/distill_cost.json", help="JSON output path.")
    args = parser.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown --settings {unknown}; choose from {list(SETTINGS)}")
    if args.threads is not None:
        remat.pin_threads(args.threads)
    threads = len(os.sched_getaffinity(0))
    repeats = args.repeats or 3
    gemm_size = QUICK_GEMM_SIZE if args.quick else GEMM_SIZE
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, visible cores={threads}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, repeats={repeats}")
    records = []
    start = time.perf_counter()
    for setting in settings:
        names = SETTINGS[setting]
        if args.methods:
            names = tuple(m for m in args.methods.split(",") if m in names)
        configs, config_file, reference = setting_configs(setting, names, args.quick)
        new = bench_setting(setting.removeprefix(ONE_PREFIX), configs, config_file,
                            args.quick, repeats, threads, gemm_size, reference)
        print_records(new, reference)
        records.extend(new)
    print(f"total {time.perf_counter() - start:.1f} s; process peak RSS "
          f"{remat.peak_rss_mb():.0f} MB")
    write_records(records, args.out)


if __name__ == "__main__":
    main()
