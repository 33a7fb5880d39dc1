"""Every config field is range-checked before anything runs, in one line naming the field.

Pure and fast: configs are only built and validated (nothing compiles, no data is read).
"""

import importlib
import itertools
import math

import ml_collections
import pytest

from configs import ce_baseline, distill, l2t_dlf, l2t_dln, one
from l2t_jax import config_checks, train
from l2t_jax.errors import ConfigError

CE = "ce_baseline:digits,smoke"
DLF = "l2t_dlf:digits,smoke"
DLN = "l2t_dln:digits,smoke"


def _config(spec: str) -> ml_collections.ConfigDict:
    """The config of ``"<file>:<arg>[@<method>]"``, e.g. ``"robust:digits,smoke@sce"``."""
    name, _, rest = spec.partition(":")
    arg, _, method = rest.partition("@")
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    if method:
        config.method = method
    return config


def _override(config: ml_collections.ConfigDict, path: str, value) -> None:
    """Sets the field at dotted `path`, whatever the type of its value."""
    *sections, key = path.split(".")
    for section in sections:
        config = config[section]
    with config.unlocked():
        if key in config:
            del config[key]  # a ConfigDict field keeps its type: replace the field
        config[key] = value


@pytest.mark.parametrize("spec, path, value, expected", [
    # config.seed and config.train
    (CE, "seed", -1, "config.seed must be an integer in [0, 4294967295]"),
    (CE, "seed", 2**32, "config.seed"),
    (CE, "seed", 1.5, "config.seed"),
    (CE, "train.eval_batch_size", -1, "config.train.eval_batch_size must be an integer >= 1"),
    (CE, "train.eval_batch_size", 0, "config.train.eval_batch_size"),
    (CE, "train.num_steps", None, "config.train.num_steps"),
    (CE, "train.batch_size", 100000, "config.train.batch_size must be an integer in [1, 1197]"),
    (CE, "train.max_cross_entropy", 0.0, "config.train.max_cross_entropy must be > 0"),
    (CE, "train.max_growth", 1.0, "config.train.max_growth must be > 1"),
    # Top-level sections
    (CE, "teachr", ml_collections.ConfigDict({"hidden": 1}),
     "config.teachr is not a config section"),
    # config.data
    (CE, "data.dev_size", True, "config.data.dev_size"),
    (CE, "data.noise_seed", -1, "config.data.noise_seed must be an integer >= 0"),
    # config.student (and the target model, a student config of its own)
    (CE, "student.hidden", (0,), "config.student.hidden must be a non-empty tuple"),
    (CE, "student.hidden", (), "config.student.hidden"),
    ("ce_baseline:mnist1d_cnn,smoke", "student.channels", 0, "config.student.channels"),
    ("l2t_dln:mnist_5k,smoke", "student.fc_hidden", (800, 0), "config.student.fc_hidden"),
    ("l2t_dln:mnist_5k,smoke", "student.batch_norm", "yes", "config.student.batch_norm"),
    ("ce_baseline:fake_cifar10,smoke", "student.depth", None, "config.student.depth"),
    ("distill:mnist1d,smoke", "target.model.channels", 0, "config.target.model.channels"),
    ("distill:mnist_5k,smoke", "target.model.depth", 11, "config.target.model.depth"),
    ("distill:mnist_5k,smoke", "target.model.widen_factor", 0,
     "config.target.model.widen_factor"),
    # config.optimizer
    ("ce_baseline:cifar10,smoke", "optimizer.decay_factor", -1.0,
     "config.optimizer.decay_factor must be > 0"),
    ("ce_baseline:cifar10,smoke", "optimizer.boundaries", (48000, 32000),
     "config.optimizer.boundaries must be increasing"),
    (CE, "optimizer.learning_rate", math.inf, "config.optimizer.learning_rate must be a finite"),
    (CE, "optimizer.learning_rate", math.nan, "config.optimizer.learning_rate"),
    (CE, "optimizer.momentum", 1.0, "config.optimizer.momentum must be in [0, 1)"),
    (CE, "optimizer.b2", 1.5, "config.optimizer.b2"),
    (CE, "optimizer.nesterov", None, "config.optimizer.nesterov must be True or False"),
    # config.engine
    (CE, "engine.window", -1, "config.engine.window must be an integer >= 0"),
    (CE, "engine.chunk_size", -1, "config.engine.chunk_size"),
    ("l2t_dlf:digits,online,smoke", "engine.window", 0, "config.engine.window must be an "
     "integer >= 1"),
    # config.teacher (L2T-DLF and the loss teachers)
    (DLF, "teacher.feature_dev_size", 0, "config.teacher.feature_dev_size"),
    (DLF, "teacher.sharpness", -50.0, "config.teacher.sharpness must be > 0"),
    (DLF, "teacher.hidden", 0, "config.teacher.hidden"),
    (DLF, "teacher.teach_online", None, "config.teacher.teach_online"),
    (DLF, "teacher.clip_norm", -1.0, "config.teacher.clip_norm"),
    (DLF, "teacher.combine", 1, "config.teacher.combine"),
    (DLF, "teacher.num_episodes", -1, "config.teacher.num_episodes"),
    # config.dln
    (DLN, "dln.val_batch_size", 100000, "config.dln.val_batch_size must be an integer in "
     "[1, 300]"),
    ("l2t_dln:fake_cifar10,smoke", "dln.val_batch_size", 300, "config.dln.val_batch_size"),
    ("l2t_dln:fake_cifar10,smoke", "train.batch_size", 300, "config.train.batch_size"),
    (DLN, "dln.sharpness", -50.0, "config.dln.sharpness"),
    (DLN, "dln.warm_sharpness", 0.0, "config.dln.warm_sharpness"),
    (DLN, "dln.teacher_cells", 1, "config.dln.teacher_cells must be an integer >= 2"),
    (DLN, "dln.depth", 0, "config.dln.depth"),
    (DLN, "dln.preserve_scale", None, "config.dln.preserve_scale"),
    (DLN, "dln.learning_rate", -1.0, "config.dln.learning_rate"),
    # config.gce, config.sce
    ("robust:digits,smoke", "gce.q", 1.0, "config.gce.q must be in (0, 1)"),
    ("robust:digits,smoke@l2t-gce", "gce.q", 0.0, "config.gce.q"),
    ("robust:digits,smoke@sce", "sce.alpha", -0.1, "config.sce.alpha"),
    ("robust:digits,smoke@sce", "sce.log_zero", 0.0, "config.sce.log_zero"),
    # config.distill
    ("distill:mnist1d,smoke", "distill.temperature", 0.0, "config.distill.temperature"),
    ("distill:mnist1d,smoke@l2t-kd", "distill.temperature_range", (10.0, 1.0),
     "config.distill.temperature_range"),
    ("distill:mnist_5k,smoke@l2t-at", "distill.beta_range", (-1.0, 1e4),
     "config.distill.beta_range"),
    ("distill:mnist_5k,smoke@at", "distill.stages", (), "config.distill.stages"),
    # config.one
    ("one:mnist1d,smoke@l2t-one", "one.kl_weight_range", (0.0,), "config.one.kl_weight_range"),
    ("one:mnist1d,smoke", "one.temperature_range", (5.0, 1.0), "config.one.temperature_range"),
    ("one:mnist1d,smoke", "one.learn_temperature", None, "config.one.learn_temperature"),
    ("one:mnist1d,smoke", "one.temperature", -3.0, "config.one.temperature"),
])
def test_bad_field_is_rejected_in_one_line_naming_it(spec, path, value, expected):
    config = _config(spec)
    _override(config, path, value)
    with pytest.raises(ConfigError) as error:
        train.validate_config(config)
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def _arguments(variants: tuple, options: tuple, invalid=lambda tokens: False) -> list:
    """Every variant with every combination of options (but the invalid ones)."""
    return [",".join((variant, *chosen)) for variant in variants
            for count in range(len(options) + 1)
            for chosen in itertools.combinations(options, count)
            if not invalid((variant, *chosen))]


# Each config file's arguments, as its module docstring lists them.
_VARIANTS = {
    "ce_baseline": _arguments(ce_baseline.VARIANTS, ce_baseline.OPTIONS),
    "l2t_dlf": _arguments(ce_baseline.VARIANTS, l2t_dlf.OPTIONS),
    "l2t_dln": _arguments(ce_baseline.VARIANTS, l2t_dln.OPTIONS),
    "robust": _arguments(ce_baseline.VARIANTS, l2t_dlf.OPTIONS),
    # moonshine needs a residual target model: not mnist1d's 1-D CNN.
    "distill": _arguments(distill.SETTINGS, distill.OPTIONS,
                          lambda tokens: {"mnist1d", "moonshine"} <= set(tokens)),
    # resnet110 is an option of the CIFAR settings.
    "one": _arguments(one.SETTINGS, one.OPTIONS,
                      lambda tokens: "resnet110" in tokens and tokens[0] in ("mnist1d",
                                                                             "mnist_5k")),
}


@pytest.mark.parametrize("name, arg", [(name, arg) for name, args in _VARIANTS.items()
                                       for arg in args])
def test_every_config_variant_validates(name, arg):
    train.validate_config(_config(f"{name}:{arg}"))


# The methods each config file's docstring runs it with (--config.method=...).
@pytest.mark.parametrize("spec", [
    "l2t_dlf:digits,noisy@ce", "l2t_dlf:digits,noisy@l2t-dlf-fixed",
    "l2t_dln:digits,noisy@l2t-dln-fixed", "l2t_dln:digits@ce",
    "robust:digits,noisy@sce", "robust:digits,noisy@l2t-gce", "robust:digits,noisy@ce",
    "distill:mnist1d,noisy@l2t-kd", "distill:mnist1d,noisy@kd-target",
    "distill:mnist1d,noisy@ce", "distill:mnist_5k@at", "distill:mnist_5k@at-kd",
    "distill:mnist_5k@l2t-at", "distill:mnist_5k@l2t-at-kd",
    "one:mnist1d@l2t-one", "one:cifar10,resnet110@l2t-one",
])
def test_every_method_a_config_file_names_validates(spec):
    train.validate_config(_config(spec))


def test_base_network_of_one_validates_under_ce():
    config = _config("one:mnist1d@ce")
    config.student.branches = 1
    train.validate_config(config)


@pytest.mark.parametrize("value", [None, "1", math.nan, -math.inf, {"a": 1}, (0.0, math.nan)])
def test_checks_never_raise_and_reject_values_of_the_wrong_type(value):
    for ok, message in [
        config_checks.integer("config.x", value),
        config_checks.number("config.x", value, above=0),
        config_checks.flag("config.x", value),
        config_checks.sizes("config.x", value),
        config_checks.interval("config.x", value),
        config_checks.inside("config.x", value, "config.r", value),
        config_checks.one_of("config.x", value, ("a", "b")),
    ]:
        assert not ok
        assert message.startswith("config.x must be ") and message.endswith(f"got {value!r}")


def test_a_bool_is_neither_an_integer_nor_a_number():
    assert not config_checks.integer("config.x", True)[0]
    assert not config_checks.number("config.x", True, above=0)[0]
    assert config_checks.flag("config.x", True)[0]
