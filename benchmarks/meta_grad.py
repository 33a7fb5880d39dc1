"""Exact meta-gradients through T SGD steps: l2t_jax against PyTorch, and our own costs.

The meta-gradient is d(dev cross-entropy of the trained student) / d(W, b), where (W, b)
are the parameters of the L2T-DLF bilinear sigmoid loss the student trains on
(`l2t_jax.losses.bilinear`, W = I + 0.1 noise, b = 0.1 noise: 110 meta-parameters). The
student is an MLP (64-128-10 or 784-256-10, ReLU) taking T plain-SGD steps (lr 0.1) on
batches of 128 random Gaussian inputs with uniform labels; the dev set is 512 such
examples. The JAX side is the library's own path: `engine.make_student_step` +
`engine.FullBackprop`; the PyTorch side (`benchmarks/torch_meta.py`) is the same math.
Both start from the same initial student and the same data.

`bench_case(student, T)` records, per case:

* ``meta_grad``: wall time of one meta-gradient, every framework (JAX: remat "none");
  all gradients are checked against JAX's (relative L2 error <= 1e-3, recorded as
  ``grad_rel_err``) before anything is timed. Timed calls of all frameworks are
  interleaved so a busy host slows them alike.
* ``forward_unroll``: the JAX unroll plus dev loss, without gradient.
* ``meta_grad_remat_{none,step,sqrt}``: time and memory of each remat policy;
  ``xla_temp_mb`` is XLA's temp buffer plan for the compiled call.
* ``compile_remat_{none,step,sqrt}``: `jit(...).lower(...).compile()` seconds.

Every record's ``peak_mb`` is the growth of the process's peak resident set during one
call (the kernel's VmHWM, reset through /proc/self/clear_refs before the call); memory the
allocator kept from earlier calls is reused without showing here, so it is a lower bound.

``unroll_gflop(student, T)`` is XLA's count of the floating-point operations of the
``meta_grad`` and ``forward_unroll`` programs (`completed_loop_gflop` explains how a
loop's trips are counted).

`bench_population(student, T)` times 16 students (each its own initial weights and
teacher parameters, one shared data stream) as one `jax.vmap`-ed meta-gradient against
16 sequential calls of the single-student one.

Entry point: `python -m benchmarks.run` (see `benchmarks/run.py`).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from benchmarks._records import timing_record
from benchmarks.remat import compile_timed, make_forward, make_meta_grad
from l2t_jax import engine
from l2t_jax.losses import logits_loss
from l2t_jax.losses.bilinear import bilinear_sigmoid_loss
from l2t_jax.optimizers import make_inner_optimizer
from l2t_jax.students import build_student

NUM_CLASSES = 10
BATCH_SIZE = 128
DEV_SIZE = 512
LEARNING_RATE = 0.1
# name -> (input dimension, hidden width)
STUDENTS = {"mlp64-128-10": (64, 128), "mlp784-256-10": (784, 256)}
POPULATION = 16
GRAD_RTOL = 1e-3
MB = 2.0**20


def bilinear_loss(meta_params, logits, labels):
    """The teacher-controlled loss: `bilinear_sigmoid_loss` with ``meta_params = {W, b}``."""
    return bilinear_sigmoid_loss(meta_params["W"], meta_params["b"], logits, labels)


def make_problem(student_name: str, num_steps: int, seed: int = 0):
    """Builds one meta-gradient problem for both frameworks.

    Args:
        student_name: a key of `STUDENTS`.
        num_steps: T.
        seed: seeds the data, the student's initialisation and (W, b).

    Returns:
        ``(jax_problem, numpy_problem)``. ``jax_problem = (step_fn, objective, args)``
        with ``args = (meta_params, state, batches)``; ``numpy_problem`` holds ``xs``
        (T, B, D), ``ys`` (T, B), ``dev_x``, ``dev_y``, ``W``, ``b``, ``params`` (the
        initial [K1, b1, K2, b2]) and ``lr``: what the PyTorch side needs.
    """
    in_dim, hidden = STUDENTS[student_name]
    model = build_student(
        ml_collections.ConfigDict({"name": "mlp", "hidden": (hidden,), "activation": "relu"}),
        NUM_CLASSES,
    )
    tx = make_inner_optimizer(
        ml_collections.ConfigDict({"name": "sgd", "learning_rate": LEARNING_RATE}), num_steps
    )
    step_fn = engine.make_student_step(model, logits_loss(bilinear_loss), tx)
    rng = np.random.default_rng(seed)
    npp = {
        "xs": rng.normal(size=(num_steps, BATCH_SIZE, in_dim)).astype(np.float32),
        "ys": rng.integers(0, NUM_CLASSES, (num_steps, BATCH_SIZE)).astype(np.int32),
        "dev_x": rng.normal(size=(DEV_SIZE, in_dim)).astype(np.float32),
        "dev_y": rng.integers(0, NUM_CLASSES, DEV_SIZE).astype(np.int32),
        "W": (np.eye(NUM_CLASSES) + 0.1 * rng.normal(size=(NUM_CLASSES,) * 2)).astype(
            np.float32
        ),
        "b": (0.1 * rng.normal(size=NUM_CLASSES)).astype(np.float32),
        "lr": LEARNING_RATE,
    }
    dev_x, dev_y = jnp.asarray(npp["dev_x"]), jnp.asarray(npp["dev_y"])
    state = engine.init_student_state(model, tx, jax.random.PRNGKey(seed), dev_x[:1])
    p = state.params
    npp["params"] = [
        np.asarray(p["Dense_0"]["kernel"]), np.asarray(p["Dense_0"]["bias"]),
        np.asarray(p["Dense_1"]["kernel"]), np.asarray(p["Dense_1"]["bias"]),
    ]

    def objective(mp, final):
        del mp
        logits, _ = engine.apply_student(
            model, final.params, final.model_state, dev_x, train=False
        )
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, dev_y)), None

    meta_params = {"W": jnp.asarray(npp["W"]), "b": jnp.asarray(npp["b"])}
    batches = {"x": jnp.asarray(npp["xs"]), "y": jnp.asarray(npp["ys"])}
    return (step_fn, objective, (meta_params, state, batches)), npp


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line[:5]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


def peak_rss_growth_mb(call) -> float:
    """MB by which one `call()` raised the process's peak RSS above its RSS before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    before, _ = rss_mb()
    call()
    return max(0.0, rss_mb()[1] - before)


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def interleaved_times(calls: dict, repeats: int) -> dict:
    """name -> list of wall seconds; each round calls every entry once, in turn."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call))
    return times


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def bench_case(
    student: str,
    num_steps: int,
    threads: int,
    repeats: int,
    torch_variants: dict,
    compile_repeats: int = 1,
    remat_policies=engine.REMAT_POLICIES,
) -> list[dict]:
    """All records of one (student, T); see the module docstring."""
    (step_fn, objective, args), npp = make_problem(student, num_steps)
    block = jax.block_until_ready
    exes, compile_s = {}, {}
    for policy in remat_policies:
        # A fresh function per sample: jit caches compilations by function identity.
        samples = [compile_timed(make_meta_grad(step_fn, objective, policy), args)
                   for _ in range(compile_repeats)]
        exes[policy] = samples[0][0]
        compile_s[policy] = [s for _, s in samples]
    forward_exe, _ = compile_timed(make_forward(step_fn, objective, "none"), args)

    value, grad = block(exes["none"](*args))
    reference = np.concatenate([np.ravel(grad["W"]), np.ravel(grad["b"])])
    errors = {}
    for policy in remat_policies:
        g = block(exes[policy](*args))[1]
        errors[f"jax-remat-{policy}"] = rel_err(np.concatenate([np.ravel(g["W"]),
                                                                np.ravel(g["b"])]), reference)
    torch_calls = {name: make(npp) for name, make in torch_variants.items()}
    for name, call in torch_calls.items():
        dev, gw, gb = call()
        errors[name] = rel_err(np.concatenate([gw.ravel(), gb.ravel()]), reference)
        if abs(dev - float(value)) > 1e-3 * abs(float(value)):
            raise AssertionError(f"{name}: dev loss {dev} vs jax {float(value)}")
    bad = {k: v for k, v in errors.items() if not v <= GRAD_RTOL}
    if bad:
        raise AssertionError(f"{student} T={num_steps}: gradients disagree with JAX: {bad}")
    block(forward_exe(*args))

    calls = {f"jax-{p}": (lambda e=exes[p]: block(e(*args))) for p in remat_policies}
    calls["jax-forward"] = lambda: block(forward_exe(*args))
    calls.update(torch_calls)
    times = interleaved_times(calls, repeats)
    peaks = {name: peak_rss_growth_mb(call) for name, call in calls.items()}

    common = (student, num_steps, threads)
    records = [
        timing_record("meta_grad", "jax", *common, times["jax-none"], peaks["jax-none"],
               grad_rel_err=0.0, remat="none"),
        timing_record("forward_unroll", "jax", *common, times["jax-forward"], peaks["jax-forward"]),
    ]
    for name in torch_calls:
        records.append(timing_record("meta_grad", name, *common, times[name], peaks[name],
                              grad_rel_err=errors[name]))
    for policy in remat_policies:
        memory = exes[policy].memory_analysis()
        records.append(timing_record(
            f"meta_grad_remat_{policy}", "jax", *common, times[f"jax-{policy}"],
            peaks[f"jax-{policy}"], xla_temp_mb=memory.temp_size_in_bytes / MB,
            grad_rel_err=errors[f"jax-remat-{policy}"],
        ))
        records.append(timing_record(f"compile_remat_{policy}", "jax", *common, compile_s[policy],
                              None))
    return records


def host_cpu() -> jax.Device:
    """The host CPU device, on which FLOPs are counted (see `xla_gflop`)."""
    return jax.devices("cpu")[0]


def xla_gflop(fn, *args) -> float:
    """XLA's count of the floating-point operations of ``jax.jit(fn)(*args)``, in GFLOP.

    Compiled where `args` live (the default device for uncommitted ones). Callers count on
    the host CPU (`host_cpu`): the count is the program's math whatever device runs it,
    and XLA:CPU keeps a `lax.scan` as one while loop, whose body it counts once
    (`completed_loop_gflop`), where a GPU compiler may unroll a loop of two or three trips.
    The count is taken on XLA's optimized HLO, before code generation: so LLVM's
    optimizations are switched off, which makes the compile faster and leaves the count
    as it is.
    """
    compiled = jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return analysis["flops"] / 1e9


def step_and_transpose_gflop(step_fn, phi, state, batch) -> float:
    """GFLOP of one inner step and its transpose: what each step of an unroll adds to a
    reverse-mode meta-gradient (forward loop body plus backward loop body)."""

    def step_and_transpose(phi, state):
        new, pullback = jax.vjp(lambda p, s: step_fn(p, s, batch)[0], phi, state)
        return pullback(new)

    return xla_gflop(step_and_transpose, phi, state)


def completed_loop_gflop(count_at, num_steps: int, step_gflop: float) -> float:
    """XLA's count of a program over `num_steps` inner steps, every loop trip included.

    XLA's cost analysis counts a while loop's body once, whatever its trip count; so the
    program is counted at 2 and 3 steps (which must agree: else the loop was unrolled and
    this accounting is wrong), and the `num_steps` - 1 trips the count leaves out are
    added, each `step_gflop`.

    Args:
        count_at: ``count_at(n)``, XLA's GFLOP of the program over n steps.
        num_steps: T, the steps the timed program takes.
        step_gflop: GFLOP one more step adds to the program (in all its loops).

    Returns:
        GFLOP of the program over `num_steps` steps.
    """
    counted = [count_at(n) for n in (2, 3)]
    if abs(counted[0] - counted[1]) > 1e-6 * counted[0]:
        raise AssertionError(f"XLA counted loop bodies per trip: {counted}")
    return counted[0] + (num_steps - 1) * step_gflop


@functools.cache
def unroll_gflop(student: str, num_steps: int) -> dict:
    """GFLOP of the ``meta_grad`` (remat "none") and ``forward_unroll`` programs of
    `bench_case`, counted by XLA on the host CPU (`xla_gflop`); cached, as the count
    depends on nothing else.

    Returns:
        ``{"meta_grad": ..., "forward_unroll": ...}``.
    """
    with jax.default_device(host_cpu()):
        problems = {n: make_problem(student, n)[0] for n in (2, 3)}
        step_fn, _, (meta_params, state, batches) = problems[2]
        one = jax.tree_util.tree_map(lambda a: a[0], batches)
        per_step = {
            "meta_grad": step_and_transpose_gflop(step_fn, meta_params, state, one),
            "forward_unroll": xla_gflop(lambda p, s: step_fn(p, s, one)[0], meta_params,
                                        state),
        }
        makes = {"meta_grad": make_meta_grad, "forward_unroll": make_forward}

        def count_at(name, n):
            n_step_fn, objective, args = problems[n]
            return xla_gflop(makes[name](n_step_fn, objective, "none"), *args)

        return {name: completed_loop_gflop(lambda n, name=name: count_at(name, n), num_steps,
                                           per_step[name])
                for name in makes}


def stack_members(trees):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def bench_population(student: str, num_steps: int, threads: int, repeats: int) -> list[dict]:
    """population16_vmap vs population16_sequential (see the module docstring)."""
    (step_fn, objective, (meta_params, state, batches)), _ = make_problem(student, num_steps)
    # Member i: the initial weights and (W, b) perturbed by its own key.
    keys = jax.random.split(jax.random.PRNGKey(1), POPULATION)
    members = []
    for i, key in enumerate(keys):
        k_init, k_w = jax.random.split(key)
        leaves, treedef = jax.tree_util.tree_flatten(state.params)
        subkeys = jax.random.split(k_init, len(leaves))
        params = treedef.unflatten([
            leaf + 0.01 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, subkeys)
        ])
        mp = jax.tree_util.tree_map(
            lambda a, k=k_w: a + 0.05 * jax.random.normal(k, a.shape), meta_params
        )
        members.append((mp, state.replace(params=params, rng=jax.random.fold_in(key, i))))
    meta_grad = make_meta_grad(step_fn, objective, "none")
    single, _ = compile_timed(meta_grad, (*members[0], batches))
    pop_args = (stack_members([m[0] for m in members]),
                stack_members([m[1] for m in members]), batches)
    vmapped, _ = compile_timed(jax.vmap(meta_grad, in_axes=(0, 0, None)), pop_args)

    block = jax.block_until_ready
    pop_grad = block(vmapped(*pop_args))[1]
    for i in (0, POPULATION - 1):
        g = block(single(*members[i], batches))[1]
        err = rel_err(g["W"], pop_grad["W"][i])
        if not err <= GRAD_RTOL:
            raise AssertionError(f"vmapped member {i} differs from its own run: {err}")

    def sequential():
        for mp, st in members:
            block(single(mp, st, batches))

    calls = {"vmap": lambda: block(vmapped(*pop_args)), "sequential": sequential}
    times = interleaved_times(calls, repeats)
    peaks = {name: peak_rss_growth_mb(call) for name, call in calls.items()}
    common = (student, num_steps, threads)
    return [
        timing_record(f"population{POPULATION}_{name}", "jax", *common, times[name], peaks[name],
               xla_temp_mb=exe.memory_analysis().temp_size_in_bytes / MB)
        for name, exe in (("vmap", vmapped), ("sequential", single))
    ]
