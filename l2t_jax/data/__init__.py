"""Data: TFDS sources, train/dev/test splits, label noise, batching, augmentation.

Importing this package registers the project's TFDS builders (`digits`, `mnist_5k`,
`mnist1d`).
"""

from l2t_jax.data.augment import AUGMENT_KINDS, augment_batch
from l2t_jax.data.noise import NOISE_TYPES, corrupt_labels
from l2t_jax.data.partition import PARTITIONS, Partition, partition_clients
from l2t_jax.data.pipeline import (
    DATASET_NAMES,
    ArraySplit,
    Splits,
    load_splits,
    split_sizes,
    stacked_batches,
    stream_indices,
    validate_data_config,
)

__all__ = [
    "AUGMENT_KINDS",
    "DATASET_NAMES",
    "NOISE_TYPES",
    "PARTITIONS",
    "ArraySplit",
    "Partition",
    "Splits",
    "augment_batch",
    "corrupt_labels",
    "load_splits",
    "partition_clients",
    "split_sizes",
    "stacked_batches",
    "stream_indices",
    "validate_data_config",
]
