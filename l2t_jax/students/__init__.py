"""Student networks: Flax modules mapping a batch of inputs to logits.

Every student is called as `module.apply(variables, x, train=...)` and returns logits
(B, num_classes). Students with BatchNorm keep running statistics in the `batch_stats`
collection: apply with `mutable=["batch_stats"]` when `train=True`.

Students also `sow` named activations into the ``"intermediates"`` collection, which a
loss can ask for (`engine.student_output`; free when not asked for): the MLP's
``hidden_<i>`` (after each hidden layer's activation), LeNet-5's and the 1-D CNN's
``conv_<i>`` (after each convolution block), and the ResNets' and WRN's ``group_<g>``
(g = 1, 2, 3: the output of each residual group, where attention transfer reads).

The residual students (`wrn`, `resnet_he`, `resnet_wide`) take `config.student.conv`, the
3x3 convolution of their blocks: "conv" (plain, the default) or one of Moonshine's cheap
convolutions (Crowley et al. 2018; `cheap` lists them: "dconv", "dconv_g<N>",
"dconv_a<N>", "b<M>", "g<N>b<M>", "a<N>b<M>", "dconv_b<M>"). `count_params` and
`count_flops` measure a student's size and cost.

`config.student.branches` = m > 1 makes the residual students and the 1-D CNN a
multi-branch network (`branched`: ONE's shared trunk, m copies of the last stage, a
gated ensemble); its logits are branch 0's, and `views` adds the ensemble.
"""

import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from l2t_jax import config_checks
from l2t_jax.errors import ConfigError
from l2t_jax.students import branched, cheap, cnn1d, lenet, mlp, resnet, wrn
from l2t_jax.students.branched import views

# name -> build(config, num_classes, dtype, section) (section: the config's path).
_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict, int, Any, str], nn.Module]] = {
    "mlp": mlp.build,
    "lenet5": lenet.build,
    "resnet_he": resnet.build_he,
    "resnet_wide": resnet.build_wide,
    "wrn": wrn.build,
    "cnn1d": cnn1d.build,
}
STUDENT_NAMES = tuple(_BUILDERS)
# The students whose residual blocks take Moonshine's cheap convolutions (`cheap`).
_CHEAP_BLOCK_STUDENTS = ("wrn", "resnet_he", "resnet_wide")
# The students with stages whose last can be copied into branches (`branched`).
BRANCHED_STUDENTS = (*_CHEAP_BLOCK_STUDENTS, "cnn1d")
_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def build_student(config: ml_collections.ConfigDict, num_classes: int,
                  section: str = "config.student") -> nn.Module:
    """Builds the student network that `config` names.

    Args:
      config: the student config. `name` is one of `STUDENT_NAMES`; `dtype`
        ("float32" or "float64", default "float32") sets every layer's parameter and
        computation dtype. Each student reads its own further fields, with defaults
        for missing ones: mlp (`hidden`, `activation`), lenet5 (`fc_hidden`,
        `batch_norm`), resnet_he and resnet_wide (`depth`, `conv`), wrn (`depth`,
        `widen_factor`, `dropout_rate`, `conv`), cnn1d (`channels`). `conv` (default
        "conv") names the residual blocks' 3x3 convolutions: "conv", or a cheap
        convolution "dconv", "dconv_g<N>" (N channels per group), "dconv_a<N>" (N
        groups), "b<M>", "g<N>b<M>", "a<N>b<M>" or "dconv_b<M>" (see `cheap`).
        `branches` (default 1): m > 1 copies the last stage into m branches with a
        gated ensemble (`branched.Branched`; one of `BRANCHED_STUDENTS`).
      num_classes: number of logits.
      section: the config's path, which messages name (e.g. ``"config.target.model"``).

    Returns:
      An unbound Flax module with `__call__(x, train=False) -> logits`.

    Raises:
      ConfigError: on an unknown name or dtype, or a field the student rejects (e.g. a
        `conv` that is unknown or does not divide the student's widths, branches on a
        student without stages).
    """
    name = config.get("name")
    if name not in _BUILDERS:
        raise ConfigError(
            f"unknown student {name!r} ({section}.name); "
            f"choose one of: {', '.join(STUDENT_NAMES)}"
        )
    dtype = config.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise ConfigError(
            f"unknown student dtype {dtype!r} ({section}.dtype); "
            f"choose one of: {', '.join(_DTYPES)}"
        )
    conv = config.get("conv", cheap.PLAIN)
    if name not in _CHEAP_BLOCK_STUDENTS and conv != cheap.PLAIN:
        raise ConfigError(
            f"student {name!r} has no residual blocks for {section}.conv={conv!r}; "
            f"use one of {', '.join(_CHEAP_BLOCK_STUDENTS)} or conv='{cheap.PLAIN}'"
        )
    model = _BUILDERS[name](config, num_classes, _DTYPES[dtype], section)
    num_branches = config.get("branches", 1)
    config_checks.check_fields([config_checks.integer(f"{section}.branches", num_branches)])
    if num_branches == 1:
        return model
    if name not in BRANCHED_STUDENTS:
        raise ConfigError(
            f"student {name!r} has no stages to copy into {section}.branches="
            f"{num_branches} branches; use one of {', '.join(BRANCHED_STUDENTS)}")
    return branched.Branched(model.clone(part="trunk"), model.clone(part="tail"),
                             num_branches, dtype=_DTYPES[dtype])


def count_params(params: Any) -> int:
    """Counts the scalars in a parameter pytree.

    Args:
      params: pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).

    Returns:
      Total number of elements over all leaves.
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def count_macs(model: nn.Module, variables: Any, x: Any) -> float:
    """Counts the multiply-adds of a network's convolutions and dense layers, per example.

    The architecture's count, as papers report it (Moonshine's tables): each
    convolution costs its output positions times its kernel (kernel window x input
    channels per group x output channels), each dense layer its kernel; normalisation,
    activations and pooling are left out. Unlike `count_flops`, it does not depend on
    how the backend runs a grouped convolution. Nothing runs (shapes only).

    Args:
      model: a Flax module whose convolutions are `nn.Conv` (or subclasses) and dense
        layers `nn.Dense`, applied as ``model.apply(variables, x)`` (eval mode).
      variables: its variables; arrays or `jax.ShapeDtypeStruct`s.
      x: a batch of inputs, (B, ...); array or `jax.ShapeDtypeStruct`.

    Returns:
      Multiply-adds of the whole batch divided by its size B.

    Raises:
      ValueError: a multi-branch network (`branched.Branched`), whose vmapped layers'
        stacked kernels this count does not read; use `count_flops`.
    """
    if isinstance(model, branched.Branched):
        raise ValueError("count_macs reads single-branch networks; count a multi-branch "
                         "one with count_flops")

    def layers(mdl, method_name):
        return method_name == "__call__" and isinstance(mdl, (nn.Conv, nn.Dense))

    def outputs(variables, x):
        _, state = model.apply(variables, x, capture_intermediates=layers,
                               mutable=["intermediates"])
        return state["intermediates"]

    captured = flax.traverse_util.flatten_dict(jax.eval_shape(outputs, variables, x))
    kernels = flax.traverse_util.flatten_dict(variables["params"])
    total = 0
    for path, output in captured.items():
        if path[-1] != "__call__":  # activations the students sow, not layer outputs
            continue
        kernel = kernels[(*path[:-1], "kernel")]
        # Every output entry of a layer is kernel.size / out_features multiply-adds.
        total += math.prod(output[0].shape) * math.prod(kernel.shape[:-1])
    return float(total) / x.shape[0]


def count_flops(model: nn.Module, variables: Any, x: Any, **apply_kwargs: Any) -> float:
    """Counts XLA's floating-point operations of one forward pass, per example.

    Compiles `model.apply(variables, x, **apply_kwargs)` (students default to eval mode,
    `train=False`) for the default backend and reads the compiled program's cost
    analysis, so everything XLA counts is in: convolutions and matmuls (a multiply-add
    is 2 FLOPs), BatchNorm, activations, pooling. XLA leaves out the taps that fall on
    a convolution's zero padding (a padded 3x3 on a 32x32 map counts (94 / 96)^2 of 9
    multiply-adds per output), so a network's count is somewhat below twice its
    textbook multiply-adds. It counts what runs: a grouped `nn.Conv` costs 1 / groups of
    the dense one, but our students' grouped convolutions run as block-diagonal chunks
    of ungrouped ones (`_layers.conv_general_dilated`, fast on CPU) and count their
    zeros; `count_macs` gives the architecture's count. Nothing runs.

    Args:
      model: a Flax module.
      variables: its variables; arrays or `jax.ShapeDtypeStruct`s (e.g. from
        `jax.eval_shape(model.init, ...)`).
      x: a batch of inputs, (B, ...); array or `jax.ShapeDtypeStruct`.
      **apply_kwargs: further keyword arguments of `model.apply`.

    Returns:
      FLOPs of the whole batch divided by its size B.

    Raises:
      ValueError: if the backend reports no FLOP count.
    """
    forward = jax.jit(functools.partial(model.apply, **apply_kwargs))
    costs = forward.lower(variables, x).compile().cost_analysis()
    # A dict in recent JAX, a list of one dict per program in older versions.
    if isinstance(costs, (list, tuple)):
        costs = costs[0] if costs else None
    if not costs or "flops" not in costs:
        raise ValueError(f"the backend gave no FLOP count (cost analysis: {costs!r})")
    return float(costs["flops"]) / x.shape[0]


__all__ = ["BRANCHED_STUDENTS", "STUDENT_NAMES", "branched", "build_student", "cheap",
           "count_flops", "count_macs", "count_params", "views"]
