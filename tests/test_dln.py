"""L2T-DLN: loss network, LSTM teacher, the three stages' gradients, end to end."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from test_dlf import stop_then_skip

from configs import l2t_dln
from l2t_jax import data, engine, methods, metrics, train
from l2t_jax.errors import ConfigError
from l2t_jax.losses import dln as dln_lib
from l2t_jax.methods.dln import DLN_SNAPSHOTS_FILE, DLNTeaching, save_dln
from l2t_jax.methods.teaching import TeacherUpdate
from l2t_jax.students import build_student
from l2t_jax.teachers.lstm import CoordinateLSTM, preprocess_gradient

C = 4


def test_dln_has_the_released_shape_and_init():
    phi = dln_lib.init_dln(jax.random.PRNGKey(0))
    assert [phi[f"layer_{i}"].shape for i in range(5)] == [(4, 40)] + [(40, 40)] * 3 + [(40, 1)]
    assert ravel_pytree(phi)[0].size == 5000
    hidden = np.concatenate([np.ravel(phi[f"layer_{i}"]) for i in range(1, 4)])
    assert abs(hidden.std() - np.sqrt(2 / 40)) < 0.02  # 4,800 draws of std 0.224


def test_pair_features_and_loss_match_a_loop():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, C)))
    labels = jnp.asarray([0, 2, 3])
    phi = dln_lib.init_dln(jax.random.PRNGKey(1))
    s = 1 / (1 + np.exp(-np.asarray(logits)))
    rows = np.zeros((3, C, 4))
    for b in range(3):
        for j in range(C):
            if j != labels[b]:
                rows[b, j] = [s[b, labels[b]], s[b, j], 1, 0]
    np.testing.assert_allclose(dln_lib.pair_features(logits, labels), rows, rtol=1e-6)

    def net(row):
        x = row
        for i in range(5):
            x = x @ np.asarray(phi[f"layer_{i}"])
            x = np.where(x > 0, x, 0.01 * x) if i < 4 else x
        return x[0]

    expected = np.mean([net(rows[b, j]) for b in range(3) for j in range(C)])
    np.testing.assert_allclose(dln_lib.dln_loss(phi, logits, labels), expected, rtol=1e-5)
    assert net(np.zeros(4)) == 0  # the true class's all-zero row adds nothing


def test_gradient_preprocessing_both_branches():
    g = jnp.asarray([1e-5, 0.5, -2.0, 0.0, -1e-6])
    out = np.asarray(preprocess_gradient(g, 10.0))
    small = np.abs(np.asarray(g)) < np.exp(-10)
    np.testing.assert_allclose(out[~small, 0], np.log(np.abs(np.asarray(g)[~small]) + 1e-8) / 10,
                               rtol=1e-6)
    np.testing.assert_array_equal(out[~small, 1], np.sign(np.asarray(g)[~small]))
    np.testing.assert_array_equal(out[small, 0], -1.0)
    np.testing.assert_allclose(out[small, 1], np.exp(10) * np.asarray(g)[small], rtol=1e-6)


def _torch_style_lstm_stack(params, x, memory, n_cells):
    """PyTorch's LSTMCell equations, one coordinate at a time, in numpy."""
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    out, new = x, {}
    for i in range(n_cells):
        p = {k: np.asarray(v) for k, v in params[f"cell_{i}"].items()}
        h, c = (np.asarray(memory[f"cell_{i}"][k]) for k in ("h", "c"))
        gates = p["w_ih"].T @ out + p["b_ih"] + p["w_hh"].T @ h + p["b_hh"]
        gi, gf, gg, go = np.split(gates, 4)
        c = sig(gf) * c + sig(gi) * np.tanh(gg)
        out = sig(go) * np.tanh(c)
        new[f"cell_{i}"] = (out, c)
    return out[0], new


def test_lstm_teacher_is_pytorch_lstmcell_per_coordinate():
    teacher = CoordinateLSTM(hidden=8, num_cells=4)
    params = teacher.init(jax.random.PRNGKey(0))
    assert float(jnp.abs(params["cell_0"]["w_ih"]).max()) <= 1 / np.sqrt(8)
    assert float(jnp.abs(params["cell_3"]["w_ih"]).max()) > 1 / np.sqrt(8)  # H = 1: U(-1, 1)
    n = 5
    memory = jax.tree_util.tree_map(
        lambda a: jax.random.normal(jax.random.PRNGKey(a.size), a.shape) * 0.5,
        teacher.init_memory(n))
    grads = jnp.asarray([1e-3, -0.2, 3.0, 1e-7, -1e-9])
    steps, new_memory = teacher(params, grads, memory)
    inputs = np.asarray(preprocess_gradient(grads))
    for k in range(n):
        mem_k = jax.tree_util.tree_map(lambda a, k=k: a[k], memory)
        ref_step, ref_mem = _torch_style_lstm_stack(params, inputs[k], mem_k, 4)
        np.testing.assert_allclose(steps[k], ref_step, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new_memory["cell_2"]["c"][k], ref_mem["cell_2"][1],
                                   rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(steps).max()) < 1


def _method(dtype=jnp.float32, **overrides):
    model = build_student(
        __import__("ml_collections").ConfigDict(
            dict(name="mlp", hidden=(6,), activation="tanh",
                 dtype="float64" if dtype == jnp.float64 else "float32")), C)
    settings = dict(
        model=model, tx=optax.sgd(0.1), teacher=CoordinateLSTM(hidden=8),
        update=TeacherUpdate(engine.FullBackprop(), optax.adam(1e-3), "cross_entropy"),
        steps_per_call=3, batch_size=5, val_batch_size=7, dln_step_size=1e-3,
        total_steps=9, num_classes=C, num_snapshots=4)
    settings.update(overrides)
    return DLNTeaching(**settings)


def _splits(dtype=np.float32, n=40):
    rng = np.random.default_rng(0)

    def split(m):
        y = rng.integers(0, C, m).astype(np.int32)
        x = (rng.normal(size=(m, 3)) + y[:, None]).astype(dtype)
        return data.ArraySplit(x, y, y)

    return data.Splits("toy", C, (3,), split(n), split(20), split(20))


def _problem(dtype=jnp.float32, **overrides):
    method = _method(dtype, **overrides)
    splits = _splits(np.float64 if dtype == jnp.float64 else np.float32)
    phi = jax.tree_util.tree_map(lambda a: a.astype(dtype),
                                 dln_lib.init_dln(jax.random.PRNGKey(2), hidden=5, depth=2))
    state = method.init(jax.random.PRNGKey(3), splits, phi)
    state = jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    # A non-zero memory, so every LSTM weight matters.
    state = state.replace(teacher_memory=jax.tree_util.tree_map(
        lambda a: 0.3 * jnp.sin(jnp.arange(a.size, dtype=dtype).reshape(a.shape)),
        state.teacher_memory))
    return method, splits, state, method.batches(splits, seed=0, start_step=0)


def jit_meta_gradients_and_outer_step(method):
    """`method`'s meta-gradients and outer step as one jitted program.

    The outer step recomputes the meta-gradients: in one program XLA compiles that work
    once (about half the time of compiling the two separately).
    """
    return jax.jit(lambda state, batches: (method.meta_gradients(state, batches),
                                           method.outer_step(state, batches)))


@pytest.fixture(scope="module")
def compiled():
    """One float32 problem with its jitted stages, shared by the tests below."""
    method, splits, state, batches = _problem()
    return method, splits, state, batches, jit_meta_gradients_and_outer_step(method)


def _python_loop_val_ce(method, state, batches, phi):
    """K SGD steps on the DLN loss written as a Python loop; CE on the val batch."""
    params = state.student.params
    for k in range(method.steps_per_call):
        x, y = batches["train"]["x"][k], batches["train"]["y"][k]

        def loss(p, x=x, y=y):
            return dln_lib.dln_loss(phi, method.model.apply({"params": p}, x), y)

        grads = jax.grad(loss)(params)
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)
    logits = method.model.apply({"params": params}, batches["val"]["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batches["val"]["y"]).mean()


def test_stage_a_hypergradient_matches_central_differences_float64(x64):
    method, _, state, batches = _problem(jnp.float64)
    m = jax.jit(method.meta_gradients)(state, batches)
    flat, unravel = ravel_pytree(state.loss_params)
    value = jax.jit(lambda f: _python_loop_val_ce(method, state, batches, unravel(f)))
    np.testing.assert_allclose(m.result_a.value, value(flat), rtol=1e-12)
    np.testing.assert_allclose(m.hypergrad, jax.grad(value)(flat), rtol=1e-9, atol=1e-14)
    # Central differences, coordinate by coordinate, with a step small enough not to
    # cross a LeakyReLU kink (the spec's warning).
    eps = 1e-6
    for i in np.random.default_rng(0).choice(flat.size, 12, replace=False):
        e = jnp.zeros_like(flat).at[i].set(eps)
        numeric = (value(flat + e) - value(flat - e)) / (2 * eps)
        # atol: the differences' round-off is about 1e-16 / eps = 1e-10.
        np.testing.assert_allclose(m.hypergrad[i], numeric, rtol=1e-5, atol=1e-9)
    assert float(jnp.abs(m.hypergrad).max()) > 1e-6


def test_stage_b_teacher_gradient_matches_a_python_loop_and_differences_float64(x64):
    method, _, state, batches = _problem(jnp.float64)
    m = jax.jit(method.meta_gradients)(state, batches)
    flat, unravel = ravel_pytree(state.loss_params)

    def reference(psi):
        steps, _ = method.teacher(psi, m.hypergrad, state.teacher_memory)
        return _python_loop_val_ce(method, state, batches,
                                   unravel(flat - method.dln_step_size * steps))

    reference = jax.jit(reference)
    np.testing.assert_allclose(m.result_b.value, reference(state.teacher_params), rtol=1e-12)
    expected = jax.grad(reference)(state.teacher_params)
    got, flat_expected = ravel_pytree(m.result_b.grad)[0], ravel_pytree(expected)[0]
    np.testing.assert_allclose(got, flat_expected, rtol=1e-8, atol=1e-16)
    psi, unravel_psi = ravel_pytree(state.teacher_params)
    eps = 1e-5
    for i in np.argsort(-np.abs(np.asarray(got)))[:5]:
        e = jnp.zeros_like(psi).at[i].set(eps)
        numeric = (reference(unravel_psi(psi + e)) - reference(unravel_psi(psi - e))) / (2 * eps)
        np.testing.assert_allclose(got[i], numeric, rtol=1e-5)
    np.testing.assert_allclose(ravel_pytree(m.new_dln)[0],
                               flat - method.dln_step_size * m.steps, rtol=1e-12)


def test_outer_step_keeps_unroll_b_student_and_updates_dln_memory_teacher(compiled):
    method, _, state, batches, meta_gradients_and_outer_step = compiled
    m, (new, step_metrics) = meta_gradients_and_outer_step(state, batches)
    chex.assert_trees_all_close(new.student.params, m.result_b.state.params, rtol=1e-5)
    chex.assert_trees_all_close(new.loss_params, m.new_dln, rtol=1e-6)
    chex.assert_trees_all_close(new.teacher_memory, m.memory, rtol=1e-5, atol=1e-7)
    assert int(new.student.step) == method.steps_per_call
    assert not np.allclose(ravel_pytree(new.teacher_params)[0],
                           ravel_pytree(state.teacher_params)[0])
    assert step_metrics["meta/nonfinite"] == 0
    assert step_metrics["loss"].shape == (3,)  # one per student step of unroll B


def test_nonfinite_hypergradient_proposes_nothing_and_skips_the_teacher(compiled):
    _, _, state, batches, meta_gradients_and_outer_step = compiled
    batches = {**batches, "val": {**batches["val"], "x": batches["val"]["x"].copy()}}
    batches["val"]["x"][0, 0] = np.nan
    _, (new, step_metrics) = meta_gradients_and_outer_step(state, batches)
    assert float(step_metrics["meta/nonfinite"]) == 1.0
    chex.assert_trees_all_equal(new.loss_params, state.loss_params)
    chex.assert_trees_all_equal(new.teacher_params, state.teacher_params)
    chex.assert_trees_all_equal(new.teacher_memory, state.teacher_memory)
    assert np.isfinite(ravel_pytree(new.student.params)[0]).all()


def test_snapshots_hold_the_dln_at_their_steps(compiled):
    method, splits, state, _, meta_gradients_and_outer_step = compiled
    assert method.snapshot_steps() == [0, 3, 6, 9]
    dlns = [ravel_pytree(state.loss_params)[0]]
    for s in range(3):
        _, (state, _) = meta_gradients_and_outer_step(state, method.batches(splits, 0, 3 * s))
        dlns.append(ravel_pytree(state.loss_params)[0])
    np.testing.assert_allclose(state.loss_snapshots, np.stack(dlns), rtol=1e-6)


def test_preserve_scale_keeps_the_surface_spread():
    method, _, state, batches = _problem(preserve_scale=True, dln_step_size=0.5)
    new, _ = jax.jit(method.outer_step)(state, batches)
    axis = jnp.linspace(0, 1, 21)

    def spread(phi):
        return float(jnp.std(dln_lib.pair_surface(phi, axis[:, None], axis[None, :])))

    assert (abs(spread(new.loss_params) - spread(state.loss_params))
            < 1e-4 * spread(state.loss_params))
    assert not np.allclose(ravel_pytree(new.loss_params)[0], ravel_pytree(state.loss_params)[0])


def test_corner_gap_is_zero_when_the_right_answer_is_the_minimum():
    warm = jax.jit(dln_lib.warm_start_dln)(dln_lib.init_dln(jax.random.PRNGKey(0)),
                                           jax.random.PRNGKey(1))
    assert float(dln_lib.probe_dln(warm)["corner_gap"]) < 0.05
    # The negated soft margin rewards s_true = 0, s_other = 1: its minimum is the
    # opposite corner, a spread-normalised gap of about 4 / std.
    flipped = {**warm, "layer_4": -warm["layer_4"]}
    assert float(dln_lib.probe_dln(flipped)["corner_gap"]) > 2


@pytest.mark.parametrize("accept", ["always", "proper"])
def test_proper_rule_rejects_a_dln_that_rewards_wrong_answers(accept):
    method, _, state, batches = _problem(accept=accept)
    # Start from an improper DLN (its minimum away from (1, 0)); a 1e-3 step cannot make
    # it proper, so "proper" must keep it and the student of unroll A.
    state = state.replace(
        loss_params={**state.loss_params, "layer_2": -state.loss_params["layer_2"]})
    assert float(dln_lib.probe_dln(state.loss_params)["corner_gap"]) > method.proper_tolerance
    m, (new, step_metrics) = jit_meta_gradients_and_outer_step(method)(state, batches)
    if accept == "always":
        assert float(step_metrics["dln/accepted"]) == 1.0
        chex.assert_trees_all_close(new.loss_params, m.new_dln, rtol=1e-6)
        chex.assert_trees_all_close(new.student.params, m.result_b.state.params, rtol=1e-5)
        np.testing.assert_allclose(step_metrics["loss"], m.result_b.metrics["loss"], rtol=1e-5)
    else:
        assert float(step_metrics["dln/accepted"]) == 0.0
        chex.assert_trees_all_equal(new.loss_params, state.loss_params)
        chex.assert_trees_all_close(new.student.params, m.result_a.state.params, rtol=1e-5)
        # The logged inner metrics are those of the kept student's unroll.
        np.testing.assert_allclose(step_metrics["loss"], m.result_a.metrics["loss"], rtol=1e-5)
        assert not np.allclose(ravel_pytree(new.student.params)[0],
                               ravel_pytree(m.result_b.state.params)[0])
    # The teacher learns and its memory advances either way.
    assert not np.allclose(ravel_pytree(new.teacher_params)[0],
                           ravel_pytree(state.teacher_params)[0])
    chex.assert_trees_all_close(new.teacher_memory, m.memory, rtol=1e-5, atol=1e-7)


def test_no_proposal_is_kept_before_keep_after_steps():
    method, splits, state, batches = _problem(keep_after=1)  # the "always" rule
    meta_gradients_and_outer_step = jit_meta_gradients_and_outer_step(method)
    # The student is at step 0 < 1.
    m, (first, first_metrics) = meta_gradients_and_outer_step(state, batches)
    assert float(first_metrics["dln/accepted"]) == 0.0
    chex.assert_trees_all_equal(first.loss_params, state.loss_params)
    chex.assert_trees_all_close(first.student.params, m.result_a.state.params, rtol=1e-5)
    assert not np.allclose(ravel_pytree(first.teacher_params)[0],
                           ravel_pytree(state.teacher_params)[0])
    k = method.steps_per_call
    _, (second, second_metrics) = meta_gradients_and_outer_step(
        first, method.batches(splits, seed=0, start_step=k))
    assert float(second_metrics["dln/accepted"]) == 1.0
    assert not np.allclose(ravel_pytree(second.loss_params)[0], ravel_pytree(first.loss_params)[0])


def test_descent_rule_keeps_only_a_proposal_that_lowers_the_validation_ce():
    # Two opposite proposals from one proper (warm) DLN: to first order one raises the
    # iteration's validation CE and the other lowers it, so exactly one is kept.
    base, _, state, batches = _problem(accept="proper_descent")
    state = state.replace(
        loss_params=dln_lib.warm_start_dln(state.loss_params, jax.random.PRNGKey(4)))
    kept = []
    for step_size in (0.05, -0.05):
        method = dataclasses.replace(base, dln_step_size=step_size)
        m, (new, step_metrics) = jit_meta_gradients_and_outer_step(method)(state, batches)
        assert float(dln_lib.probe_dln(m.new_dln)["corner_gap"]) <= method.proper_tolerance
        lowers = float(m.result_b.value) <= float(m.result_a.value)
        assert float(step_metrics["dln/accepted"]) == float(lowers)
        chex.assert_trees_all_equal(new.loss_params, m.new_dln if lowers else state.loss_params)
        kept_student = m.result_b.state if lowers else m.result_a.state
        chex.assert_trees_all_close(new.student.params, kept_student.params, rtol=1e-5)
        kept.append(lowers)
    assert sorted(kept) == [False, True]


def test_redraw_protocol_splits_train_into_disjoint_halves_per_draw():
    method = _method(protocol="redraw", redraw_every=2)
    splits = _splits()
    x_index = {tuple(np.round(x, 6)): i for i, x in enumerate(splits.train.x)}

    def members(b):
        tr = {x_index[tuple(np.round(x, 6))] for x in b["train"]["x"].reshape(-1, 3)}
        va = {x_index[tuple(np.round(x, 6))] for x in b["val"]["x"]}
        return tr, va

    draws = [members(method.batches(splits, 0, 3 * it)) for it in range(4)]
    for tr, va in draws:
        assert not tr & va  # student-train and meta-validation never share an example
    first_halves = method._train_and_val_splits(splits, 0, 0)
    second_halves = method._train_and_val_splits(splits, 0, 2)
    assert len(first_halves[0].y) == len(first_halves[1].y) == 20
    assert not np.array_equal(first_halves[0].x, second_halves[0].x)  # re-drawn


@pytest.mark.parametrize("target, max_mean_error", [("soft_margin", 0.05), ("bce", 0.1)])
def test_warm_start_fits_its_target(target, max_mean_error):
    phi = dln_lib.init_dln(jax.random.PRNGKey(0))
    warm = jax.jit(dln_lib.warm_start_dln, static_argnames="target")(
        phi, jax.random.PRNGKey(1), target=target)
    grid = jnp.linspace(0, 1, 11)
    if target == "bce":
        expected = dln_lib.bce_target(grid[:, None], grid[None, :])
    else:
        expected = dln_lib.soft_margin_target(grid[:, None], grid[None, :], 4.0)
    error = jnp.abs(dln_lib.pair_surface(warm, grid[:, None], grid[None, :]) - expected)
    assert float(error.mean()) < max_mean_error
    assert float(dln_lib.probe_dln(warm)["margin"]) > 3
    assert float(dln_lib.probe_dln(warm)["corner_gap"]) < 0.05


def test_bce_warm_start_still_pushes_saturated_wrong_classes():
    # A wrong class whose sigmoid output is 0.95: the soft margin's slope there is about
    # 2 (never above k = 4), the BCE target's ~1 / (1 - s) = 20, which is what cancels
    # the sigmoid's s (1 - s) = 0.0475 in the student's gradient.
    phi = dln_lib.init_dln(jax.random.PRNGKey(0))
    warm = jax.jit(dln_lib.warm_start_dln, static_argnames="target")

    def slope(params):
        return float(jax.grad(lambda s: dln_lib.pair_surface(params, 0.9, s))(0.95))

    bce = slope(warm(phi, jax.random.PRNGKey(1), target="bce"))
    margin = slope(warm(phi, jax.random.PRNGKey(1), target="soft_margin"))
    assert 10 < bce < 40
    assert bce > 3 * margin


def test_unknown_warm_target_is_rejected():
    with pytest.raises(ValueError, match="warm-start target"):
        dln_lib.warm_start_dln(dln_lib.init_dln(jax.random.PRNGKey(0)), jax.random.PRNGKey(1),
                               target="hinge")


@pytest.mark.parametrize("arg, method", [
    ("digits,noisy,smoke", "l2t-dln-fixed"),  # the default: the warm DLN, frozen
    # The released wide ResNet-8 and redraw protocol (the released DLN: no warm fit).
    ("fake_cifar10,smoke,released", "l2t-dln"),
])
def test_smoke_runs_end_to_end(tmp_path, arg, method):
    config = l2t_dln.get_config(arg)
    config.method = method
    if arg.startswith("fake_cifar10"):
        # The wide ResNet-8's second-order steps are slow on CPU: a shorter unroll on
        # fewer examples, and evaluation batches of the dev split's size (64), so one
        # eval program serves the dev and the test split.
        config.dln.update(unroll_steps=2, val_batch_size=8)
        config.train.update(batch_size=4, eval_batch_size=64)
    steps = config.dln.unroll_steps  # one iteration of the three stages
    config.train.update(num_steps=steps, log_every=steps, eval_every=steps,
                        checkpoint_every=steps)
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["method"] == method and 0 <= summary["test_error"] <= 100
    assert metrics.read_metrics(str(tmp_path))[-1]["step"] == steps


def test_dln_run_writes_its_records_and_resumes_exactly(tmp_path, monkeypatch):
    config = l2t_dln.get_config("digits,noisy,smoke")
    reference = train.train_and_evaluate(config, str(tmp_path / "reference"))
    records = metrics.read_metrics(str(tmp_path / "reference"))
    assert [r["step"] for r in records] == list(range(5, 21, 5))
    assert all(r["meta/nonfinite"] == 0 and "teacher/update_norm" in r for r in records)
    snapshots = np.load(tmp_path / "reference" / DLN_SNAPSHOTS_FILE)["snapshots"]
    assert snapshots.shape == (6, 5000)
    assert "dln_final_margin" in reference

    original = DLNTeaching.batches

    def crash_at_step_15(self, splits, seed, start_step):
        if start_step == 15:
            raise RuntimeError("simulated crash")
        return original(self, splits, seed, start_step)

    monkeypatch.setattr(DLNTeaching, "batches", crash_at_step_15)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train_and_evaluate(config, str(tmp_path / "crashed"))
    monkeypatch.undo()
    resumed = train.train_and_evaluate(config, str(tmp_path / "crashed"))
    assert resumed["test_error"] == reference["test_error"]
    assert resumed["dln_final_margin"] == reference["dln_final_margin"]
    strip = [{k: v for k, v in r.items() if k != "time"} for r in records]
    assert strip == [{k: v for k, v in r.items() if k != "time"}
                     for r in metrics.read_metrics(str(tmp_path / "crashed"))]


@pytest.mark.parametrize("field, value, message", [
    ("dln.protocol", "shuffle", "config.dln.protocol"),
    ("dln.init", "zeros", "config.dln.init"),
    ("dln.warm_target", "hinge", "config.dln.warm_target"),
    ("dln.unroll_steps", 0, "config.dln.unroll_steps"),
    ("dln.step_size", -1.0, "config.dln.step_size"),
    ("dln.accept", "improved", "config.dln.accept"),
    ("dln.proper_tolerance", -0.1, "config.dln.proper_tolerance"),
    ("dln.keep_after", -1, "config.dln.keep_after"),
    ("train.eval_every", 12, "multiple of config.dln.unroll_steps"),
])
def test_bad_dln_config_is_rejected(field, value, message):
    config = l2t_dln.get_config("digits,smoke")
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ConfigError, match=message):
        train.validate_config(config)


def test_dln_method_needs_its_section():
    config = l2t_dln.get_config("digits,smoke")
    del config["dln"]
    with pytest.raises(ConfigError, match="needs a config.dln section"):
        methods.validate(config)


def test_collapse_inversion_and_scale_growth_are_flagged(tmp_path):
    method = _method(num_snapshots=2)
    phi = dln_lib.init_dln(jax.random.PRNGKey(0))
    flat = ravel_pytree(phi)[0]
    grown = {**phi, "layer_4": -3.0 * phi["layer_4"]}  # 3x the scale, sign flipped
    state = method.init(jax.random.PRNGKey(1), _splits(), phi).replace(
        loss_params=grown, loss_snapshots=jnp.stack([flat, ravel_pytree(grown)[0]]))
    summary = {"final_dev_error": 45.0, "best_dev_error": 12.0}
    flags = save_dln(method, state, str(tmp_path), summary)
    np.testing.assert_allclose(flags["dln_scale_growth"], 3.0, rtol=1e-5)
    assert flags["collapsed"]
    margin = float(dln_lib.probe_dln(phi)["margin"])
    assert flags["dln_inverted"] == (margin > 0)  # flipping the sign flips the margin
    gap = float(dln_lib.probe_dln(grown)["corner_gap"])
    assert flags["dln_improper"] == (gap > method.proper_tolerance)
    healthy = save_dln(method, state.replace(loss_params=phi),
                       str(tmp_path), {"final_dev_error": 13.0, "best_dev_error": 12.0})
    assert not healthy["collapsed"] and healthy["dln_scale_growth"] == pytest.approx(1.0)


VARIANTS = ["digits", "mnist_5k", "mnist1d", "mnist1d_cnn", "cifar10", "cifar100",
            "fake_cifar10"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_config_variant_validates_with_the_released_defaults(variant):
    config = l2t_dln.get_config(variant + ",released")
    train.validate_config(config)
    d = config.dln
    assert (d.unroll_steps, d.val_batch_size, d.step_size, d.learning_rate) == (15, 100, 1e-3, 1e-3)
    assert (d.init, d.preserve_scale, d.accept) == ("released", False, "always")
    assert (config.optimizer.name, config.optimizer.learning_rate) == ("sgd", 0.1)
    assert config.train.batch_size == 25
    if variant.startswith(("cifar", "fake_cifar")):
        assert config.student.name == "resnet_wide" and d.protocol == "redraw"
        assert config.train.num_steps == 10 * 250 * 15  # 10 outer loops x 250 iterations
    # `warm` keeps its meaning: the released set-up with the DLN warm-started.
    warm = l2t_dln.get_config(variant + ",released,warm")
    assert warm.dln.init == "warm" and warm.optimizer == config.optimizer
    warm.dln.init = "released"
    assert warm.to_dict() == config.to_dict()


# The student rate dev error selects for the recommended recipe (docs/l2t_dln.md).
RECOMMENDED_RATE = {"digits": 1.0, "mnist_5k": 0.1, "mnist1d": 1.0, "mnist1d_cnn": 1.0,
                    "cifar10": 0.1, "cifar100": 0.1, "fake_cifar10": 0.1}


@pytest.mark.parametrize("variant", VARIANTS)
def test_defaults_are_the_recommended_recipe(variant):
    config = l2t_dln.get_config(variant + ",noisy")
    train.validate_config(config)
    d, released = config.dln, l2t_dln.get_config(variant + ",noisy,released")
    assert (d.init, d.warm_target, d.preserve_scale, d.accept) == (
        "warm", "soft_margin", True, "proper")
    assert (config.optimizer.name, config.optimizer.learning_rate) == (
        "sgd", RECOMMENDED_RATE[variant])
    # Nothing else differs from the released set-up.
    for section, fields in (("dln", ("init", "preserve_scale", "accept")),
                            ("optimizer", ("learning_rate",))):
        for field in fields:
            released[section][field] = config[section][field]
    assert released.to_dict() == config.to_dict()


def test_teacher_reads_the_meta_dev_split_not_the_selection_dev():
    method = _method()
    splits = _splits()
    meta = data.ArraySplit(splits.dev.x[:10] + 100.0, splits.dev.y[:10], splits.dev.y[:10])
    parted = data.Splits("toy", C, (3,), splits.train, splits.dev, splits.test, meta)
    val = method.batches(parted, seed=0, start_step=0)["val"]
    assert (val["x"] > 50).all()  # every validation example is a meta-dev one


def test_exploding_dln_proposals_stop_the_run_or_are_skipped_and_counted(tmp_path):
    # A DLN step of 1e6 makes every proposal's loss surface overflow.
    config = l2t_dln.get_config("digits,smoke")
    config.dln.step_size = 1e6
    summary = stop_then_skip(config, config.dln, tmp_path, step=5)
    records = metrics.read_metrics(str(tmp_path / "skip"))
    assert summary[train.SKIPPED_FIELD] == len(records) == 4
    # None was kept: the DLN and its surface stay the initial, finite ones.
    assert all(r["meta/nonfinite"] == 1 and r["dln/accepted"] == 0 for r in records)
    assert all(np.isfinite(r["dln/spread"]) for r in records)
    assert np.isfinite(summary["dln_scale_growth"])
