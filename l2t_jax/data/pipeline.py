"""From a data config to normalised in-memory splits, and from a split to stacked batches.

Datasets (`DATASET_NAMES`):

* `digits`, `mnist_5k`, `mnist1d`: real data from the project's TFDS builders
  (`builders.py`), prepared offline.
* `mnist`, `cifar10`, `cifar100`: the standard TFDS builders, read by the same code.
  Preparing them downloads the data; TFDS 4.9.10's builders for them also need
  TensorFlow to convert the download. Without either, `load_splits` fails with one
  line saying so (after TFDS's own download retries, about 3 minutes offline); a
  `data_dir` where the dataset is already prepared as array_record needs neither.
* `fake_mnist`, `fake_cifar10`, `fake_cifar100`: NOT real data. Random uint8 images
  of the real shapes (512 train / 256 test, fixed seed) whose pixels lean towards a
  random per-class template, so a few training steps can lower the loss. They bypass
  TFDS and exist only to build and smoke-run the paper configs without a download.

Data config fields (`config` is the `data` sub-config):

* `name`: one of `DATASET_NAMES`.
* `data_dir`: TFDS data directory; None means `$TFDS_DATA_DIR` or
  `~/tensorflow_datasets` (TFDS's default). Each dataset is prepared there once.
* `dev_size`: number of train examples carved out as the dev split, stratified by
  class, chosen by `split_seed` (default 0).
* `meta_dev_size` (default 0): how many of the `dev_size` dev examples (stratified,
  `split_seed`) go to a separate `meta_dev` split that teachers train on, leaving the
  rest as the dev split used for model selection. 0: teachers read the dev split
  itself (`Splits.meta_dev` is `Splits.dev`), so a teacher and the selection see the
  same examples.
* `noise_type` ("none", "symmetric", "pair"; default "none"), `noise_rate` (default
  0.0), `noise_seed` (default 0): label noise on the train split only (see
  `noise.corrupt_labels`); dev and test keep clean labels.
* `augment` ("none" or "cifar"; default "none"): read by the training step, which
  calls `augment.augment_batch`; validated here.

Normalisation: inputs are standardised with the mean and standard deviation of the
train split after the dev carve-out, per channel for images (N, H, W, C) and as one
scalar for mnist1d signals (N, 40); the same statistics are applied to dev and test.
The same rule serves every dataset (on CIFAR the statistics are the usual published
constants up to the effect of the dev carve-out). Scaling images to [0, 1] first
would not change the result, so it is skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from l2t_jax import config_checks
from l2t_jax.data import augment, builders, noise
from l2t_jax.errors import ConfigError

_XY = tuple[np.ndarray, np.ndarray]  # (inputs, labels) of one split.
_FAKE_NUM_TRAIN = 512
_FAKE_NUM_TEST = 256
_FAKE_SEED = 0
_CONFIG_FIELDS = (
    "name",
    "data_dir",
    "dev_size",
    "meta_dev_size",
    "split_seed",
    "noise_type",
    "noise_rate",
    "noise_seed",
    "augment",
)


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """One split in memory.

    Attributes:
        x: (N, *input_shape) float32 normalised inputs.
        y: (N,) int32 labels to train on (noisy on the train split if noise is on).
        y_clean: (N,) int32 true labels.
    """

    x: np.ndarray
    y: np.ndarray
    y_clean: np.ndarray


@dataclasses.dataclass(frozen=True)
class Splits:
    """A dataset's train (after the dev carve-out), dev, test and teacher-dev splits.

    `meta_dev` is what teachers train on (their dev objective, features, validation
    batches); `dev` is what model selection reads. They are the same split unless the
    data config's `meta_dev_size` carves a separate one out of the dev examples.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    train: ArraySplit
    dev: ArraySplit
    test: ArraySplit
    meta_dev: ArraySplit | None = None

    def __post_init__(self):
        if self.meta_dev is None:
            object.__setattr__(self, "meta_dev", self.dev)


@dataclasses.dataclass(frozen=True)
class _DatasetSpec:
    num_classes: int
    input_shape: tuple[int, ...]
    num_train: int  # Before the dev carve-out; lets the config be checked without I/O.
    fake: bool = False


_SPECS = {
    "digits": _DatasetSpec(10, (8, 8, 1), 1497),
    "mnist_5k": _DatasetSpec(10, (28, 28, 1), 4000),
    "mnist1d": _DatasetSpec(10, (40,), 4000),
    "mnist": _DatasetSpec(10, (28, 28, 1), 60000),
    "cifar10": _DatasetSpec(10, (32, 32, 3), 50000),
    "cifar100": _DatasetSpec(100, (32, 32, 3), 50000),
    "fake_mnist": _DatasetSpec(10, (28, 28, 1), _FAKE_NUM_TRAIN, fake=True),
    "fake_cifar10": _DatasetSpec(10, (32, 32, 3), _FAKE_NUM_TRAIN, fake=True),
    "fake_cifar100": _DatasetSpec(100, (32, 32, 3), _FAKE_NUM_TRAIN, fake=True),
}
DATASET_NAMES = tuple(_SPECS)


def validate_data_config(config: ml_collections.ConfigDict) -> None:
    """Checks a data config without reading any data.

    Args:
        config: the `data` sub-config (fields in the module docstring).

    Raises:
        ConfigError: one line naming the field and what to change.
    """
    unknown = sorted(set(config.keys()) - set(_CONFIG_FIELDS))
    if unknown:
        raise ConfigError(
            f"unknown config.data field(s) {unknown}; the fields are {_CONFIG_FIELDS}"
        )
    name = config.get("name")
    if name not in _SPECS:
        raise ConfigError(f"unknown config.data.name {name!r}; choose one of {DATASET_NAMES}")
    spec = _SPECS[name]
    dev_size = config.get("dev_size")
    if not (config_checks.is_integer(dev_size) and 1 <= dev_size < spec.num_train):
        raise ConfigError(
            f"config.data.dev_size must be an integer in [1, {spec.num_train}) for {name} "
            f"(train examples carved out as dev), got {dev_size!r}"
        )
    meta_dev_size = config.get("meta_dev_size", 0)
    if not (config_checks.is_integer(meta_dev_size) and 0 <= meta_dev_size < dev_size):
        raise ConfigError(
            f"config.data.meta_dev_size must be an integer in [0, dev_size = {dev_size}) "
            f"(dev examples set aside for teachers), got {meta_dev_size!r}"
        )
    config_checks.check_fields(
        config_checks.integer(f"config.data.{field}", config.get(field, 0), minimum=0)
        for field in ("split_seed", "noise_seed"))
    noise.validate_noise(config.get("noise_type", "none"), config.get("noise_rate", 0.0))
    kind = config.get("augment", "none")
    augment.validate_augment(kind)
    if kind == "cifar" and len(spec.input_shape) != 3:
        raise ConfigError(
            f"config.data.augment 'cifar' needs (H, W, C) images but {name} inputs have "
            f"shape {spec.input_shape}; set it to 'none'"
        )


def split_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
    """The number of examples in each split `load_splits` gives, without reading data.

    Args:
        config: a valid `data` sub-config (`validate_data_config`).

    Returns:
        ``{"train": ..., "dev": ..., "meta_dev": ...}`` (``meta_dev`` is the dev split
        itself when ``meta_dev_size`` is 0).
    """
    meta_dev_size = config.get("meta_dev_size", 0)
    return {"train": _SPECS[config.name].num_train - config.dev_size,
            "dev": config.dev_size - meta_dev_size,
            "meta_dev": meta_dev_size or config.dev_size}


def load_splits(config: ml_collections.ConfigDict) -> Splits:
    """Loads a dataset into memory as normalised train, dev and test splits.

    TFDS datasets are prepared into `data_dir` on first use and read from there after.

    Args:
        config: the `data` sub-config (fields in the module docstring).

    Returns:
        The splits; train has `num_train - dev_size` examples, dev `dev_size`.

    Raises:
        ConfigError: a bad config, or a standard TFDS dataset that is not prepared and
            cannot be prepared here (one line saying what is needed).
    """
    validate_data_config(config)
    name = config.name
    spec = _SPECS[name]
    if spec.fake:
        (train_x, train_y), (test_x, test_y) = _fake_arrays(spec)
    else:
        (train_x, train_y), (test_x, test_y) = read_tfds(name, config.get("data_dir"))
    fit, dev = builders.stratified_split(train_y, config.dev_size, config.get("split_seed", 0))
    x_fit, x_dev, x_test = _standardise(train_x[fit], train_x[dev], test_x)
    y_fit, y_dev, y_test = (y.astype(np.int32) for y in (train_y[fit], train_y[dev], test_y))
    meta_dev = None
    if config.get("meta_dev_size", 0):
        select, meta = builders.stratified_split(y_dev, config.meta_dev_size,
                                                 config.get("split_seed", 0) + 1)
        meta_dev = ArraySplit(x_dev[meta], y_dev[meta], y_dev[meta])
        x_dev, y_dev = x_dev[select], y_dev[select]
    y_noisy = noise.corrupt_labels(
        y_fit,
        num_classes=spec.num_classes,
        noise_type=config.get("noise_type", "none"),
        noise_rate=config.get("noise_rate", 0.0),
        seed=config.get("noise_seed", 0),
    )
    return Splits(
        name=name,
        num_classes=spec.num_classes,
        input_shape=tuple(x_fit.shape[1:]),
        train=ArraySplit(x_fit, y_noisy, y_fit),
        dev=ArraySplit(x_dev, y_dev, y_dev),
        test=ArraySplit(x_test, y_test, y_test),
        meta_dev=meta_dev,
    )


def stacked_batches(
    split: ArraySplit, *, seed: int, start_step: int, num_steps: int, batch_size: int
) -> dict[str, np.ndarray]:
    """Returns the training batches of steps `start_step .. start_step + num_steps - 1`.

    Stateless and exact for resuming: the examples are one endless stream, epoch after
    epoch, each epoch `e` a permutation of the split drawn from
    `np.random.default_rng([seed, e])`; step `s` takes stream positions
    `s * batch_size .. (s + 1) * batch_size - 1`. Batches run on across epoch
    boundaries (nothing is dropped), so every example appears exactly once per epoch
    and the batches of steps [0, 10) equal those of [0, 4) followed by [4, 10).

    Args:
        split: the split to draw from (usually `Splits.train`).
        seed: data-order seed, an integer >= 0.
        start_step: first global step, >= 0.
        num_steps: number of steps T, >= 1.
        batch_size: examples per step B, at most the split size.

    Returns:
        {"x": (T, B, *input_shape) float32, "y": (T, B) int32 training labels}.

    Raises:
        ConfigError: `batch_size` is larger than the split, or a step count is negative.
    """
    num_examples = len(split.y)
    if not 1 <= batch_size <= num_examples:
        raise ConfigError(
            f"batch_size must be in [1, {num_examples}] (the split size), got {batch_size}; "
            "lower config.train.batch_size or config.data.dev_size"
        )
    if start_step < 0 or num_steps < 1:
        raise ConfigError(f"need start_step >= 0 and num_steps >= 1, got {start_step}, {num_steps}")
    index = stream_indices(num_examples, (seed,), start_step * batch_size,
                           num_steps * batch_size).reshape(num_steps, batch_size)
    return {"x": split.x[index], "y": split.y[index]}


def stream_indices(num_examples: int, seed: Sequence[int], start: int, count: int
                   ) -> np.ndarray:
    """Positions ``start .. start + count - 1`` of an endless stream of example indices.

    The stream is epoch after epoch, each epoch `e` a permutation of
    ``range(num_examples)`` drawn from ``np.random.default_rng([*seed, e])``; so any
    stretch of it is computed without the ones before (`stacked_batches` takes its
    batches from it, and so do the federated clients, each from its own data).

    Args:
        num_examples: the size of what is indexed, >= 1 (may be smaller than `count`).
        seed: the stream's seed words, integers >= 0.
        start: the first position, >= 0.
        count: how many positions, >= 1.

    Returns:
        (count,) int indices into ``range(num_examples)``.
    """
    positions = np.arange(start, start + count)
    epochs, offsets = np.divmod(positions, num_examples)
    first_epoch = epochs[0]
    orders = np.stack([
        np.random.default_rng([*seed, epoch]).permutation(num_examples)
        for epoch in range(first_epoch, epochs[-1] + 1)
    ])
    return orders[epochs - first_epoch, offsets]


def read_tfds(name: str, data_dir: str | None) -> tuple[_XY, _XY]:
    """Prepares a TFDS dataset (once) and reads its raw train and test splits into memory.

    Args:
        name: a registered TFDS name with "train" and "test" splits and
            `supervised_keys`, e.g. "digits" or "cifar10".
        data_dir: TFDS data directory; None for TFDS's default.

    Returns:
        ((train_inputs, train_labels), (test_inputs, test_labels)): inputs as stored
        (e.g. uint8 images), labels as integers, in the stored order.

    Raises:
        ConfigError: the dataset is not prepared and preparing it failed (network or
            TensorFlow missing); one line saying what is needed.
    """
    tfds.disable_progress_bar()
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    try:
        builder.download_and_prepare()
    except FileExistsError:
        # Another process (a multi-host run's other host, on shared storage) prepared it
        # at the same time and moved its complete copy into place first (TFDS renames it
        # there atomically): read that copy.
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            raise
    except (OSError, ImportError) as error:
        message = " ".join(str(error).split())  # Its tail names the cause; keep one line.
        cause = f"{type(error).__name__}: {'...' if len(message) > 150 else ''}{message[-150:]}"
        raise ConfigError(
            f"dataset {name!r} is not prepared in {builder.data_dir} and preparing it "
            f"failed ({cause}); it needs a network download (and TensorFlow for TFDS's "
            "mnist/cifar builders), or set config.data.data_dir to a directory where it "
            "is prepared with file_format='array_record'"
        ) from None
    input_key, label_key = builder.info.supervised_keys

    def read(split: str) -> _XY:
        source = builder.as_data_source(split)
        examples = source.__getitems__(list(range(len(source))))
        return (
            np.stack([example[input_key] for example in examples]),
            np.array([example[label_key] for example in examples]),
        )

    return read("train"), read("test")


def _fake_arrays(spec: _DatasetSpec) -> tuple[_XY, _XY]:
    """Random uint8 (train, test) arrays of a dataset's shape; see the module docstring."""
    rng = np.random.default_rng(_FAKE_SEED)
    templates = rng.integers(0, 256, (spec.num_classes, *spec.input_shape))

    def draw(num: int) -> _XY:
        labels = rng.integers(0, spec.num_classes, num)
        pixels = rng.integers(0, 256, (num, *spec.input_shape))
        return ((templates[labels] + pixels) // 2).astype(np.uint8), labels

    return draw(_FAKE_NUM_TRAIN), draw(_FAKE_NUM_TEST)


def _standardise(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Standardises all arrays with the train statistics (see the module docstring)."""
    axes = tuple(range(train.ndim - 1)) if train.ndim == 4 else None
    mean = train.mean(axis=axes, dtype=np.float64)
    std = train.std(axis=axes, dtype=np.float64)
    return tuple(((x - mean) / std).astype(np.float32) for x in (train, *others))
