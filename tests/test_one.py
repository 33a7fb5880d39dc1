"""ONE: multi-branch students, ONE's loss and ramp, l2t-one's meta-gradient, end to end."""

import os

import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_distill import check_weight_teacher_meta_gradient, unroll_data

from benchmarks import distill_cost
from configs import one as one_config
from l2t_jax import engine, methods, metrics, students, train
from l2t_jax.errors import ConfigError
from l2t_jax.losses.distill import online_ensemble_loss
from l2t_jax.methods import dlf
from l2t_jax.methods import one as one_methods

C = 3


def _cnn(branches, channels=4, dtype="float32"):
    return students.build_student(ml_collections.ConfigDict(
        {"name": "cnn1d", "channels": channels, "branches": branches, "dtype": dtype}), C)


def test_branch_zero_is_the_base_network_with_its_branch_weights():
    # The deployable network: the trunk and branch 0's tail, copied into the plain
    # network, give the multi-branch network's logits.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 12)), jnp.float32)
    model = _cnn(3)
    variables = model.init(jax.random.PRNGKey(0), x)
    params = variables["params"]
    tail = params["tail"]
    assert jax.tree_util.tree_leaves(tail)[0].shape[0] == 3
    assert not np.allclose(tail["Conv_0"]["kernel"][0], tail["Conv_0"]["kernel"][1])
    base = {**params["trunk"], "Conv_2": jax.tree_util.tree_map(lambda p: p[0], tail["Conv_0"]),
            "Dense_0": jax.tree_util.tree_map(lambda p: p[0], tail["Dense_0"])}
    np.testing.assert_allclose(model.apply(variables, x),
                               _cnn(1).apply({"params": base}, x), rtol=1e-6)
    # 2 trunk convs, 3 x (conv + read-out), the gate's linear(3) and BatchNorm.
    c = 4
    trunk = (5 * c + c) + (3 * c * c + c)
    tail_size = (3 * c * c + c) + (2 * c * C + C)
    assert students.count_params(params) == trunk + 3 * tail_size + (c * 3 + 3) + 2 * 3


def test_ensemble_view_mixes_the_branches_by_the_gate():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 12)), jnp.float32)
    model = _cnn(3)
    variables = model.init(jax.random.PRNGKey(0), x)
    ensemble = students.views(model)["ensemble"]
    output, _ = engine.student_output(model, variables["params"],
                                      {"batch_stats": variables["batch_stats"]}, x,
                                      train=False, activations=one_methods.ACTIVATIONS)
    branch_logits = output.activations["branch_logits"]
    assert branch_logits.shape == (4, 3, C)
    np.testing.assert_allclose(output.logits, branch_logits[:, 0])
    np.testing.assert_allclose(ensemble.apply(variables, x),
                               output.activations["ensemble_logits"], rtol=1e-6)
    assert students.views(ensemble) == {} and students.views(_cnn(1)) == {}


@pytest.mark.parametrize("cfg, message", [
    ({"name": "mlp", "branches": 3}, "no stages to copy"),
    ({"name": "cnn1d", "branches": 0}, "branches must be an integer >= 1"),
])
def test_bad_branches_are_rejected(cfg, message):
    with pytest.raises(ConfigError, match=message):
        students.build_student(ml_collections.ConfigDict(cfg), C)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_one_loss_is_branch_and_ensemble_ce_plus_weighted_kl_to_the_ensemble():
    rng = np.random.default_rng(2)
    branches = rng.normal(size=(4, 3, C))
    ensemble = rng.normal(size=(4, C))
    y = np.array([0, 1, 2, 1])
    weight, temperature = 0.7, 3.0

    def ce(z):
        return -_log_softmax(z)[np.arange(4), y].mean()

    log_e = _log_softmax(ensemble / temperature)
    kl = sum((np.exp(log_e) * (log_e - _log_softmax(branches[:, i] / temperature))).sum(-1)
             .mean() for i in range(3))
    expected = sum(ce(branches[:, i]) for i in range(3)) + ce(ensemble) + (
        weight * temperature**2 * kl)
    ensemble = jnp.asarray(ensemble, jnp.float32)
    np.testing.assert_allclose(
        online_ensemble_loss(weight, temperature, jnp.asarray(branches, jnp.float32),
                             ensemble, ensemble, jnp.asarray(y)),
        expected, rtol=1e-5)


def test_the_gate_learns_only_from_the_ensemble_cross_entropy():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, 12)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 0, 1, 2])
    model = _cnn(3)
    variables = model.init(jax.random.PRNGKey(0), x)
    family = one_methods.one_family(3.0)

    def loss(params, weight):
        output, _ = engine.student_output(model, params, {"batch_stats": variables["batch_stats"]},
                                          x, train=True, activations=one_methods.ACTIVATIONS)
        return family({"kl_weight": weight}, output, {"y": y})

    grad = jax.jit(jax.grad(loss))
    grads = [grad(variables["params"], jnp.float32(w)) for w in (0.0, 1.0)]
    kl_grad = jax.tree_util.tree_map(lambda a, b: b - a, *grads)
    assert float(jnp.abs(grads[0]["gate"]["kernel"]).max()) > 0
    np.testing.assert_allclose(kl_grad["gate"]["kernel"], 0.0, atol=1e-7)
    assert float(jnp.abs(kl_grad["tail"]["Dense_0"]["kernel"]).max()) > 1e-4


def test_ramp_rises_from_exp_minus_five_to_one_at_r():
    values = one_methods.ramp(jnp.asarray([0, 50, 100, 300]), 100)
    np.testing.assert_allclose(values, [np.exp(-5), np.exp(-1.25), 1.0, 1.0], rtol=1e-6)


def test_l2t_one_meta_gradient_matches_differences_and_a_loop_float64(x64):
    # The KL weight and T a loss teacher sets, through the training of a 2-branch
    # 1-D CNN (trunk, vmapped branches, gate with BatchNorm), the ensemble the branches
    # distil from computed outside the student's gradient.
    rng = np.random.default_rng(4)
    data = unroll_data(rng, steps=3)
    config = one_config.get_config("mnist1d,smoke")
    config.one.learn_temperature = True
    teacher = one_methods.loss_teacher(config, C)
    assert teacher.names == ("kl_weight", "temperature")
    check_weight_teacher_meta_gradient(_cnn(2, channels=3, dtype="float64"), teacher, rng,
                                       data, activations=one_methods.ACTIVATIONS,
                                       self_target=True)


@pytest.mark.parametrize("method, field, value, message", [
    ("one", "student.branches", 1, "set config.student.branches >= 2"),
    ("l2t-one", "one.kl_weight", 12.0, "inside config.one.kl_weight_range"),
    ("one", "one.ramp_steps", 0, "config.one.ramp_steps must be >= 1"),
    ("one", "one.ramp_max", 0.0, "config.one.ramp_max must be > 0"),
])
def test_bad_one_config_is_rejected_in_one_line(method, field, value, message):
    config = one_config.get_config("mnist1d,smoke")
    config.method = method
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        train.validate_config(config)


def test_l2t_one_runs_end_to_end_reports_the_ensemble_and_draws_its_weight(tmp_path):
    config = one_config.get_config("mnist1d,noisy,smoke")
    config.method = "l2t-one"
    workdir = str(tmp_path)
    summary = train.train_and_evaluate(config, workdir)
    assert {"test_error", "ensemble_test_error", "final_ensemble_test_error"} <= set(summary)
    records = metrics.read_metrics(workdir)
    assert "test/ensemble_error" in records[-1]
    assert all(r["meta/nonfinite"] == 0 and r["meta/grad_norm"] > 0
               for r in records if "meta/grad_norm" in r)
    learned = dict(np.load(os.path.join(workdir, dlf.TEACHER_PARAMS_FILE)))
    assert np.abs(learned["theta"]).max() > 0
    paths = methods.get("l2t-one").draw(config, workdir, records, summary)
    assert [os.path.basename(p) for p in paths] == ["one_weights.png"]


def test_paper_setting_runs_a_few_steps_on_fake_cifar(tmp_path):
    # ONE's ramped loss on the paper's ResNet family (depth 8 at smoke size).
    config = one_config.get_config("fake_cifar10,smoke")
    assert config.method == "one"
    assert one_config.get_config("cifar100,resnet110").student.depth == 110
    config.train.update(num_steps=10, eval_every=10, checkpoint_every=10)
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["steps"] == 10 and np.isfinite(summary["ensemble_test_error"])


def test_cost_benchmark_times_the_base_network_one_and_l2t_one():
    configs, config_file, reference = distill_cost.setting_configs(
        "one-mnist1d", distill_cost.SETTINGS["one-mnist1d"], quick=True)
    assert (config_file, reference) == ("configs/one.py", "one-base")
    assert {name: (c.method, c.student.branches) for name, c in configs.items()} == {
        "one-base": ("ce", 1), "one": ("one", 3), "l2t-one": ("l2t-one", 3)}
