#!/usr/bin/env python
"""Federated rounds: K clients in one vmapped program vs a Python loop over clients.

One FedAvg round (`l2t_jax.methods.federated.FederatedRounds`) of K clients, each taking
E = 20 local SGD steps of batch 32 on an MLP 784-200-32-10 (the federated configs'
network on MNIST-shaped inputs; synthetic data, every client holding 64 examples), then
the size-weighted average:

* ``federated_vmap``: the round as the method runs it, one jitted program;
* ``federated_loop``: the same math as a Python loop: one jitted call of the method's
  `local_training` per client, then its jitted `averaged` (as the Flower server runs it).

The two give the same global model (checked: rtol 1e-4, atol 1e-5) before timing. Records
(`docs/federated.json`) follow the project layout plus ``clients`` (K) and
``clients_per_s`` = K / median_s. One device, the threads the process has.

Launch, from the repository root (about 2 minutes on 2 idle cores):

    python -m benchmarks.federated            # K in {10, 50, 200}
    python -m benchmarks.federated --quick    # K in {10}: ~20 s
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._records import timing_record, write_records
from benchmarks.remat import compile_timed, wall_times
from l2t_jax import data
from l2t_jax.methods.federated import FederatedRounds
from l2t_jax.students.mlp import MLP

STUDENT = "mlp784-200-32-10"
LOCAL_STEPS = 20
BATCH = 32
PER_CLIENT = 64
CLIENTS = (10, 50, 200)
MB = 2.0**20


def make_round(num_clients: int, seed: int):
    """``(loop, state, batches)``: one round of `num_clients` clients, all sampled."""
    rng = np.random.default_rng(seed)
    n = num_clients * PER_CLIENT
    x = rng.standard_normal((n, 784)).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    split = data.ArraySplit(x, y, y)
    splits = data.Splits("synthetic", 10, (784,), split, split, split)
    partition = data.partition_clients(y, 10, num_clients, kind="iid", seed=seed)
    loop = FederatedRounds(MLP(10, (200, 32)), optax.sgd(0.05), partition,
                           clients_per_round=num_clients, local_steps=LOCAL_STEPS,
                           batch_size=BATCH, steps_per_call=1)
    state = loop.init(jax.random.PRNGKey(seed), splits)
    return loop, state, loop.batches(splits, seed, 0)


def python_loop(loop: FederatedRounds, state, batches):
    """A function running the round's math one jitted client at a time: the method's own
    `local_training` per client, then its `averaged` (as the Flower server runs it)."""
    local_training = jax.jit(loop.local_training)
    averaged = jax.jit(loop.averaged)
    _, client_rngs, _ = loop.round_keys(state)
    x = batches["x"].reshape(loop.clients_per_round, LOCAL_STEPS, BATCH, -1)
    y = batches["y"].reshape(loop.clients_per_round, LOCAL_STEPS, BATCH)

    def run():
        clients = [local_training(state, None, client_rngs[k], {"x": x[k], "y": y[k]})[0]
                   for k in range(loop.clients_per_round)]
        stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *clients)
        return averaged(state, stacked.params, stacked.model_state,
                        batches["weights"][0]).params

    return run


def bench(num_clients: int, repeats: int, seed: int) -> list[dict]:
    loop, state, batches = make_round(num_clients, seed)
    vmapped, compile_s = compile_timed(loop.outer_step, (state, batches))
    new_state, _ = jax.block_until_ready(vmapped(state, batches))
    run = python_loop(loop, state, batches)
    looped = jax.block_until_ready(run())  # compiles the client program once
    for a, b in zip(jax.tree_util.tree_leaves(new_state.params),
                    jax.tree_util.tree_leaves(looped)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    loop_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        loop_times.append(time.perf_counter() - start)
    vmap_times = wall_times(vmapped, (state, batches), repeats)
    threads = len(os.sched_getaffinity(0))
    return [
        timing_record(name, "jax", STUDENT, LOCAL_STEPS, threads, times,
                      memory / MB, clients=num_clients,
                      clients_per_s=num_clients / float(np.median(times)), **extra)
        for name, times, memory, extra in (
            ("federated_vmap", vmap_times, vmapped.memory_analysis().temp_size_in_bytes,
             {"compile_s": compile_s}),
            ("federated_loop", loop_times, float("nan"), {}))
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = 10 only.")
    parser.add_argument("--out", default="docs/federated.json", help="JSON output path.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds per case.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = []
    print(f"{'benchmark':>16} {'K':>4} {'median_s':>9} {'clients/s':>10}")
    for num_clients in CLIENTS[:1] if args.quick else CLIENTS:
        for r in bench(num_clients, args.repeats, args.seed):
            records.append(r)
            print(f"{r['benchmark']:>16} {r['clients']:>4} {r['median_s']:>9.4f} "
                  f"{r['clients_per_s']:>10.1f}")
    write_records(records, args.out)


if __name__ == "__main__":
    main()
