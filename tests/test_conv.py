"""Tests for the scan-friendly convolution in l2t_jax.students._layers.

`conv_general_dilated` / `Conv` must equal `lax.conv_general_dilated` /
`flax.linen.Conv` in values and in first- and second-order derivatives (float64,
tight tolerance), ungrouped and with feature groups (depthwise, grouped), and every
convolution XLA compiles for a meta-gradient through `lax.scan` must be channel-last
and ungrouped (the property that makes it fast on CPU).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from l2t_jax.students._layers import Conv, conv_general_dilated

# (input shape, kernel shape, strides, padding, lhs dilation, rhs dilation, groups)
CASES = {
    "1d_stride1_valid": ((2, 9, 3), (3, 3, 4), (1,), "VALID", None, None, 1),
    "1d_stride2_pad1": ((2, 9, 3), (5, 3, 4), (2,), ((1, 1),), None, None, 1),
    "2d_stride1_valid": ((2, 7, 6, 2), (3, 3, 2, 3), (1, 1), "VALID", None, None, 1),
    "2d_stride2_pad": (
        (2, 8, 7, 2),
        (3, 3, 2, 3),
        (2, 2),
        ((1, 1), (1, 0)),
        None,
        None,
        1,
    ),
    "2d_same_kernel_dilated": (
        (2, 6, 7, 2),
        (3, 2, 2, 3),
        (2, 1),
        "SAME",
        None,
        (2, 1),
        1,
    ),
    "2d_input_dilated": (
        (2, 4, 5, 2),
        (3, 3, 2, 3),
        (1, 2),
        ((2, 1), (0, 2)),
        (2, 1),
        None,
        1,
    ),
    # Kernel window larger than the input: the operand-swapped form.
    "1d_kernel_wider_than_input": (
        (2, 3, 2),
        (6, 2, 3),
        (1,),
        ((5, 4),),
        None,
        None,
        1,
    ),
    # Feature groups: depthwise (one input channel per group) and grouped.
    "2d_depthwise_stride2_pad1": (
        (2, 7, 6, 4),
        (3, 3, 1, 4),
        (2, 2),
        ((1, 1), (1, 1)),
        None,
        None,
        4,
    ),
    "2d_grouped_same_kernel_dilated": (
        (2, 6, 7, 4),
        (3, 2, 2, 6),
        (2, 1),
        "SAME",
        None,
        (2, 1),
        2,
    ),
    "2d_grouped_input_dilated": (
        (2, 4, 5, 4),
        (3, 3, 2, 4),
        (1, 2),
        ((2, 1), (0, 2)),
        (2, 1),
        None,
        2,
    ),
    # 64 channels: more than one chunk (l2t_jax.students._layers._CHUNK_CHANNELS), of
    # several groups each (depthwise, channel multiplier 2) or of one group each (two
    # 32-channel groups).
    "1d_depthwise_chunked": ((1, 6, 64), (3, 1, 128), (1,), ((1, 1),), None, None, 64),
    "1d_grouped_chunk_per_group": ((1, 5, 64), (3, 32, 4), (2,), "SAME", None, None, 2),
}
DIMS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}


def _conv_fns(case):
    x_shape, k_shape, strides, padding, lhs_dilation, rhs_dilation, groups = CASES[case]
    dims = DIMS[len(k_shape) - 2]

    def make(conv):
        def f(x, kernel):
            return conv(
                x,
                kernel,
                strides,
                padding,
                lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation,
                dimension_numbers=dims,
                feature_group_count=groups,
            )

        return f

    return make(lax.conv_general_dilated), make(conv_general_dilated), x_shape, k_shape


def _derivatives(conv, weights, x, kernel):
    """(y, first-order grads in x and kernel, grads of a function of those grads)."""

    def inner(x, kernel):
        return jnp.sum(jnp.tanh(conv(x, kernel)) * weights)

    def outer(x, kernel):
        gx, gk = jax.grad(inner, (0, 1))(x, kernel)
        return jnp.sum(jnp.sin(gx)) + jnp.sum(gk**2) + inner(x - gx, kernel - gk)

    return (
        conv(x, kernel),
        jax.grad(inner, (0, 1))(x, kernel),
        jax.grad(outer, (0, 1))(x, kernel),
    )


def _compare(case, dtype, rtol, seed=0):
    reference, ours, x_shape, k_shape = _conv_fns(case)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=x_shape), dtype)
    kernel = jnp.asarray(rng.normal(size=k_shape), dtype)
    weights = jnp.asarray(rng.normal(size=reference(x, kernel).shape), dtype)

    @jax.jit  # one compilation for both
    def both(x, kernel):
        return (
            _derivatives(ours, weights, x, kernel),
            _derivatives(reference, weights, x, kernel),
        )

    actual, expected = both(x, kernel)
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.shape == e.shape and a.dtype == dtype
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("case", list(CASES))
def test_values_and_derivatives_match_lax(case, x64):
    _compare(case, jnp.float64, rtol=1e-12)


@pytest.mark.parametrize("case", ["2d_stride2_pad", "2d_depthwise_stride2_pad1"])
def test_float32_matches_lax(case):
    _compare(case, jnp.float32, rtol=1e-4, seed=1)


def test_other_layouts_are_passed_to_lax():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)  # NCW
    kernel = jnp.asarray(rng.normal(size=(4, 3, 3)), jnp.float32)  # OIW
    args = ((1,), "VALID")
    np.testing.assert_array_equal(
        conv_general_dilated(x, kernel, *args),
        lax.conv_general_dilated(x, kernel, *args),
    )


def test_batch_groups_are_passed_to_lax():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4)), jnp.float32)
    args = ((1,), "VALID")
    kwargs = {"dimension_numbers": ("NWC", "WIO", "NWC"), "batch_group_count": 2}
    np.testing.assert_array_equal(
        conv_general_dilated(x, kernel, *args, **kwargs),
        lax.conv_general_dilated(x, kernel, *args, **kwargs),
    )


def test_groups_that_do_not_divide_the_channels_raise_lax_error():
    x = jnp.zeros((2, 6, 3))
    kernel = jnp.zeros((3, 1, 4))  # 3 groups of 1 input channel, but 4 outputs
    with pytest.raises(ValueError, match="feature_group_count"):
        conv_general_dilated(
            x,
            kernel,
            (1,),
            "VALID",
            dimension_numbers=("NWC", "WIO", "NWC"),
            feature_group_count=3,
        )


@pytest.mark.parametrize(
    "input_shape, kwargs",
    [
        ((2, 11, 1), {"kernel_size": (5,), "strides": 2, "padding": 1}),
        ((2, 9, 9, 3), {"kernel_size": (3, 3), "strides": 2, "use_bias": False}),
        # Depthwise (4 groups of one channel) and grouped (2 groups of 2).
        ((2, 11, 4), {"kernel_size": (3,), "padding": 1, "feature_group_count": 4}),
        (
            (2, 9, 9, 4),
            {
                "kernel_size": (3, 3),
                "strides": 2,
                "padding": 1,
                "feature_group_count": 2,
            },
        ),
    ],
)
def test_module_is_a_drop_in_for_flax_conv(input_shape, kwargs):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=input_shape), jnp.float32)
    ours, flax_conv = Conv(4, **kwargs), nn.Conv(4, **kwargs)
    # Same parameter names, shapes and dtypes (and initialisers: `Conv` is an
    # `nn.Conv` with another convolution function).
    abstract = jax.eval_shape(ours.init, jax.random.key(0), x)
    assert abstract == jax.eval_shape(flax_conv.init, jax.random.key(0), x)
    variables = jax.tree.map(
        lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), abstract
    )
    np.testing.assert_allclose(
        ours.apply(variables, x), flax_conv.apply(variables, x), rtol=1e-5, atol=1e-5
    )


class _TinyNet(nn.Module):
    """Two convolutions (the second strided and padded) and a linear read-out.

    `features` and `groups` are the two convolutions' output channels and feature group
    counts.
    """

    conv: type[nn.Module]
    kernel_size: tuple[int, ...]
    features: tuple[int, int] = (3, 4)
    groups: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        def conv(layer, **kwargs):
            return self.conv(
                self.features[layer],
                self.kernel_size,
                feature_group_count=self.groups[layer],
                dtype=x.dtype,
                param_dtype=x.dtype,
                **kwargs,
            )

        x = nn.relu(conv(0, padding="VALID")(x))
        x = nn.tanh(conv(1, strides=2, padding=1)(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(5, dtype=x.dtype, param_dtype=x.dtype)(x)


# Depthwise with a channel multiplier of 2 (2 input channels, 2 groups, 4 outputs), then
# 2 groups of 2 channels.
GROUPED = {"features": (4, 4), "groups": (2, 2)}


def _meta_gradient_fn(model):
    """d(val loss after 2 SGD steps in `lax.scan`) / d(log learning rate)."""

    def loss(params, x, y):
        logits = model.apply({"params": params}, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    def val_loss(log_lr, params, xs, ys, val_x, val_y):
        def step(p, batch):
            grads = jax.grad(loss)(p, *batch)
            return jax.tree.map(lambda w, g: w - jnp.exp(log_lr) * g, p, grads), None

        final, _ = lax.scan(step, params, (xs, ys))
        return loss(final, val_x, val_y)

    return jax.jit(jax.value_and_grad(val_loss))


def _meta_problem(model, input_shape, dtype, seed=4):
    """Parameters (host-drawn, in the shapes `init` gives) and data for 2 SGD steps."""
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.normal(size=(2, 3, *input_shape)), dtype)
    ys = jnp.asarray(rng.integers(0, 5, size=(2, 3)))
    val_x = jnp.asarray(rng.normal(size=(4, *input_shape)), dtype)
    val_y = jnp.asarray(rng.integers(0, 5, size=(4,)))
    # Real `init` would compile a sampler per parameter shape; numpy is instant.
    abstract = jax.eval_shape(model.init, jax.random.key(0), val_x)["params"]
    params = jax.tree.map(
        lambda a: jnp.asarray(0.5 * rng.normal(size=a.shape), a.dtype), abstract
    )
    return params, xs, ys, val_x, val_y


def _conv_labels(compiled):
    """Dimension labels of every convolution in a compiled function."""
    return re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", compiled.as_text())


def _assert_finite_difference(meta, args, grad, eps=1e-5):
    """Checks d value / d args[0] against central finite differences."""
    assert abs(grad) > 1e-3
    value_up, _ = meta(args[0] + eps, *args[1:])
    value_down, _ = meta(args[0] - eps, *args[1:])
    np.testing.assert_allclose(grad, (value_up - value_down) / (2 * eps), rtol=1e-6)


@pytest.mark.parametrize("grouping", [{}, GROUPED], ids=["ungrouped", "grouped"])
def test_meta_gradient_through_scan_matches_flax_conv(grouping, x64):
    ours = _TinyNet(Conv, (3,), **grouping)
    flax_net = _TinyNet(nn.Conv, (3,), **grouping)
    args = (jnp.float64(np.log(0.3)), *_meta_problem(ours, (12, 2), jnp.float64))
    meta = _meta_gradient_fn(ours).lower(*args).compile()
    flax_meta = _meta_gradient_fn(flax_net).lower(*args).compile()
    value, grad = meta(*args)
    expected_value, expected_grad = flax_meta(*args)
    np.testing.assert_allclose(value, expected_value, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10)
    _assert_finite_difference(meta, args, grad)
    # The property that makes it fast: inside the scan's while loop, XLA:CPU runs only
    # channel-last convolutions on its fast kernels (it canonicalises others only
    # outside loops, jax-ml/jax#12868). Flax's conv leaves permuted labels there.
    # Grouped convolutions are slow everywhere on XLA:CPU; ours leaves none.
    assert set(_conv_labels(meta)) == {"b0f_0io->b0f"}
    assert "group_count" not in meta.as_text()
    assert set(_conv_labels(flax_meta)) - {"b0f_0io->b0f"}


def test_2d_meta_gradient_through_scan_is_exact_and_channel_last(x64):
    # Derivatives of 2-D convolutions against lax: test_values_and_derivatives_match_lax.
    model = _TinyNet(Conv, (3, 3))
    args = (jnp.float64(np.log(0.3)), *_meta_problem(model, (9, 8, 2), jnp.float64))
    meta = _meta_gradient_fn(model).lower(*args).compile()
    _assert_finite_difference(meta, args, meta(*args)[1])
    assert set(_conv_labels(meta)) == {"b01f_01io->b01f"}
