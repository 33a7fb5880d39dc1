"""Federated clients' data: a train split partitioned into clients, IID or non-IID.

The non-IID partition is the common Dirichlet label split (FedGen and most federated
benchmarks): for each class c, its examples, shuffled, are cut among the N clients in
proportions drawn from Dirichlet(alpha * 1_N), so a small alpha leaves each client a few
dominant labels. The IID partition deals the shuffled split round-robin. Both are
deterministic in their seed; a client left without examples is a one-line error.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from l2t_jax.errors import ConfigError

PARTITIONS = ("dirichlet", "iid")


@dataclasses.dataclass(frozen=True)
class Partition:
    """Which train examples each client holds.

    Attributes:
        indices: one sorted int array per client, indices into the train split.
        label_counts: (N, C) examples of each label per client.
    """

    indices: tuple[np.ndarray, ...]
    label_counts: np.ndarray

    @property
    def num_clients(self) -> int:
        return len(self.indices)

    @property
    def sizes(self) -> np.ndarray:
        """(N,) examples per client."""
        return self.label_counts.sum(axis=1)


def partition_clients(labels: np.ndarray, num_classes: int, num_clients: int, *,
                      kind: str = "dirichlet", alpha: float = 0.1, seed: int = 0
                      ) -> Partition:
    """Partitions a split's examples into `num_clients` clients.

    Args:
        labels: (n,) the split's (training) labels.
        num_classes: C.
        num_clients: N >= 1.
        kind: ``"dirichlet"`` (label proportions per class from Dirichlet(alpha)) or
            ``"iid"`` (shuffled, dealt round-robin).
        alpha: the Dirichlet concentration (ignored for ``"iid"``); smaller is more
            skewed.
        seed: the partition's seed (fixed across a method's training seeds by default,
            as a federated benchmark's data split is).

    Returns:
        The partition.

    Raises:
        ConfigError: a client is left without examples (names what to change).
    """
    rng = np.random.default_rng([seed, num_clients])
    owner = np.empty(len(labels), np.int64)
    if kind == "iid":
        owner[rng.permutation(len(labels))] = np.arange(len(labels)) % num_clients
    else:
        for label in range(num_classes):
            examples = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(examples)).astype(np.int64)
            owner[examples] = np.repeat(np.arange(num_clients),
                                        np.diff(np.concatenate([[0], cuts, [len(examples)]])))
    counts = np.zeros((num_clients, num_classes), np.int64)
    np.add.at(counts, (owner, labels), 1)
    empty = np.flatnonzero(counts.sum(axis=1) == 0)
    if len(empty):
        raise ConfigError(
            f"the {kind} partition of {len(labels)} examples into {num_clients} clients "
            f"(alpha {alpha}, seed {seed}) leaves client {empty[0]} without examples; raise "
            "config.federated.alpha, lower config.federated.num_clients or change "
            "config.federated.partition_seed")
    indices = tuple(np.flatnonzero(owner == k) for k in range(num_clients))
    return Partition(indices, counts)
