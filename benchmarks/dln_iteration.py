"""One full L2T-DLN iteration (stages A, B, C): l2t_jax against a PyTorch implementation.

Shapes of the released MNIST set-up (`configs/l2t_dln.py:mnist_5k,released`): the LeNet with
BatchNorm, conv 20/50 and FC 800-800-500-10 (1,072,020 parameters), 28x28x1 inputs,
K = 15 SGD steps (lr 0.1) on batches of 25, a validation batch of 100, the DLN
4-40-40-40-40-1 (5,000 weights) and the coordinate-wise LSTM teacher 2-64-64-64-1
(Adam 1e-3). Data are random (only shapes matter for cost). `bench` takes smaller K and
batch sizes for quick checks (`benchmarks/gpu_check.py --dry`), and runs the PyTorch side
on the device it is given (CPU by default).

* ``jax``: one `jax.jit` of `DLNTeaching.outer_step` from `l2t_jax.methods.dln`.
* ``torch``: the same three stages written here with `torch.autograd.grad(...,
  create_graph=True)`: stage A differentiates the validation CE after K steps with
  respect to the DLN, stage B with respect to the LSTM through the proposal and a second
  unroll from the same student, stage C keeps unroll B's student (BatchNorm running
  statistics carried functionally through both unrolls, as in the JAX method).

The two sides share shapes and math, not initial values; their gradients are not
compared (the MLP meta-gradients of `benchmarks/meta_grad.py` are). Both records carry
``gflop``, XLA's count of the iteration's floating-point operations (`iteration_gflop`;
the same math on both sides), so ``gflop / median_s`` compares how fast each framework
runs the same work (XLA counts it on the host CPU: `benchmarks.meta_grad.xla_gflop`).
"""

from __future__ import annotations

import importlib.util
import types

import numpy as np

from benchmarks._records import timing_record
from benchmarks.meta_grad import (
    completed_loop_gflop,
    host_cpu,
    interleaved_times,
    peak_rss_growth_mb,
    step_and_transpose_gflop,
    xla_gflop,
)

K, BATCH, VAL_BATCH, LR, DLN_STEP, TEACHER_LR = 15, 25, 100, 0.1, 1e-3, 1e-3
NUM_CLASSES = 10
BN_MOMENTUM, BN_EPS = 0.9, 1e-5  # the students' BatchNorm (PyTorch's defaults)
STUDENT = "lenet5-bn"


def _data(steps: int, batch: int, val_batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(steps, batch, 28, 28, 1)).astype(np.float32),
        "y": rng.integers(0, NUM_CLASSES, (steps, batch)).astype(np.int32),
        "val_x": rng.normal(size=(val_batch, 28, 28, 1)).astype(np.float32),
        "val_y": rng.integers(0, NUM_CLASSES, val_batch).astype(np.int32),
    }


def make_jax(data: dict):
    """``call()`` running one jitted `DLNTeaching.outer_step` (its ``gflop`` attribute:
    `iteration_gflop`), or None if unavailable."""
    try:
        from l2t_jax.methods.dln import build_dln_teaching, initial_dln
    except ImportError:
        return None
    import jax
    import jax.numpy as jnp

    from configs import l2t_dln

    config = l2t_dln.get_config("mnist_5k,released")
    splits = types.SimpleNamespace(
        num_classes=NUM_CLASSES, train=types.SimpleNamespace(x=data["x"][0]))
    method = build_dln_teaching(config, splits)
    rng = jax.random.PRNGKey(0)
    state = method.init(rng, splits, initial_dln(config, rng))
    batches = {"train": {"x": jnp.asarray(data["x"]), "y": jnp.asarray(data["y"])},
               "val": {"x": jnp.asarray(data["val_x"]), "y": jnp.asarray(data["val_y"])}}
    step = jax.jit(method.outer_step).lower(state, batches).compile()

    def call():
        return jax.block_until_ready(step(state, batches))

    call.gflop = iteration_gflop(method, state, batches)
    return call


def iteration_gflop(method, state, batches) -> float:
    """XLA's count of one iteration's floating-point operations, in GFLOP.

    Counted on the host CPU (`xla_gflop`), at K = 2 and K = 3 steps, completed by
    `completed_loop_gflop`: each further step adds two (stages A and B each run K), each
    a forward step plus its transpose.
    """
    import jax

    cpu = host_cpu()
    with jax.default_device(cpu):
        state, batches = jax.device_put((state, batches), cpu)

        def count_at(n):
            first = jax.tree_util.tree_map(lambda a: a[:n], batches["train"])
            return xla_gflop(method.outer_step, state, {**batches, "train": first})

        one = jax.tree_util.tree_map(lambda a: a[0], batches["train"])
        per_step = step_and_transpose_gflop(method.student_teaching.step_fn(batches),
                                            state.loss_params, state.student, one)
        return completed_loop_gflop(count_at, batches["train"]["y"].shape[0], 2 * per_step)


def make_torch(data: dict, device: str = "cpu"):
    """``call()`` running one PyTorch L2T-DLN iteration (see the module docstring) on
    `device`; it returns the validation loss as a float, so the device has finished."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)

    def normal(*shape, std):
        return torch.randn(*shape, generator=gen) * std

    def lecun(out_ch, *fan_in_dims):
        fan_in = int(np.prod(fan_in_dims))
        return normal(out_ch, *fan_in_dims, std=1 / np.sqrt(fan_in))

    student = {
        "c1w": lecun(20, 1, 5, 5), "c1b": torch.zeros(20),
        "bn1g": torch.ones(20), "bn1b": torch.zeros(20),
        "c2w": lecun(50, 20, 5, 5), "c2b": torch.zeros(50),
        "bn2g": torch.ones(50), "bn2b": torch.zeros(50),
        "f1w": lecun(800, 800), "f1b": torch.zeros(800),
        "f2w": lecun(500, 800), "f2b": torch.zeros(500),
        "f3w": lecun(10, 500), "f3b": torch.zeros(10),
    }
    student = {k: v.to(device) for k, v in student.items()}
    bn_state = {"m1": torch.zeros(20, device=device), "v1": torch.ones(20, device=device),
                "m2": torch.zeros(50, device=device), "v2": torch.ones(50, device=device)}
    widths = (4, 40, 40, 40, 40, 1)
    dln = [normal(a, b, std=np.sqrt(2.0 / b)).to(device)
           for a, b in zip(widths[:-1], widths[1:])]
    sizes = (2, 64, 64, 64, 1)
    teacher = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        bound = 1 / np.sqrt(64)
        teacher += [(torch.rand(n, generator=gen) * 2 - 1) * bound for n in
                    ((a, 4 * b), (b, 4 * b), (4 * b,), (4 * b,))]
    teacher = [t.to(device).requires_grad_() for t in teacher]
    teacher_opt = torch.optim.Adam(teacher, lr=TEACHER_LR)
    num_dln = sum(p.numel() for p in dln)
    memory = [torch.zeros(num_dln, b, device=device) for b in sizes[1:] for _ in range(2)]

    xs = torch.from_numpy(data["x"]).permute(0, 1, 4, 2, 3).contiguous().to(device)
    ys = torch.from_numpy(data["y"]).long().to(device)
    val_x = torch.from_numpy(data["val_x"]).permute(0, 3, 1, 2).contiguous().to(device)
    val_y = torch.from_numpy(data["val_y"]).long().to(device)

    def lenet(p, bn, x, train):
        new_bn = {}
        for i in (1, 2):
            x = F.conv2d(x, p[f"c{i}w"], p[f"c{i}b"])
            if train:
                mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
                new_bn[f"m{i}"] = BN_MOMENTUM * bn[f"m{i}"] + (1 - BN_MOMENTUM) * mean
                new_bn[f"v{i}"] = BN_MOMENTUM * bn[f"v{i}"] + (1 - BN_MOMENTUM) * var
            else:
                mean, var = bn[f"m{i}"], bn[f"v{i}"]
            x = (x - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + BN_EPS)
            x = x * p[f"bn{i}g"][:, None, None] + p[f"bn{i}b"][:, None, None]
            x = F.max_pool2d(F.relu(x), 2)
        x = F.relu(F.linear(x.flatten(1), p["f1w"], p["f1b"]))
        x = F.relu(F.linear(x, p["f2w"], p["f2b"]))
        return F.linear(x, p["f3w"], p["f3b"]), new_bn

    def dln_loss(phi, logits, labels):
        s = torch.sigmoid(logits)
        s_true = s.gather(1, labels[:, None]).expand_as(s)
        wrong = 1.0 - F.one_hot(labels, NUM_CLASSES).to(s.dtype)
        rows = torch.stack([s_true, s, torch.ones_like(s), torch.zeros_like(s)], -1)
        h = rows * wrong[..., None]
        for i, w in enumerate(phi):
            h = h @ w
            if i < len(phi) - 1:
                h = F.leaky_relu(h, 0.01)
        return h.mean()

    names = list(student)

    def unroll_val_ce(phi, p0, bn):
        params = [p0[n].detach().requires_grad_() for n in names]
        for i in range(len(xs)):
            logits, bn = lenet(dict(zip(names, params)), bn, xs[i], True)
            grads = torch.autograd.grad(dln_loss(phi, logits, ys[i]), params,
                                        create_graph=True)
            params = [p - LR * g for p, g in zip(params, grads)]
        logits, _ = lenet(dict(zip(names, params)), bn, val_x, False)
        return F.cross_entropy(logits, val_y), params, bn

    def preprocess(g, factor=10.0):
        keep = g.abs() >= np.exp(-factor)
        first = torch.where(keep, torch.log(g.abs() + 1e-8) / factor, -torch.ones_like(g))
        second = torch.where(keep, torch.sign(g), np.exp(factor) * g)
        return torch.stack([first, second], -1)

    def lstm(x, mem):
        new = []
        for c in range(4):
            w_ih, w_hh, b_ih, b_hh = teacher[4 * c: 4 * c + 4]
            h, cell = mem[2 * c], mem[2 * c + 1]
            i, f, g, o = (x @ w_ih + b_ih + h @ w_hh + b_hh).chunk(4, -1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(cell)
            new += [x, cell]
        return x[:, 0], new

    state = {"student": student, "bn": bn_state, "dln": dln, "memory": memory}

    def call():
        s = state
        # Stage A: the DLN's hypergradient through K steps.
        phi = [w.detach().requires_grad_() for w in s["dln"]]
        val_a, _, _ = unroll_val_ce(phi, s["student"], s["bn"])
        g = torch.cat([t.flatten() for t in torch.autograd.grad(val_a, phi)]).detach()
        # Stage B: proposal phi'(psi), second unroll from the same student, Adam on psi.
        steps, new_memory = lstm(preprocess(g), s["memory"])
        flat = torch.cat([w.detach().flatten() for w in s["dln"]]) - DLN_STEP * steps
        new_phi = list(torch.split(flat, [w.numel() for w in phi]))
        new_phi = [t.view_as(w) for t, w in zip(new_phi, phi)]
        val_b, params, bn = unroll_val_ce(new_phi, s["student"], s["bn"])
        teacher_opt.zero_grad()
        val_b.backward()
        teacher_opt.step()
        # Stage C: the student of unroll B, the new DLN and memory.
        s["student"] = {n: p.detach() for n, p in zip(names, params)}
        s["bn"] = {k: v.detach() for k, v in bn.items()}
        s["dln"] = [w.detach() for w in new_phi]
        s["memory"] = [m.detach() for m in new_memory]
        return float(val_b.detach())

    return call


def bench(threads: int, repeats: int, steps: int = K, batch: int = BATCH,
          val_batch: int = VAL_BATCH, torch_device: str | None = "cpu") -> list[dict]:
    """``dln_iteration`` records for ``jax`` (if the method exists) and ``torch``.

    Args:
        threads: recorded as the records' ``threads``.
        repeats: timed calls of each side, after one warm-up call.
        steps: K, student steps per iteration.
        batch: training batch size.
        val_batch: validation batch size.
        torch_device: where the PyTorch side runs; None (or no torch): JAX side only.

    Returns:
        One record per side that ran.
    """
    data = _data(steps, batch, val_batch)
    calls = {}
    jax_call = make_jax(data)
    if jax_call is None:
        print("dln_iteration: l2t_jax.methods.dln not available; JAX side skipped")
    else:
        jax_call()  # first call: warm-up
        calls["jax"] = jax_call
    if torch_device is not None and importlib.util.find_spec("torch") is not None:
        torch_call = make_torch(data, torch_device)
        torch_call()
        calls["torch"] = torch_call
    times = interleaved_times(calls, repeats)
    gflop = {"gflop": jax_call.gflop} if jax_call is not None else {}
    return [
        timing_record("dln_iteration", name, STUDENT, steps, threads, times[name],
                      peak_rss_growth_mb(call), batch=batch, val_batch=val_batch, **gflop)
        for name, call in calls.items()
    ]
