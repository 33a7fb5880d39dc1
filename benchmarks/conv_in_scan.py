#!/usr/bin/env python
"""Speed of convolutional students trained inside `lax.scan`: Flax's conv against ours.

On XLA:CPU the convolutions of a gradient run many times slower inside a while loop (a
`lax.scan` body) than in straight-line code (jax-ml/jax#12868): XLA rewrites them into
the channel-last form its fast kernels take only outside loops. The students' `Conv`
(`l2t_jax.students._layers`) emits every convolution of the gradient, and of the
gradient's gradient, in that form already. This script times, per inner step:

* ``sgd_*``: T plain-SGD steps of the student on cross-entropy (first-order);
* ``meta_grad_*``: the gradient of the dev cross-entropy after T steps with respect to
  a scalar loss parameter (the log-temperature of the training cross-entropy), i.e.
  reverse mode through the scan of gradient steps (second-order);

each as ``unrolled`` (a Python loop of T steps under one jit, Flax's `nn.Conv`: the
speed to reach), ``scan_flax_conv`` (`engine.unroll`, Flax's `nn.Conv`: the students
before the fix) and ``scan_our_conv`` (`engine.unroll`, the students as they are). All
variants of a case must agree (relative L2 error 1e-3) before they are timed; timed
calls of the variants are interleaved so a busy host slows them alike. ``median_s``,
``min_s`` and ``max_s`` are seconds per inner step; ``peak_mb`` is XLA's temp buffer
size of the compiled call. Students: LeNet-5 (batch 64 of 28x28x1, T=10), the MNIST-1D
CNN (25 channels, batch 100 of (40, 1), T=10), ResNet-8 (He et al.) and WRN-10-1
(batch 32 of 32x32x3, T=4: Flax's conv takes seconds per step there), and three
`CheapCNN`s of grouped convolutions (batch 16 of 16x16x3, T=4): ``sep_cnn``
(depthwise 3x3 + pointwise 1x1 blocks), ``group_cnn`` (3x3s of 4 groups) and
``dense_cnn``, ungrouped 3x3s of half the width: the same FLOPs per block as
``group_cnn`` (half in the stem). XLA:CPU runs grouped convolutions slowly also unrolled, so there
``unrolled`` (Flax's conv) is no longer the speed to reach; ``dense_cnn`` is.

Launch, from the repository root:

    python benchmarks/conv_in_scan.py                    # all students: ~14 min
    python benchmarks/conv_in_scan.py --students lenet5  # or any subset
    python benchmarks/conv_in_scan.py --quick            # 1-D, grouped CNNs: ~3 min

Run times are for 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from benchmarks._records import write_records
from l2t_jax import engine
from l2t_jax.losses import logits_loss
from l2t_jax.optimizers import make_inner_optimizer
from l2t_jax.students import _layers, build_student, cnn1d, lenet

NUM_CLASSES = 10
LEARNING_RATE = 0.01
DEV_SIZE = 256
# name -> (student config, input shape without batch, batch size, T); the "cheap_cnn"
# configs are `CheapCNN`'s fields.
STUDENTS = {
    "lenet5": ({"name": "lenet5"}, (28, 28, 1), 64, 10),
    "cnn1d": ({"name": "cnn1d", "channels": 25}, (40, 1), 100, 10),
    "resnet_he8": ({"name": "resnet_he", "depth": 8}, (32, 32, 3), 32, 4),
    "wrn10-1": ({"name": "wrn", "depth": 10, "widen_factor": 1}, (32, 32, 3), 32, 4),
    "sep_cnn": (
        {"name": "cheap_cnn", "widths": (32, 64, 64), "block": "separable"},
        (16, 16, 3),
        16,
        4,
    ),
    "group_cnn": (
        {"name": "cheap_cnn", "widths": (32, 64, 64), "block": "grouped", "groups": 4},
        (16, 16, 3),
        16,
        4,
    ),
    "dense_cnn": (
        {"name": "cheap_cnn", "widths": (16, 32, 32), "block": "grouped", "groups": 1},
        (16, 16, 3),
        16,
        4,
    ),
}
QUICK_STUDENTS = ("cnn1d", "sep_cnn", "group_cnn", "dense_cnn")
VARIANTS = ("unrolled", "scan_flax_conv", "scan_our_conv")
MB = 2.0**20


@contextlib.contextmanager
def flax_conv():
    """Within the block, students are traced with `nn.Conv` instead of our `Conv`."""
    modules = (_layers, lenet, cnn1d)  # _layers for `conv_no_bias` (ResNets, WRN)
    saved = [module.Conv for module in modules]
    for module in modules:
        module.Conv = nn.Conv
    try:
        yield
    finally:
        for module, conv in zip(modules, saved):
            module.Conv = conv


class CheapCNN(nn.Module):
    """A small CNN of depthwise-separable or grouped 3x3 convolutions.

    A 3x3 stem convolution to `widths[0]` channels, then one block per width (stride 1
    for the first, 2 for the others), global average pooling and a linear read-out;
    ReLU after every convolution, no bias, no BatchNorm (the cases time convolutions).
    Convolutions are `_layers.Conv`, looked up when traced, so `flax_conv` swaps them.

    Attributes:
      num_classes: number of logits.
      widths: output channels of the blocks.
      block: "separable" (a depthwise 3x3, then a pointwise 1x1 to the width:
        Moonshine's DConv) or "grouped" (a 3x3 of `groups` groups).
      groups: feature groups of the "grouped" blocks' 3x3s (1: ungrouped).
      dtype: parameter and computation dtype.
    """

    num_classes: int
    widths: tuple[int, ...]
    block: str
    groups: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Returns logits (B, num_classes) for images (B, H, W, C); ignores `train`."""
        del train
        conv = functools.partial(
            _layers.Conv, use_bias=False, dtype=self.dtype, param_dtype=self.dtype
        )
        x = nn.relu(conv(self.widths[0], (3, 3), padding=1)(x))
        for block, width in enumerate(self.widths):
            spatial = functools.partial(
                conv, kernel_size=(3, 3), strides=1 if block == 0 else 2, padding=1
            )
            if self.block == "separable":
                depthwise = x.shape[-1]
                x = nn.relu(spatial(depthwise, feature_group_count=depthwise)(x))
                x = nn.relu(conv(width, (1, 1))(x))
            else:
                x = nn.relu(spatial(width, feature_group_count=self.groups)(x))
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.dtype)(
            jnp.mean(x, axis=(1, 2))
        )


def tempered_ce(meta_params, logits, labels):
    """Cross-entropy of logits / exp(meta_params): the teacher's one scalar."""
    logits = logits / jnp.exp(meta_params)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def make_problem(student_name: str, num_steps: int, rng: jax.Array):
    """Builds the student's SGD step, the dev objective and the inputs.

    Args:
        student_name: a key of `STUDENTS`.
        num_steps: T, the number of inner SGD steps.
        rng: PRNG key for data and initialisation.

    Returns:
        ``(step_fn, objective, args)`` with ``args = (meta_params, state, batches)``;
        ``batches`` holds ``x`` (T, B, *input_shape) and ``y`` (T, B).
    """
    fields, input_shape, batch_size, _ = STUDENTS[student_name]
    if fields["name"] == "cheap_cnn":
        fields = {k: v for k, v in fields.items() if k != "name"}
        model = CheapCNN(NUM_CLASSES, **fields)
    else:
        model = build_student(ml_collections.ConfigDict(fields), NUM_CLASSES)
    tx = make_inner_optimizer(
        ml_collections.ConfigDict({"name": "sgd", "learning_rate": LEARNING_RATE}),
        num_steps,
    )
    step_fn = engine.make_student_step(model, logits_loss(tempered_ce), tx)
    k_x, k_y, k_dx, k_dy, k_init = jax.random.split(rng, 5)
    batches = {
        "x": jax.random.normal(k_x, (num_steps, batch_size, *input_shape)),
        "y": jax.random.randint(k_y, (num_steps, batch_size), 0, NUM_CLASSES),
    }
    dev_x = jax.random.normal(k_dx, (DEV_SIZE, *input_shape))
    dev_y = jax.random.randint(k_dy, (DEV_SIZE,), 0, NUM_CLASSES)
    state = engine.init_student_state(model, tx, k_init, dev_x[:1])

    def objective(meta_params, final):
        del meta_params
        logits, _ = engine.apply_student(
            model, final.params, final.model_state, dev_x, train=False
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, dev_y)
        return jnp.mean(ce), None

    return step_fn, objective, (jnp.float32(0.1), state, batches)


def make_train(step_fn, unrolled: bool):
    """``(meta_params, state, batches) -> params`` after T steps."""

    def train(meta_params, state, batches):
        if unrolled:
            for t in range(jax.tree_util.tree_leaves(batches)[0].shape[0]):
                batch = jax.tree_util.tree_map(lambda a, t=t: a[t], batches)
                state, _ = step_fn(meta_params, state, batch)
        else:
            state, _ = engine.unroll(step_fn, meta_params, state, batches)
        return state.params

    return train


def make_meta_grad(step_fn, objective, unrolled: bool):
    """``(meta_params, state, batches) -> (dev CE, d dev CE / d meta_params)``."""
    train = make_train(step_fn, unrolled)

    def dev_loss(meta_params, state, batches):
        final = state.replace(params=train(meta_params, state, batches))
        return objective(meta_params, final)[0]

    return jax.value_and_grad(dev_loss)


def compile_variant(make_fn, variant: str, args):
    """Compiles the function `make_fn(unrolled)` builds, with the variant's conv."""
    conv = flax_conv() if variant != "scan_our_conv" else contextlib.nullcontext()
    with conv:
        return jax.jit(make_fn(variant == "unrolled")).lower(*args).compile()


def check_close(actual, expected, what: str, rtol: float = 1e-3) -> None:
    """Asserts ||actual - expected|| <= rtol ||expected|| over all leaves together.

    A norm over the whole output, not per element: float32 summation order differs
    between the variants, and near-zero entries (a BatchNorm shift after a few steps)
    differ by a large fraction of themselves.
    """
    a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(actual)])
    b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(expected)])
    error = np.linalg.norm(a - b) / np.linalg.norm(b)
    if not error <= rtol:
        raise AssertionError(f"{what}: relative error {error:.2e} > {rtol}")


def bench_case(student_name: str, num_steps: int, repeats: int, threads: int):
    """Times every variant of both tasks for one student; returns one record each."""
    step_fn, objective, args = make_problem(
        student_name, num_steps, jax.random.PRNGKey(0)
    )
    tasks = {
        "sgd": lambda unrolled: make_train(step_fn, unrolled),
        "meta_grad": lambda unrolled: make_meta_grad(step_fn, objective, unrolled),
    }
    records = []
    for task, make_fn in tasks.items():
        compiled = {v: compile_variant(make_fn, v, args) for v in VARIANTS}
        # The first call also warms each executable up before it is timed.
        outputs = {v: jax.block_until_ready(exe(*args)) for v, exe in compiled.items()}
        for variant in VARIANTS[1:]:
            check_close(
                outputs[variant], outputs[VARIANTS[0]], f"{student_name} {task}"
            )
        times = {v: [] for v in VARIANTS}
        for _ in range(repeats):
            for variant, exe in compiled.items():
                start = time.perf_counter()
                jax.block_until_ready(exe(*args))
                times[variant].append((time.perf_counter() - start) / num_steps)
        for variant in VARIANTS:
            memory = compiled[variant].memory_analysis()
            records.append(
                {
                    "benchmark": f"{task}_{variant}",
                    "framework": "jax",
                    "student": student_name,
                    "T": num_steps,
                    "threads": threads,
                    "median_s": float(np.median(times[variant])),
                    "min_s": float(np.min(times[variant])),
                    "max_s": float(np.max(times[variant])),
                    "peak_mb": (
                        None if memory is None else memory.temp_size_in_bytes / MB
                    ),
                }
            )
    return records


def format_row(r: dict) -> str:
    return (
        f"{r['student']:>8} {r['T']:>3} {r['benchmark']:>24} {1e3 * r['median_s']:>10.2f}"
        f" {1e3 * r['min_s']:>10.2f} {1e3 * r['max_s']:>10.2f}"
        f" {'-' if r['peak_mb'] is None else format(r['peak_mb'], '.1f'):>8}"
    )


HEADER = (
    f"{'student':>8} {'T':>3} {'benchmark':>24} {'median_ms':>10} {'min_ms':>10}"
    f" {'max_ms':>10} {'temp_MB':>8}   (per inner step)"
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="1-D and grouped CNNs only."
    )
    parser.add_argument(
        "--students", nargs="+", choices=tuple(STUDENTS), help="Default: all."
    )
    parser.add_argument("--out", default="docs/conv_in_scan.json", help="JSON path.")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="T for every student (default: its own).",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="Timed calls per variant (>= 3)."
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.repeats < 3:
        raise SystemExit("--repeats must be >= 3")
    threads = len(os.sched_getaffinity(0))
    students = args.students or (QUICK_STUDENTS if args.quick else tuple(STUDENTS))
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, threads={threads}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, repeats={args.repeats}"
    )
    print(HEADER, flush=True)
    records = []
    start = time.perf_counter()
    for student_name in students:
        num_steps = args.steps or STUDENTS[student_name][3]
        for record in bench_case(student_name, num_steps, args.repeats, threads):
            records.append(record)
            print(format_row(record), flush=True)
    print(f"total {time.perf_counter() - start:.1f} s")
    write_records(records, args.out)


if __name__ == "__main__":
    main()
