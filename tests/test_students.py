"""Tests for l2t_jax.students: parameter counts, shapes, dtypes, BatchNorm, errors.

Variables come from `_variables` (host-drawn numbers in the shapes `init` produces) and
all forward passes go through one jitted `_apply`, so each (student, mode, input shape)
compiles once.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from l2t_jax.errors import ConfigError
from l2t_jax.students import STUDENT_NAMES, build_student, count_params
from l2t_jax.students._layers import conv_no_bias

MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)
NUM_CLASSES = 7  # not 10, so a hard-coded class count cannot pass

# One small configuration of every student with its natural input (without batch axis).
SMALL = {
    "mlp": ({"hidden": (32, 16)}, (784,)),
    "lenet5": ({"batch_norm": True}, MNIST),
    "resnet_he": ({"depth": 8}, CIFAR),
    "resnet_wide": ({"depth": 8}, CIFAR),
    "wrn": ({"depth": 10, "widen_factor": 1}, CIFAR),
    "cnn1d": ({}, (40,)),
}
BATCH_NORM_STUDENTS = ("lenet5", "resnet_he", "resnet_wide", "wrn")


def _student(name, num_classes=NUM_CLASSES, **fields):
    config = ml_collections.ConfigDict({"name": name, **fields})
    return build_student(config, num_classes)


def _inputs(shape, batch=4, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, *shape)).astype(np.float32)


def _variables(model, x, seed=0):
    """Random variables of `model` for inputs like `x`, drawn on the host.

    Real `init` compiles a threefry sampler per kernel shape (seconds per model on 2
    CPU cores). `jax.eval_shape(model.init, ...)` still runs all of init's code and
    fixes every shape, dtype and collection; numpy supplies the numbers. Kernels get
    variance 1/fan_in; vectors (biases, BN affine, running statistics) are uniform in
    [0.5, 1.5], so running variances stay positive.
    """
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) > 1:
            values = rng.normal(size=leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
        else:
            values = rng.uniform(0.5, 1.5, size=leaf.shape)
        return jnp.asarray(values, leaf.dtype)

    return jax.tree.map(draw, abstract)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, variables, x, train=False, rngs=None):
    """Returns logits and the `batch_stats` after the call ({} without BatchNorm)."""
    return model.apply(variables, x, train=train, mutable=["batch_stats"], rngs=rngs)


@pytest.mark.parametrize(
    "name, fields, input_shape, expected",
    [
        ("mlp", {}, (784,), 784 * 128 + 128 + 128 * 10 + 10),
        (
            "mlp",
            {"hidden": (32, 16)},
            (8, 8),
            64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10,
        ),
        ("lenet5", {}, MNIST, 431_080),
        # L2T-DLN's MNIST LeNet: BN after both convs, FC 800 then FC 500.
        ("lenet5", {"batch_norm": True, "fc_hidden": (800, 500)}, MNIST, 1_072_020),
        ("resnet_he", {"depth": 8}, CIFAR, 75_290),
        ("resnet_he", {"depth": 20}, CIFAR, 269_722),
        ("resnet_he", {"depth": 32}, CIFAR, 464_154),
        ("resnet_wide", {"depth": 8}, CIFAR, 1_235_274),
        ("resnet_wide", {"depth": 20}, CIFAR, 4_335_434),
        ("resnet_wide", {"depth": 32}, CIFAR, 7_435_594),
        ("wrn", {"depth": 16, "widen_factor": 1}, CIFAR, 175_066),
        ("wrn", {"depth": 16, "widen_factor": 2}, CIFAR, 691_674),
        ("wrn", {"depth": 40, "widen_factor": 1}, CIFAR, 563_930),
        ("wrn", {"depth": 40, "widen_factor": 2}, CIFAR, 2_243_546),
        # Conv k5 (150) + two conv k3 (1,900 each) + linear 125 -> 10 (1,260).
        ("cnn1d", {}, (40,), 5_210),
    ],
)
def test_parameter_count(name, fields, input_shape, expected):
    model = _student(name, num_classes=10, **fields)
    variables = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, *input_shape))
    )
    assert count_params(variables["params"]) == expected


def test_count_params_counts_elements_of_every_leaf():
    tree = {
        "a": jnp.zeros((2, 3)),
        "b": [jnp.zeros(4), jax.ShapeDtypeStruct((5,), "f4")],
    }
    assert count_params(tree) == 15


def test_student_names():
    expected = ("mlp", "lenet5", "resnet_he", "resnet_wide", "wrn", "cnn1d")
    assert STUDENT_NAMES == expected
    assert set(SMALL) == set(STUDENT_NAMES)


def test_resnet_convs_use_he_normal_fan_out_init():
    conv = conv_no_bias(64, 3, 1, jnp.float32)
    kernel = conv.init(jax.random.key(0), jnp.zeros((1, 8, 8, 64)))["params"]["kernel"]
    assert kernel.shape == (3, 3, 64, 64)
    np.testing.assert_allclose(np.std(kernel), math.sqrt(2 / (3 * 3 * 64)), rtol=0.02)
    assert np.abs(kernel).max() > 3 * math.sqrt(2 / (3 * 3 * 64))  # untruncated


@pytest.mark.parametrize(
    "name, fields, input_shape",
    [(name, *SMALL[name]) for name in STUDENT_NAMES]
    + [("mlp", {}, (8, 8)), ("lenet5", {}, MNIST)],
)
def test_logits_shape_on_natural_input(name, fields, input_shape):
    model = _student(name, **fields)
    x = _inputs(input_shape)
    logits, _ = _apply(model, _variables(model, x), x)
    assert logits.shape == (4, NUM_CLASSES)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert np.ptp(logits) > 0


@pytest.mark.parametrize(
    "name, fields, channelled",
    [("lenet5", {"batch_norm": True}, MNIST), ("resnet_he", {"depth": 8}, (32, 32, 1))],
)
def test_grayscale_images_get_a_channel_axis(name, fields, channelled):
    model = _student(name, **fields)
    x = _inputs(channelled)
    variables = _variables(model, x)
    bare, _ = _apply(model, variables, x[..., 0])
    np.testing.assert_allclose(bare, _apply(model, variables, x)[0], rtol=1e-6)


def test_cnn1d_accepts_signals_with_or_without_channel_axis():
    model = _student("cnn1d")
    x = _inputs((40,))
    variables = _variables(model, x)
    np.testing.assert_allclose(
        _apply(model, variables, x[..., None])[0],
        _apply(model, variables, x)[0],
        rtol=1e-6,
    )


@pytest.mark.parametrize("name", STUDENT_NAMES)
def test_float64_params_stats_and_logits(name, x64):
    fields, input_shape = SMALL[name]
    model = _student(name, dtype="float64", **fields)
    x = _inputs(input_shape)  # float32: the student must compute in its own dtype
    variables = _variables(model, x)
    # A train step must keep every leaf float64, or a scanned unroll's carry changes.
    logits, updates = _apply(model, variables, x, train=True)
    leaves = jax.tree.leaves((variables, updates))
    assert ("batch_stats" in updates) == (name in BATCH_NORM_STUDENTS)
    assert [leaf.dtype for leaf in leaves] == [jnp.float64] * len(leaves)
    assert logits.dtype == jnp.float64


@pytest.mark.parametrize("name", BATCH_NORM_STUDENTS)
def test_batch_norm_train_and_eval_modes(name):
    fields, input_shape = SMALL[name]
    model = _student(name, **fields)
    x = _inputs(input_shape)
    # Same first example, different rest of the batch.
    x_other = np.concatenate([x[:1], _inputs(input_shape, batch=3, seed=1)])
    variables = _variables(model, x)
    stats = jax.tree.leaves(variables["batch_stats"])

    train_logits, train_updates = _apply(model, variables, x, train=True)
    train_other, _ = _apply(model, variables, x_other, train=True)
    eval_logits, eval_updates = _apply(model, variables, x)
    eval_other, _ = _apply(model, variables, x_other)

    # Train mode moves every running mean and variance; eval mode leaves them alone.
    train_stats = jax.tree.leaves(train_updates["batch_stats"])
    assert len(train_stats) == len(stats) > 0
    assert all(not np.allclose(new, old) for new, old in zip(train_stats, stats))
    for new, old in zip(jax.tree.leaves(eval_updates["batch_stats"]), stats):
        np.testing.assert_array_equal(new, old)
    # Eval normalises with running statistics, so an example's logits ignore the batch;
    # train normalises with batch statistics, so they do not.
    np.testing.assert_allclose(eval_other[0], eval_logits[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(train_other[0], train_logits[0], rtol=1e-3)


def test_wrn_dropout_only_in_train_mode():
    fields, input_shape = SMALL["wrn"]
    model = _student("wrn", **fields, dropout_rate=0.5)
    no_dropout = _student("wrn", **fields)
    x = _inputs(input_shape)
    variables = _variables(model, x)

    def train_logits(seed):
        return _apply(model, variables, x, True, {"dropout": jax.random.key(seed)})[0]

    assert not np.allclose(train_logits(1), train_logits(2))
    # Eval needs no rng and matches the same network without dropout.
    np.testing.assert_array_equal(
        _apply(model, variables, x)[0], _apply(no_dropout, variables, x)[0]
    )


def test_mlp_activation_is_applied():
    x = _inputs((784,))
    logits = {}
    for activation in ("relu", "tanh", "gelu"):
        model = _student("mlp", activation=activation)
        logits[activation] = _apply(model, _variables(model, x), x)[0]
    assert not np.allclose(logits["relu"], logits["tanh"])
    assert not np.allclose(logits["relu"], logits["gelu"])


@pytest.mark.parametrize(
    "fields, expected",
    [
        (
            {"name": "resnet"},
            (
                "unknown student 'resnet' (config.student.name); choose one of: "
                "mlp, lenet5, resnet_he, resnet_wide, wrn, cnn1d"
            ),
        ),
        ({"name": "resnet_he", "depth": 21}, "resnet_he depth 21 is not 6n+2"),
        ({"name": "resnet_wide", "depth": 2}, "resnet_wide depth 2 is not 6n+2"),
        ({"name": "wrn", "depth": 15}, "wrn depth 15 is not 6n+4"),
        ({"name": "wrn", "widen_factor": 0}, "(config.student.widen_factor)"),
        ({"name": "wrn", "dropout_rate": 1.0}, "(config.student.dropout_rate)"),
        ({"name": "mlp", "activation": "swish"}, "(config.student.activation)"),
        ({"name": "mlp", "dtype": "bfloat16"}, "(config.student.dtype)"),
    ],
)
def test_misconfiguration_raises_one_line_config_error(fields, expected):
    with pytest.raises(ConfigError) as error:  # a ValueError the launchers print
        build_student(ml_collections.ConfigDict(fields), 10)
    message = str(error.value)
    assert expected in message
    assert "\n" not in message
