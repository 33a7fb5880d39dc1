"""Tests for Moonshine's cheap convolutions (`l2t_jax.students.cheap`) and `count_flops`.

Parameter counts come from `jax.eval_shape` of `init` (nothing is computed); forward
passes run tiny students (WRN-10-1 on 8x8 inputs) with host-drawn variables.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_students import _variables

from l2t_jax.errors import ConfigError
from l2t_jax.students import build_student, cheap, count_flops, count_macs, count_params

CIFAR = (32, 32, 3)


def _student(name, num_classes=10, **fields):
    return build_student(ml_collections.ConfigDict({"name": name, **fields}), num_classes)


def _abstract_variables(model, input_shape):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *input_shape)))


@functools.partial(jax.jit, static_argnames=("model",))
def _apply(model, variables, x):
    return model.apply(variables, x, mutable=["intermediates"])


# WRN-40-2 on CIFAR-10 as counted by the Moonshine code (BatchNorm affine counted), by
# its class names, and the plain WRNs it distils into.
MOONSHINE_WRN_40_2 = {
    "Conv": 2_243_546,
    "ConvB2": 856_538,
    "ConvB4": 292_058,
    "G2B2": 300_122,
    "G4B2": 324_314,
    "G8B2": 372_698,
    "G16B2": 469_466,
    "G2B4": 159_002,
    "G8B4": 195_290,
    "A2B2": 566_234,
    "A16B2": 312_218,
    "DConv": 293_514,
    "DConvG2": 316_698,
    "DConvG8": 455_802,
    "DConvG16": 641_274,
    "DConvB2": 288_026,
    "DConvB4": 152_954,
}
CANONICAL = {
    "Conv": "conv",
    "ConvB2": "b2",
    "ConvB4": "b4",
    "G2B2": "g2b2",
    "G4B2": "g4b2",
    "G8B2": "g8b2",
    "G16B2": "g16b2",
    "G2B4": "g2b4",
    "G8B4": "g8b4",
    "A2B2": "a2b2",
    "A16B2": "a16b2",
    "DConv": "dconv",
    "DConvG2": "dconv_g2",
    "DConvG8": "dconv_g8",
    "DConvG16": "dconv_g16",
    "DConvB2": "dconv_b2",
    "DConvB4": "dconv_b4",
    "DConvA4": "dconv_a4",
}


@pytest.mark.parametrize("moonshine_name", MOONSHINE_WRN_40_2)
def test_wrn_40_2_parameter_counts_match_moonshine(moonshine_name):
    model = _student("wrn", depth=40, widen_factor=2, conv=CANONICAL[moonshine_name])
    variables = _abstract_variables(model, CIFAR)
    assert count_params(variables["params"]) == MOONSHINE_WRN_40_2[moonshine_name]


@pytest.mark.parametrize(
    "depth, widen_factor, expected",
    [(16, 1, 175_066), (16, 2, 691_674), (40, 1, 563_930)],
)
def test_plain_reference_students_match_moonshine(depth, widen_factor, expected):
    model = _student("wrn", depth=depth, widen_factor=widen_factor, conv="conv")
    assert count_params(_abstract_variables(model, CIFAR)["params"]) == expected


def test_resnet_he_takes_the_same_blocks():
    # ResNet-8 (16-32-64), every 3x3 of the blocks a DConv: C_in * 9 + 2 C_in (BN) +
    # C_in * C_out per conv, over (16,16) (16,16) (16,32) (32,32) (32,64) (64,64):
    # 432 + 432 + 688 + 1,376 + 2,400 + 4,800 = 10,128. The rest as in the plain
    # network: stem 432 + BN 32, the blocks' BNs 448, classifier 650.
    model = _student("resnet_he", depth=8, conv="dconv")
    assert count_params(_abstract_variables(model, CIFAR)["params"]) == 11_690


@pytest.mark.parametrize(
    "alias, canonical", [*CANONICAL.items(), ("dconvg8", "dconv_g8"), ("convb4", "b4")]
)
def test_moonshine_names_are_aliases(alias, canonical):
    assert cheap.parse(alias).name == canonical
    assert cheap.parse(canonical).name == canonical
    assert _student("wrn", depth=10, widen_factor=2, conv=alias).conv == canonical


def test_plain_conv_keeps_the_parameter_tree():
    # The names the students had before `conv` existed: checkpoints stay loadable.
    for fields in ({}, {"conv": "conv"}):
        params = _abstract_variables(_student("wrn", depth=10, **fields), (8, 8, 3))
        assert set(params["params"]["PreActBlock_1"]) == {
            "BatchNorm_0", "BatchNorm_1", "Conv_0", "Conv_1", "Conv_2"
        }
        params = _abstract_variables(_student("resnet_wide", depth=8, **fields), CIFAR)
        assert set(params["params"]["BasicBlock_1"]) == {
            "Conv_0", "Conv_1", "Conv_2", "BatchNorm_0", "BatchNorm_1", "BatchNorm_2"
        }


# One spec per block family; kernels of the second PreActBlock of WRN-10-1 (16 -> 32
# channels, stride 2): its two cheap convs map 16 -> 32 and 32 -> 32. Shapes are
# (3, 3, channels / groups, channels) for the spatial conv.
FAMILIES = {
    "conv": None,
    "dconv": {"spatial": [(3, 3, 1, 16), (3, 3, 1, 32)],
              "pointwise": [(1, 1, 16, 32), (1, 1, 32, 32)]},
    # 4 channels per group: 4 and 8 groups.
    "dconv_g4": {"spatial": [(3, 3, 4, 16), (3, 3, 4, 32)]},
    # 2 groups: 8 and 16 channels per group.
    "dconv_a2": {"spatial": [(3, 3, 8, 16), (3, 3, 16, 32)]},
    "b2": {"reduce": [(1, 1, 16, 16), (1, 1, 32, 16)], "spatial": [(3, 3, 16, 16)] * 2,
           "expand": [(1, 1, 16, 32)] * 2},
    "g4b2": {"spatial": [(3, 3, 4, 16)] * 2},
    "a2b4": {"reduce": [(1, 1, 16, 8), (1, 1, 32, 8)], "spatial": [(3, 3, 4, 8)] * 2},
    "dconv_b2": {"spatial": [(3, 3, 1, 16)] * 2},
}


@pytest.mark.parametrize("conv", FAMILIES)
def test_tiny_forward_pass_and_grouped_kernels(conv):
    model = _student("wrn", depth=10, widen_factor=1, conv=conv)
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    variables = _variables(model, x)
    logits, state = _apply(model, variables, x)
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(logits))
    # Attention transfer's activations are where they were.
    sown = {k: v[0].shape for k, v in state["intermediates"].items()}
    assert sown == {"group_1": (2, 8, 8, 16), "group_2": (2, 4, 4, 32),
                    "group_3": (2, 2, 2, 64)}

    block = variables["params"]["PreActBlock_1"]
    if FAMILIES[conv] is None:
        assert block["Conv_1"]["kernel"].shape == (3, 3, 16, 32)
        assert not any(name.startswith("CheapConv") for name in block)
        return
    assert set(block) == {"BatchNorm_0", "BatchNorm_1", "Conv_0", "CheapConv_0",
                          "CheapConv_1"}
    assert block["Conv_0"]["kernel"].shape == (1, 1, 16, 32)  # full shortcut
    for layer, shapes in FAMILIES[conv].items():
        got = [block[f"CheapConv_{i}"][layer]["kernel"].shape for i in range(2)]
        assert got == shapes, layer


def test_resnet_forward_pass_with_cheap_blocks():
    model = _student("resnet_he", depth=8, conv="g8b2")
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)
    variables = _variables(model, x)
    logits, state = _apply(model, variables, x)
    assert logits.shape == (2, 10)
    assert np.all(np.isfinite(logits))
    assert state["intermediates"]["group_3"][0].shape == (2, 2, 2, 64)
    # 64 output channels -> 32-channel bottleneck in 4 groups of 8.
    spatial = variables["params"]["BasicBlock_2"]["CheapConv_1"]["spatial"]["kernel"]
    assert spatial.shape == (3, 3, 8, 32)


@pytest.mark.parametrize(
    "conv", ["", "Conv3", "b0", "g2", "dconv_c2", "G8B", "gb2", "b-2", None, 3]
)
@pytest.mark.parametrize("name", ["wrn", "resnet_he"])
def test_bad_conv_string_is_a_one_line_config_error(name, conv):
    with pytest.raises(ConfigError) as error:
        _student(name, conv=conv)
    message = str(error.value)
    assert "config.student.conv" in message
    assert "dconv_g<N>" in message and "a<N>b<M>" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "name, fields, conv",
    [
        ("wrn", {"depth": 16}, "g16b4"),  # 4-channel bottleneck in groups of 16
        ("wrn", {"depth": 16}, "a16b2"),  # 8-channel bottleneck in 16 groups
        ("wrn", {"depth": 16}, "b3"),  # 16 channels / 3
        ("resnet_he", {"depth": 8}, "dconv_a3"),  # 16 input channels in 3 groups
        ("resnet_he", {"depth": 8}, "dconv_g32"),  # 16 input channels, 32 per group
    ],
)
def test_conv_that_does_not_divide_the_widths_is_a_config_error(name, fields, conv):
    with pytest.raises(ConfigError, match=r"config\.student\.conv.*does not fit"):
        _student(name, conv=conv, **fields)


@pytest.mark.parametrize("name", ["mlp", "cnn1d", "lenet5"])
def test_conv_on_a_student_without_residual_blocks_is_a_config_error(name):
    with pytest.raises(ConfigError, match=r"has no residual blocks for config\.student\.conv"):
        build_student(ml_collections.ConfigDict({"name": name, "conv": "dconv"}), 10)
    build_student(ml_collections.ConfigDict({"name": name, "conv": "conv"}), 10)


def test_count_macs_counts_kernels_at_every_output_position():
    x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32)
    for groups in (1, 2):
        conv = nn.Conv(8, (3, 3), padding=1, feature_group_count=groups)
        variables = jax.eval_shape(conv.init, jax.random.key(0), x)
        assert count_macs(conv, variables, x) == 8 * 8 * 3 * 3 * (4 // groups) * 8
    # WRN-40-2 on CIFAR: the 328M multiply-adds the Moonshine paper reports for it; the
    # depthwise-separable student's grouped 3x3s count 1 / channels of a plain one.
    counts = {}
    for conv in ("conv", "dconv"):
        model = _student("wrn", depth=40, widen_factor=2, conv=conv)
        cifar = jax.ShapeDtypeStruct((1, *CIFAR), jnp.float32)
        counts[conv] = count_macs(model, _abstract_variables(model, CIFAR), cifar)
    assert counts["conv"] == pytest.approx(328e6, rel=2e-3)
    assert counts["dconv"] < counts["conv"] / 5


def test_count_flops_of_a_dense_layer():
    model = nn.Dense(7)
    x = jax.ShapeDtypeStruct((4, 5), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    # Per example: 5 * 7 multiply-adds and 7 bias additions.
    assert count_flops(model, variables, x) == pytest.approx(2 * 5 * 7 + 7, rel=0.1)


@pytest.mark.parametrize("groups", [1, 4])
def test_count_flops_counts_grouped_convolutions(groups):
    model = nn.Conv(32, (3, 3), padding="VALID", feature_group_count=groups, use_bias=False)
    x = jax.ShapeDtypeStruct((2, 8, 8, 16), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    expected = 2 * 6 * 6 * 9 * 16 * 32 / groups
    assert count_flops(model, variables, x) == pytest.approx(expected, rel=0.1)
