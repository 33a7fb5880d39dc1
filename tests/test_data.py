"""Tests of l2t_jax.data: builders, splits, noise, batching, augmentation, validation."""

from __future__ import annotations

import io

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import pytest
import requests
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import cifar

from l2t_jax import data
from l2t_jax.data import builders, pipeline
from l2t_jax.errors import ConfigError

# name: (num_train before the dev carve-out, num_test, input_shape, num_classes)
OFFLINE_SIZES = {
    "digits": (1497, 300, (8, 8, 1), 10),
    "mnist_5k": (4000, 1000, (28, 28, 1), 10),
    "mnist1d": (4000, 1000, (40,), 10),
    "fake_mnist": (512, 256, (28, 28, 1), 10),
    "fake_cifar10": (512, 256, (32, 32, 3), 10),
    "fake_cifar100": (512, 256, (32, 32, 3), 100),
}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """One TFDS data directory for the session, so each builder prepares once."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Makes every TFDS download fail at once, as on a machine without a network."""

    def offline(self, url):
        raise requests.ConnectionError(f"Failed to resolve the host of {url} ([Errno -2])")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", offline)


def make_config(data_dir: str, **fields) -> ml_collections.ConfigDict:
    config = dict(
        name="digits",
        data_dir=data_dir,
        dev_size=100,
        split_seed=0,
        noise_type="none",
        noise_rate=0.0,
        noise_seed=0,
        augment="none",
    )
    config.update(fields)
    return ml_collections.ConfigDict(config)


# --- Datasets ------------------------------------------------------------------------


def test_dataset_names():
    assert set(data.DATASET_NAMES) == set(OFFLINE_SIZES) | {"mnist", "cifar10", "cifar100"}


@pytest.mark.parametrize("name", sorted(OFFLINE_SIZES))
def test_offline_datasets_load_with_expected_sizes(name, data_dir):
    num_train, num_test, input_shape, num_classes = OFFLINE_SIZES[name]
    config = make_config(data_dir, name=name, dev_size=50)
    splits = data.load_splits(config)
    assert data.split_sizes(config) == {"train": num_train - 50, "dev": 50, "meta_dev": 50}

    assert (splits.name, splits.num_classes, splits.input_shape) == (
        name,
        num_classes,
        input_shape,
    )
    for split, size in [(splits.train, num_train - 50), (splits.dev, 50), (splits.test, num_test)]:
        assert split.x.shape == (size, *input_shape) and split.x.dtype == np.float32
        assert split.y.shape == split.y_clean.shape == (size,)
        assert split.y.dtype == split.y_clean.dtype == np.int32
        assert 0 <= split.y_clean.min() and split.y_clean.max() < num_classes
    # Standardised with train statistics: per channel for images, one scalar for mnist1d.
    axes = (0, 1, 2) if len(input_shape) == 3 else None
    np.testing.assert_allclose(splits.train.x.mean(axes, dtype=np.float64), 0.0, atol=1e-5)
    np.testing.assert_allclose(splits.train.x.std(axes, dtype=np.float64), 1.0, atol=1e-5)
    assert abs(splits.test.x.mean()) < 0.1


@pytest.mark.parametrize(
    "name, test_sum, test_counts",
    [
        ("digits", 5920.25, [30, 30, 30, 31, 30, 30, 30, 30, 29, 30]),
        ("mnist_5k", 25825445.0, [100] * 10),
        ("mnist1d", 51.787473, [102, 104, 89, 106, 106, 98, 99, 96, 98, 102]),
    ],
)
def test_builders_test_split_never_changes(name, test_sum, test_counts, data_dir):
    (x_train, _), (x_test, y_test) = pipeline.read_tfds(name, data_dir)
    np.testing.assert_allclose(x_test.astype(np.float64).sum(), test_sum, rtol=1e-6)
    assert np.bincount(y_test).tolist() == test_counts
    # No test example is also a train example.
    train_rows = {row.tobytes() for row in x_train}
    assert not any(row.tobytes() in train_rows for row in x_test)


def test_builder_features():
    digits = tfds.builder("digits").info
    assert digits.features["image"].shape == (8, 8, 1)
    assert digits.features["image"].np_dtype == np.float32
    mnist_5k = tfds.builder("mnist_5k").info
    assert mnist_5k.features["image"].np_dtype == np.uint8
    assert tfds.builder("mnist1d").info.supervised_keys == ("signal", "label")
    for info in (digits, mnist_5k):
        assert str(info.version) == "1.0.0" and info.citation and info.description


def test_digits_pixels_are_in_unit_interval(data_dir):
    (x, _), _ = pipeline.read_tfds("digits", data_dir)
    assert x.min() == 0.0 and x.max() == 1.0


@pytest.mark.parametrize(
    "name, shape, num_classes",
    [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100)],
)
def test_standard_names_dispatch_to_tfds_builders(name, shape, num_classes, data_dir):
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    input_key, label_key = builder.info.supervised_keys
    assert builder.info.features[input_key].shape == shape
    assert builder.info.features[label_key].num_classes == num_classes


class _Cifar10PreparedElsewhere(cifar.Cifar10, skip_registration=True):
    """TFDS's real cifar10 builder writing a few random PNG images instead of the download.

    Stands in for a data_dir where cifar10 was prepared on a machine with a network.
    """

    name = "cifar10"

    def _split_generators(self, dl_manager):
        del dl_manager
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
        return {
            "train": self._generate_examples(images[:40]),
            "test": self._generate_examples(images[40:]),
        }

    def _generate_examples(self, images):
        for i, image in enumerate(images):
            png = io.BytesIO()
            PIL.Image.fromarray(image).save(png, format="png")
            yield i, {"id": f"{i:05d}", "image": png.getvalue(), "label": i % 10}


def test_standard_dataset_reads_from_a_prepared_data_dir(tmp_path):
    _Cifar10PreparedElsewhere(
        data_dir=str(tmp_path), file_format="array_record"
    ).download_and_prepare()
    splits = data.load_splits(make_config(str(tmp_path), name="cifar10", dev_size=10))
    assert splits.input_shape == (32, 32, 3) and splits.num_classes == 10
    assert (len(splits.train.y), len(splits.dev.y), len(splits.test.y)) == (30, 10, 20)
    assert np.bincount(splits.dev.y).tolist() == [1] * 10  # Stratified dev.
    assert np.bincount(splits.test.y).tolist() == [2] * 10


def test_standard_dataset_without_network_fails_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match="network download.*config.data.data_dir") as error:
        data.load_splits(make_config(str(tmp_path), name="mnist", dev_size=10))
    assert "\n" not in str(error.value) and "ConnectionError" in str(error.value)


@pytest.mark.parametrize("name", ["fake_mnist", "fake_cifar10", "fake_cifar100"])
def test_fake_datasets_are_deterministic_and_learnable(name, data_dir):
    config = make_config(data_dir, name=name)
    splits, again = data.load_splits(config), data.load_splits(config)
    assert data.split_sizes(config)["train"] == len(splits.train.y)
    np.testing.assert_array_equal(splits.train.x, again.train.x)
    # Pixels lean towards a per-class template: class means differ clearly.
    x, y = splits.train.x.reshape(len(splits.train.y), -1), splits.train.y
    means = np.stack([x[y == c].mean(0) for c in np.unique(y)])
    assert np.abs(means[0] - means[1]).mean() > 0.3


# --- Splits --------------------------------------------------------------------------


def test_stratified_split():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    kept, held = builders.stratified_split(labels, 20, seed=3)
    assert len(held) == 20 and len(kept) == 80
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(100))
    assert np.bincount(labels[held], minlength=4).tolist() == [10, 6, 3, 1]
    same_kept, same_held = builders.stratified_split(labels, 20, seed=3)
    np.testing.assert_array_equal(held, same_held)
    assert not np.array_equal(held, builders.stratified_split(labels, 20, seed=4)[1])


def test_stratified_split_rounds_to_the_exact_size():
    labels = np.repeat(np.arange(3), [10, 10, 10])
    _, held = builders.stratified_split(labels, 7, seed=0)
    counts = np.bincount(labels[held], minlength=3)
    assert counts.sum() == 7 and counts.max() - counts.min() <= 1


def test_splits_are_deterministic_and_split_seed_changes_dev(data_dir):
    first = data.load_splits(make_config(data_dir))
    second = data.load_splits(make_config(data_dir))
    other = data.load_splits(make_config(data_dir, split_seed=1))
    for a, b in [(first.train, second.train), (first.dev, second.dev), (first.test, second.test)]:
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(first.dev.x, other.dev.x)
    np.testing.assert_array_equal(first.test.y, other.test.y)
    # The dev split is stratified: 100 of 1497 examples, 10 per class give or take one.
    assert np.ptp(np.bincount(first.dev.y)) <= 1


def test_meta_dev_is_a_stratified_part_of_dev_disjoint_from_selection(data_dir):
    whole = data.load_splits(make_config(data_dir))
    assert whole.meta_dev is whole.dev  # default: teachers read the dev split
    config = make_config(data_dir, meta_dev_size=40)
    parted = data.load_splits(config)
    assert len(parted.meta_dev.y) == 40 and len(parted.dev.y) == 60
    assert data.split_sizes(config) == {"train": len(parted.train.y), "dev": 60, "meta_dev": 40}
    np.testing.assert_array_equal(parted.train.x, whole.train.x)  # train is untouched
    rows = {tuple(x.ravel()) for x in whole.dev.x}
    meta = {tuple(x.ravel()) for x in parted.meta_dev.x}
    select = {tuple(x.ravel()) for x in parted.dev.x}
    assert meta | select == rows and not meta & select
    assert np.ptp(np.bincount(parted.meta_dev.y)) <= 1


# --- Label noise ---------------------------------------------------------------------


def test_symmetric_noise_rate_and_flips_to_another_class():
    clean = np.random.default_rng(0).integers(0, 10, 200_000)
    noisy = data.corrupt_labels(
        clean, num_classes=10, noise_type="symmetric", noise_rate=0.9, seed=1
    )
    # "Flip to another class": unchanged fraction 1 - 0.9, not 1 - 0.9 * 9 / 10.
    assert abs(np.mean(noisy == clean) - 0.1) < 0.005
    # The new class is uniform over the other nine.
    flipped_from_zero = noisy[(clean == 0) & (noisy != 0)]
    np.testing.assert_allclose(
        np.bincount(flipped_from_zero, minlength=10)[1:] / len(flipped_from_zero), 1 / 9, atol=0.01
    )


def test_pair_noise_maps_to_the_next_class():
    clean = np.random.default_rng(0).integers(0, 10, 50_000)
    noisy = data.corrupt_labels(clean, num_classes=10, noise_type="pair", noise_rate=0.3, seed=1)
    changed = noisy != clean
    assert abs(changed.mean() - 0.3) < 0.01
    np.testing.assert_array_equal(noisy[changed], (clean[changed] + 1) % 10)


@pytest.mark.parametrize("noise_type", ["symmetric", "pair"])
def test_noise_only_on_train_labels(noise_type, data_dir):
    config = make_config(data_dir, name="mnist_5k", noise_type=noise_type, noise_rate=0.4)
    noisy = data.load_splits(config)
    clean = data.load_splits(make_config(data_dir, name="mnist_5k"))
    assert abs(np.mean(noisy.train.y != noisy.train.y_clean) - 0.4) < 0.03
    np.testing.assert_array_equal(noisy.train.y_clean, clean.train.y)
    np.testing.assert_array_equal(noisy.train.x, clean.train.x)
    for split, reference in [(noisy.dev, clean.dev), (noisy.test, clean.test)]:
        np.testing.assert_array_equal(split.y, split.y_clean)
        np.testing.assert_array_equal(split.y, reference.y)


def test_noise_is_deterministic_by_noise_seed():
    clean = np.arange(1000) % 10
    kwargs = dict(num_classes=10, noise_type="symmetric", noise_rate=0.5)
    a = data.corrupt_labels(clean, seed=0, **kwargs)
    np.testing.assert_array_equal(a, data.corrupt_labels(clean, seed=0, **kwargs))
    assert not np.array_equal(a, data.corrupt_labels(clean, seed=1, **kwargs))
    assert a.dtype == np.int32


# --- Batches -------------------------------------------------------------------------


def index_split(num_examples: int) -> data.ArraySplit:
    """A split whose inputs hold each example's index, to see which examples a batch has."""
    index = np.arange(num_examples)
    return data.ArraySplit(
        x=np.repeat(index[:, None, None].astype(np.float32), 2, axis=2),
        y=(index % 7).astype(np.int32),
        y_clean=(index % 7).astype(np.int32),
    )


def test_stacked_batches_shapes_and_alignment():
    split = index_split(37)
    batches = data.stacked_batches(split, seed=0, start_step=3, num_steps=6, batch_size=5)
    assert batches["x"].shape == (6, 5, 1, 2) and batches["x"].dtype == np.float32
    assert batches["y"].shape == (6, 5) and batches["y"].dtype == np.int32
    index = batches["x"][:, :, 0, 0].astype(int)
    np.testing.assert_array_equal(batches["y"], split.y[index])


def test_stacked_batches_resume_equals_one_call():
    split = index_split(37)
    kwargs = dict(seed=5, batch_size=8)
    whole = data.stacked_batches(split, start_step=0, num_steps=10, **kwargs)
    head = data.stacked_batches(split, start_step=0, num_steps=4, **kwargs)
    tail = data.stacked_batches(split, start_step=4, num_steps=6, **kwargs)
    for key in ("x", "y"):
        np.testing.assert_array_equal(whole[key], np.concatenate([head[key], tail[key]]))
    again = data.stacked_batches(split, start_step=0, num_steps=10, **kwargs)
    np.testing.assert_array_equal(whole["x"], again["x"])
    other = data.stacked_batches(split, start_step=0, num_steps=10, seed=6, batch_size=8)
    assert not np.array_equal(whole["x"], other["x"])


def test_stacked_batches_cover_each_example_once_per_epoch():
    split = index_split(37)  # 37 is not a multiple of the batch size: batches span epochs.
    batches = data.stacked_batches(split, seed=1, start_step=0, num_steps=15, batch_size=5)
    stream = batches["x"][:, :, 0, 0].astype(int).reshape(-1)  # 75 positions: 2 epochs + 1.
    for epoch in range(2):
        np.testing.assert_array_equal(np.sort(stream[37 * epoch : 37 * (epoch + 1)]), np.arange(37))
    assert not np.array_equal(stream[:37], stream[37:74])  # A new order each epoch.


def test_stacked_batches_rejects_a_batch_larger_than_the_split():
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 37\].*got 38"):
        data.stacked_batches(index_split(37), seed=0, start_step=0, num_steps=1, batch_size=38)


# --- Augmentation --------------------------------------------------------------------


def test_augment_none_is_identity():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    assert data.augment_batch(jax.random.PRNGKey(0), x, "none") is x


def test_augment_cifar_crops_shifts_of_the_padded_image_and_flips():
    batch, size = 64, 8
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3))
    augment = jax.jit(chex.assert_max_traces(data.augment_batch, n=1), static_argnames="kind")
    out = np.asarray(augment(jax.random.PRNGKey(1), x, kind="cifar"))
    augment(jax.random.PRNGKey(2), x, kind="cifar")  # No retrace for a new key.
    assert out.shape == x.shape and out.dtype == x.dtype

    padded = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)))
    matches = []  # (dy, dx, flipped) of each example's crop.
    for image, source in zip(out, padded, strict=True):
        found = [
            (dy, dx, flipped)
            for dy in range(9)
            for dx in range(9)
            for flipped in (False, True)
            if np.array_equal(
                image, source[dy : dy + size, dx : dx + size][:, :: -1 if flipped else 1]
            )
        ]
        assert len(found) == 1, "every output is exactly one (flipped) window of the padding"
        matches.append(found[0])
    dys, dxs, flips = map(np.array, zip(*matches, strict=True))
    assert 0.25 < flips.mean() < 0.75
    assert len(set(zip(dys, dxs, strict=True))) > 20  # Offsets vary per example.


# --- Validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(name="imagenet"), r"unknown config.data.name 'imagenet'; choose one of \('digits'"),
        (dict(dev_size=1497), r"dev_size must be an integer in \[1, 1497\) for digits"),
        (dict(dev_size=0), r"dev_size must be an integer in \[1, 1497\)"),
        (dict(dev_size=None), r"dev_size .* got None"),
        (dict(noise_type="uniform"), r"unknown config.data.noise_type 'uniform'; choose one of"),
        (dict(noise_type="symmetric", noise_rate=1.0), r"noise_rate must be a number in \[0, 1\)"),
        (dict(noise_type="pair", noise_rate=-0.1), r"noise_rate must be a number in \[0, 1\)"),
        (dict(noise_rate=0.2), r"noise_type is 'none'; set noise_type to 'symmetric' or 'pair'"),
        (dict(augment="autoaugment"), r"unknown config.data.augment 'autoaugment'; choose one"),
        (dict(name="mnist1d", augment="cifar"), r"needs \(H, W, C\) images .* set it to 'none'"),
        (dict(split_seed=-1), r"config.data.split_seed must be an integer >= 0"),
        (dict(dev_size=100, meta_dev_size=100), r"meta_dev_size must be an integer in \[0, dev"),
        (dict(noise_rte=0.2), r"unknown config.data field\(s\) \['noise_rte'\]"),
    ],
)
def test_validate_data_config_errors(fields, message):
    with pytest.raises(ValueError, match=message) as error:
        data.validate_data_config(make_config("/nonexistent", **fields))
    assert isinstance(error.value, ConfigError) and "\n" not in str(error.value)


def test_validate_data_config_accepts_defaults_for_optional_fields():
    data.validate_data_config(ml_collections.ConfigDict(dict(name="cifar10", dev_size=5000)))
