"""L2T-DLF: loss family, teachers, features, dev objective, meta-gradients, end to end."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import l2t_dlf, l2t_dln
from l2t_jax import engine, metrics, objectives, optimizers, teachers, train
from l2t_jax.errors import ConfigError, DivergenceError
from l2t_jax.losses.bilinear import bilinear_sigmoid_loss, identity_bilinear
from l2t_jax.methods import dlf, teaching
from l2t_jax.methods.dlf import make_dlf_loss_fn
from l2t_jax.methods.teaching import TeacherUpdate
from l2t_jax.students import build_student

C = 4


def test_untaught_bilinear_loss_is_minus_p_over_one_plus_p():
    logits = jnp.array([[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4]])
    labels = jnp.array([0, 3])
    p = jax.nn.softmax(logits)[jnp.arange(2), labels]
    params = identity_bilinear(C)
    value = bilinear_sigmoid_loss(params["W"], params["b"], logits, labels)
    np.testing.assert_allclose(value, -jnp.mean(p / (1 + p)), rtol=1e-6)


def test_smoothed_error_is_near_zero_when_right_and_near_one_when_confidently_wrong():
    labels = jnp.array([0, 1])
    right = jnp.array([[9.0, 0, 0, 0], [0, 9.0, 0, 0]])
    wrong = jnp.array([[0, 9.0, 0, 0], [9.0, 0, 0, 0]])
    assert float(objectives.smoothed_error(right, labels)) < 1e-6
    assert float(objectives.smoothed_error(wrong, labels)) > 0.99
    with pytest.raises(ConfigError, match="config.teacher.objective"):
        objectives.dev_objective("accuracy", right, labels)


@pytest.mark.parametrize("form", teachers.TEACHER_FORMS)
def test_every_teacher_form_starts_at_the_untaught_loss(form):
    teacher = teachers.DLFTeacher(form, C, teachers.NUM_FEATURES)
    params = teacher.init(jax.random.PRNGKey(0))
    logits = jax.random.normal(jax.random.PRNGKey(1), (8, C))
    labels = jnp.arange(8) % C
    features = jnp.array([0.3, 0.5, 0.8, 0.2])
    identity = identity_bilinear(C)
    np.testing.assert_allclose(
        teacher.loss(params, features, logits, labels),
        bilinear_sigmoid_loss(identity["W"], identity["b"], logits, labels), rtol=1e-6)


def test_state_gate_moves_w_with_the_student_state():
    teacher = teachers.DLFTeacher("state_gate", C, teachers.NUM_FEATURES, combine=True)
    params = teacher.init(jax.random.PRNGKey(0))
    params.update(W2=jnp.ones((C, C)), theta=jnp.array([4.0, 0, 0, 0]), b2=jnp.array(-2.0))
    early, _, mix = teacher.loss_parameters(params, jnp.array([0.0, 0, 0, 0]))
    late, _, _ = teacher.loss_parameters(params, jnp.array([1.0, 0, 0, 0]))
    gate = lambda z: 2 * jax.nn.sigmoid(z) - 1  # noqa: E731
    np.testing.assert_allclose(early, jnp.eye(C) + gate(-2.0), rtol=1e-6)
    np.testing.assert_allclose(late, jnp.eye(C) + gate(2.0), rtol=1e-6)
    assert float(mix) == pytest.approx(0.5)
    # What the step's metrics report of the loss it set (W_t = I + h_t * ones).
    described = teacher.describe(params, jnp.array([1.0, 0, 0, 0]))
    assert set(described) == {"dlf/gate", "dlf/mix", "dlf/W_diag_mean", "dlf/W_offdiag_mean",
                              "dlf/b_mean"}
    np.testing.assert_allclose(described["dlf/gate"], gate(2.0), rtol=1e-6)
    np.testing.assert_allclose(described["dlf/W_diag_mean"], 1 + gate(2.0), rtol=1e-6)
    np.testing.assert_allclose(described["dlf/W_offdiag_mean"], gate(2.0), rtol=1e-6)
    assert float(described["dlf/mix"]) == pytest.approx(0.5)
    assert float(described["dlf/b_mean"]) == 0.0
    static = teachers.DLFTeacher("static", C, teachers.NUM_FEATURES)
    assert set(static.describe(static.init(jax.random.PRNGKey(0)), jnp.zeros(4))) == {
        "dlf/W_diag_mean", "dlf/W_offdiag_mean", "dlf/b_mean"}


def test_a_teacher_reads_a_subset_of_the_features_or_its_own():
    teacher = teachers.DLFTeacher("state_gate", C, 2, combine=True)
    params = {**teacher.init(jax.random.PRNGKey(0)), "W2": jnp.ones((C, C))}
    state = engine.StudentState.create({"w": jnp.zeros(3)}, jax.random.PRNGKey(1),
                                       tx=optax.sgd(0.1), stats=teachers.initial_stats(C),
                                       step=3)
    logits = jax.random.normal(jax.random.PRNGKey(2), (8, C))
    output, batch = engine.ModelOutput(logits), {"y": jnp.arange(8) % C}
    s_t = teachers.student_features(state, logits, batch["y"], 10, C)[jnp.array([3, 0])]
    expected = teacher.student_loss(params, s_t, output, batch)
    for subset in (("dev_error", "iteration_fraction"), (3, 0)):
        loss_fn = make_dlf_loss_fn(teacher, 10, feature_subset=subset)
        np.testing.assert_allclose(loss_fn(params, output, batch, state), expected, rtol=1e-6)
        described = dlf.make_dlf_metrics_fn(teacher, 10, feature_subset=subset)(
            params, output, batch, state)
        chex.assert_trees_all_close(described, teacher.describe(params, s_t), rtol=1e-6)

    def constant_features(state, logits, labels, total_steps, num_classes):
        return jnp.array([0.5, 0.25], logits.dtype)

    loss_fn = make_dlf_loss_fn(teacher, 10, features_fn=constant_features)
    np.testing.assert_allclose(
        loss_fn(params, output, batch, state),
        teacher.student_loss(params, jnp.array([0.5, 0.25]), output, batch), rtol=1e-6)
    assert dlf.make_dlf_metrics_fn(object(), 10) is None  # a teacher without describe
    with pytest.raises(ConfigError, match="unknown student feature 'loss'"):
        make_dlf_loss_fn(teacher, 10, feature_subset=("loss",))
    with pytest.raises(ConfigError, match="no repeats"):
        make_dlf_loss_fn(teacher, 10, feature_subset=(0, "iteration_fraction"))
    with pytest.raises(ValueError, match="not both"):
        make_dlf_loss_fn(teacher, 10, features_fn=constant_features, feature_subset=(0,))


def test_features_and_stats_inside_the_scan():
    model = build_student(ml_collections.ConfigDict({"name": "mlp", "hidden": (8,)}), C)
    tx = optimizers.make_inner_optimizer(
        ml_collections.ConfigDict({"name": "sgd", "learning_rate": 0.1}), 10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(10, 6, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, C, size=(10, 6)), jnp.int32)
    dev_x, dev_y = x[0], y[0]
    state = engine.init_student_state(model, tx, jax.random.PRNGKey(0), x[0],
                                      teachers.initial_stats(C))
    seen = []

    def loss_fn(meta_params, output, batch, s):
        logits, labels = output.logits, batch["y"]
        features = teachers.student_features(s, logits, labels, total_steps=10, num_classes=C)
        seen.append(features)
        return jnp.mean(optax_ce(logits, labels)) + 0 * features.sum()

    stats_fn = teachers.make_stats_fn(model, dev_x, dev_y, dev_every=4, decay=0.5)
    step_fn = engine.make_student_step(model, loss_fn, tx, stats_fn=stats_fn)
    history = []
    for t in range(10):
        before = state
        state, m = jax.jit(step_fn)(None, state, {"x": x[t], "y": y[t]})
        expected_loss = 0.5 * before.stats["train_loss"] + 0.5 * m["cross_entropy"]
        np.testing.assert_allclose(state.stats["train_loss"], expected_loss, rtol=1e-6)
        history.append(float(state.stats["dev_error"]))
    # The dev error is refreshed at steps 4 and 8 only.
    assert history[0] == history[1] == history[2] == pytest.approx(1 - 1 / C)
    assert history[3] == history[4] == history[5] == history[6]
    features = teachers.student_features(state, jnp.zeros((2, C)), jnp.array([1, 1]), 10, C)
    np.testing.assert_allclose(features[0], 1.0)  # iteration fraction after 10 of 10 steps
    np.testing.assert_allclose(features[1], 1.0)  # argmax 0 vs labels 1: all wrong


def optax_ce(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]


def dlf_problem(form, dtype, features_grad, perturb=True, teacher=None, steps=20):
    """A tiny DLF meta-learning problem: student, batches, dev set, teacher params.

    `teacher` replaces the DLF teacher of `form` by another state-feature teacher;
    `steps` is the unroll's length (the dev error refreshes every 5 steps).
    """
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(C, 6))

    def sample(n):
        labels = rng.integers(0, C, size=n)
        return jnp.asarray(centers[labels] + rng.normal(size=(n, 6)), dtype), jnp.asarray(labels)

    batch = 8
    xs, ys = sample(steps * batch)
    batches = {"x": xs.reshape(steps, batch, 6), "y": ys.reshape(steps, batch)}
    dev_x, dev_y = sample(24)
    model = build_student(ml_collections.ConfigDict(
        {"name": "mlp", "hidden": (8,), "activation": "tanh", "dtype": jnp.dtype(dtype).name}), C)
    tx = optimizers.make_inner_optimizer(
        ml_collections.ConfigDict({"name": "sgd", "learning_rate": 0.5}), steps)
    if teacher is None:
        teacher = teachers.DLFTeacher(form, C, teachers.NUM_FEATURES, hidden=4, combine=True,
                                      bilinear_scale=4.0)
    params = teacher.init(jax.random.PRNGKey(1), dtype)
    if perturb:  # move every parameter off its initial value: no gradient is zero at W2 = 0
        params = jax.tree_util.tree_map(
            lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), dtype), params)
    # As every method builds its students: the stats take the student's dtype.
    state = engine.init_student_state(model, tx, jax.random.PRNGKey(2), dev_x[:1],
                                      teachers.initial_stats(C))
    step_fn = engine.make_student_step(
        model, make_dlf_loss_fn(teacher, steps, features_grad), tx,
        stats_fn=teachers.make_stats_fn(model, dev_x, dev_y, dev_every=5))
    update = TeacherUpdate(engine.FullBackprop(), None, objective="smoothed_error")
    objective = update.dev_objective_fn(model, {"x": dev_x, "y": dev_y})
    return step_fn, objective, params, state, batches


@pytest.mark.parametrize("form", teachers.TEACHER_FORMS)
def test_dlf_meta_gradient_matches_central_differences_float64(x64, form):
    # With gradients through the state features the meta-gradient is the exact total
    # derivative (the argmax-based features are piecewise constant: zero derivative).
    step_fn, objective, params, state, batches = dlf_problem(form, jnp.float64, True)
    result = jax.jit(lambda p: engine.FullBackprop(remat="sqrt")(
        step_fn, objective, p, state, batches))(params)

    @jax.jit
    def value(p):
        final, _ = engine.unroll(step_fn, p, state, batches)
        return objective(p, final)[0]

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    rng = np.random.default_rng(3)
    # Directional derivatives along random directions (every coordinate would be slow
    # for the MLP teacher): <grad, v> vs (f(p + eps v) - f(p - eps v)) / 2 eps.
    for _ in range(3):
        v = jnp.asarray(rng.normal(size=flat.shape))
        eps = 1e-6
        numeric = (value(unravel(flat + eps * v)) - value(unravel(flat - eps * v))) / (2 * eps)
        analytic = jnp.dot(jax.flatten_util.ravel_pytree(result.grad)[0], v)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-10)
    assert float(jnp.abs(result.grad["W"]).max()) > 1e-6
    if form != "static":
        # The demo's default stops gradients through s_t: a different (partial) gradient.
        step_fn, objective, params, state, batches = dlf_problem(form, jnp.float64, False)
        partial = engine.FullBackprop()(step_fn, objective, params, state, batches)
        assert not np.allclose(jax.flatten_util.ravel_pytree(partial.grad)[0],
                               jax.flatten_util.ravel_pytree(result.grad)[0], rtol=1e-4)


def test_float64_meta_gradient_is_exact_under_every_remat_policy(x64):
    # Gradients through s_t, a float64 student built as every method builds one: its
    # features must be float64 too. (float32 running stats put ~1e-6 relative error into
    # the meta-gradient, and can let the remat policies' recomputations round differently.)
    step_fn, objective, params, state, batches = dlf_problem("state_gate", jnp.float64,
                                                             True, steps=10)
    results = {remat: jax.jit(lambda p, remat=remat: engine.FullBackprop(remat=remat)(
        step_fn, objective, p, state, batches))(params) for remat in engine.REMAT_POLICIES}
    # The same student with its stats made float64 by hand.
    float64_stats = state.replace(stats=jax.tree_util.tree_map(
        lambda s: s.astype(jnp.float64), state.stats))
    reference = jax.jit(lambda p: engine.FullBackprop()(
        step_fn, objective, p, float64_stats, batches))(params)
    grads = {k: jax.flatten_util.ravel_pytree(r.grad)[0] for k, r in results.items()}
    expected = jax.flatten_util.ravel_pytree(reference.grad)[0]
    scale = float(jnp.abs(expected).max())
    assert scale > 1e-6
    for remat, grad in grads.items():
        np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-15 * scale, err_msg=remat)
    assert results["none"].state.stats["train_loss"].dtype == jnp.float64


def test_state_gate_gets_a_meta_gradient_at_its_initial_values():
    step_fn, objective, params, state, batches = dlf_problem("state_gate", jnp.float32, False,
                                                             perturb=False)
    meta_grad = jax.jit(lambda p: engine.FullBackprop()(
        step_fn, objective, p, state, batches).grad)
    assert float(jnp.abs(meta_grad(params)["W2"]).max()) > 1e-6
    # The demo's init (gate_init_scale = 0: theta = 0) is a saddle: h_t = 0 and W2 = 0
    # leave the gate's parameters exactly zero meta-gradients; its teacher stays static.
    demo = meta_grad({**params, "theta": jnp.zeros_like(params["theta"])})
    assert all(not np.any(demo[k]) for k in ("W2", "theta", "b2"))
    assert float(jnp.abs(demo["W"]).max()) > 1e-6


def test_a_saved_config_from_before_gate_init_scale_builds_the_init_it_ran_with():
    config = l2t_dlf.get_config("digits,smoke")
    assert dlf.build_teacher(config, C).gate_init_scale == 1.0
    del config.teacher.gate_init_scale
    assert dlf.build_teacher(config, C).gate_init_scale == 0.0
    del config.teacher.features  # from before the feature subsets: every feature
    assert dlf.build_teacher(config, C).num_features == teachers.NUM_FEATURES


def test_the_configured_feature_subset_sizes_the_teacher_and_is_l2t_dlf_s_only():
    from configs import robust

    config = l2t_dlf.get_config("digits,smoke")
    assert config.teacher.features == l2t_dlf.FEATURE_NAMES == teachers.FEATURE_NAMES
    assert dlf.configured_features(config) is None  # all, in order: nothing selected
    config.teacher.features = ("dev_error", "train_loss")
    train.validate_config(config)
    assert dlf.build_teacher(config, C).num_features == 2
    config = robust.get_config("digits,smoke")
    config.method = "l2t-gce"
    config.teacher.features = ("dev_error",)
    with pytest.raises(ConfigError, match="config.teacher.features selects the l2t-dlf"):
        train.validate_config(config)


def test_nonfinite_meta_gradient_is_skipped_never_applied():
    update = TeacherUpdate(engine.FullBackprop(), optax.adam(0.1))
    teacher = {"W": jnp.eye(2)}
    opt_state = update.tx.init(teacher)
    bad = engine.MetaGradient(jnp.asarray(1.0), {"W": jnp.full((2, 2), jnp.nan)}, None, {},
                              {"dev_error": jnp.asarray(0.5)})
    new_teacher, new_opt_state, m = update.apply(teacher, opt_state, bad)
    chex.assert_trees_all_equal(new_teacher, teacher)
    chex.assert_trees_all_equal(new_opt_state, opt_state)
    assert float(m["meta/nonfinite"]) == 1.0
    good = bad._replace(grad={"W": jnp.ones((2, 2))})
    new_teacher, _, m = update.apply(teacher, opt_state, good)
    assert float(m["meta/nonfinite"]) == 0.0
    assert not np.allclose(new_teacher["W"], teacher["W"])


@pytest.mark.parametrize("method, overrides", [
    ("l2t-dlf", {}),
    ("l2t-dlf-fixed", {}),
    ("l2t-dlf", {"num_episodes": 0, "teach_online": True}),
    ("l2t-dlf", {"form": "mlp", "objective": "smoothed_error", "restart": "fixed",
                 "pretrain_steps": 10, "features": ("iteration_fraction", "dev_error")}),
])
def test_smoke_runs_every_mode_end_to_end(tmp_path, method, overrides):
    config = l2t_dlf.get_config("digits,noisy,smoke")
    config.method = method
    config.teacher.update(overrides)
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["method"] == method and 0 <= summary["test_error"] < 60
    records = metrics.read_metrics(str(tmp_path))
    assert records[-1]["step"] == config.train.num_steps
    # The loss the teacher set, averaged over each logged stretch of steps.
    described = {"dlf/W_diag_mean", "dlf/W_offdiag_mean", "dlf/b_mean", "dlf/mix"}
    if config.teacher.form == "state_gate":
        described.add("dlf/gate")
        assert all(-1 < r["dlf/gate"] < 1 for r in records)
    assert all(described <= set(r) for r in records)
    if method == "l2t-dlf" and config.teacher.num_episodes:
        episodes = metrics.read_metrics(str(tmp_path / dlf.TEACHER_DIR))
        assert [r["step"] for r in episodes] == [10, 20, 30]
        assert all(r["meta/nonfinite"] == 0 for r in episodes)
        assert all(described <= set(r) for r in episodes)
    if config.teacher.teach_online:
        assert "meta/objective" in records[-1]
    if "features" in overrides:  # the picture reads the teacher's two features
        assert dlf.draw_dlf_loss(config, str(tmp_path), records, summary)


def test_teacher_phase_resumes_exactly(tmp_path, monkeypatch):
    config = l2t_dlf.get_config("digits,noisy,smoke")
    reference = train.train_and_evaluate(config, str(tmp_path / "reference"))
    original = dlf.EpisodicTeacherTraining.batches

    def crash_in_episode_3(self, splits, seed, start_step):
        if start_step == 20:
            raise RuntimeError("simulated crash")
        return original(self, splits, seed, start_step)

    monkeypatch.setattr(dlf.EpisodicTeacherTraining, "batches", crash_in_episode_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train_and_evaluate(config, str(tmp_path / "crashed"))
    monkeypatch.undo()
    resumed = train.train_and_evaluate(config, str(tmp_path / "crashed"))
    assert resumed["test_error"] == reference["test_error"]
    assert (metrics.read_metrics(str(tmp_path / "crashed" / dlf.TEACHER_DIR))
            == metrics.read_metrics(str(tmp_path / "reference" / dlf.TEACHER_DIR)))


@pytest.mark.parametrize("field, value, message", [
    ("teacher.form", "transformer", "config.teacher.form"),
    ("teacher.features", ("iteration_fraction", "loss"), "config.teacher.features must"),
    ("teacher.features", (), "config.teacher.features must"),
    ("teacher.objective", "accuracy", "config.teacher.objective"),
    ("teacher.restart", "warm", "config.teacher.restart"),
    ("teacher.learning_rate", 0.0, "config.teacher.learning_rate"),
    ("teacher.gate_init_scale", -1.0, "config.teacher.gate_init_scale"),
    ("teacher.on_nonfinite", "ignore", "config.teacher.on_nonfinite"),
    ("teacher.num_episodes", 0, "needs config.teacher.num_episodes >= 1"),
    ("teacher.pretrain_steps", 10, "needs config.teacher.restart='fixed'"),
])
def test_bad_teacher_config_is_rejected(field, value, message):
    config = l2t_dlf.get_config("digits,smoke")
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ConfigError, match=message):
        train.validate_config(config)


@pytest.mark.parametrize("dataset", ["digits", "mnist_5k", "mnist1d"])
def test_long_option_trains_the_dln_groups_student_on_its_schedule(dataset):
    # The L2T-DLN group's schedule: the released set-up's student rate, SGD 0.1 (ce-long).
    dlf, dln = l2t_dlf.get_config(dataset + ",long"), l2t_dln.get_config(dataset + ",released")
    assert dlf.student == dln.student and dlf.optimizer == dln.optimizer
    for field in ("num_steps", "batch_size", "eval_every"):
        assert dlf.train[field] == dln.train[field]
    assert dlf.teacher.teach_online and not dlf.teacher.num_episodes
    assert not dlf.teacher.pretrain_steps
    train.validate_config(dlf)


def test_long_option_teaches_a_batch_norm_student_online(tmp_path):
    config = l2t_dlf.get_config("mnist_5k,noisy,long,smoke")
    assert config.student.batch_norm
    # Evaluation batches of the dev split's size: one eval program for dev and test.
    config.train.eval_batch_size = config.data.dev_size
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert 0 <= summary["test_error"] <= 100
    records = metrics.read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [10, 20]
    assert all(r["meta/nonfinite"] == 0 and r["meta/grad_norm"] > 0 for r in records)


def test_episodes_and_online_teacher_read_the_meta_dev_split():
    from l2t_jax import data

    config = l2t_dlf.get_config("digits,smoke")
    config.data.meta_dev_size = 100
    splits = data.load_splits(config.data)
    assert len(splits.meta_dev.y) == 100 and len(splits.dev.y) == 200
    teacher = dlf.build_teacher(config, splits.num_classes)
    episode = dlf.build_episodic(config, splits, teacher).batches(splits, seed=0, start_step=0)
    np.testing.assert_array_equal(episode["dev"]["x"], splits.meta_dev.x)
    config.teacher.update(num_episodes=0, teach_online=True)
    online = dlf.build_taught_student(config, splits, teacher, taught=True).batches(
        splits, seed=0, start_step=0)
    np.testing.assert_array_equal(online["dev"]["y"], splits.meta_dev.y)
    np.testing.assert_array_equal(online["feature_dev"]["x"],
                                  splits.meta_dev.x[:config.teacher.feature_dev_size])


def test_pretrained_start_follows_the_seed_and_starts_every_method(tmp_path):
    from l2t_jax import data

    config = l2t_dlf.get_config("digits,smoke")
    config.teacher.update(restart="fixed", pretrain_steps=100)
    splits = data.load_splits(config.data)
    episodic = dlf.build_episodic(config, splits, dlf.build_teacher(config, splits.num_classes))
    rng = jax.random.PRNGKey(0)
    starts = [teaching.pretrained_start(
        episodic.model, episodic.tx, rng, splits, seed, steps=config.teacher.pretrain_steps,
        batch_size=config.train.batch_size, augment=config.data.augment,
        stats=teachers.initial_stats(splits.num_classes), population=episodic.population)
        for seed in (0, 0, 1)]
    chex.assert_trees_all_equal(starts[0].params, starts[1].params)
    # The pre-training data order is the run's seed (not always seed 0).
    assert not np.allclose(starts[0].params["Dense_0"]["kernel"],
                           starts[2].params["Dense_0"]["kernel"])
    assert int(starts[0].step) == 0

    # Every method of the group teaches from the pre-trained student: after the same
    # 10 steps, each is better than CE from scratch (13% test error here; the
    # pre-trained runs 3-7%).
    config.train.update(num_steps=10, eval_every=10)
    errors = {}
    for method in ("ce", "l2t-dlf-fixed", "l2t-dlf"):
        config.method = method
        errors[method] = train.train_and_evaluate(
            config, str(tmp_path / method))["final_test_error"]
    config.method, config.teacher.pretrain_steps = "ce", 0
    scratch = train.train_and_evaluate(config, str(tmp_path / "scratch"))["final_test_error"]
    assert max(errors.values()) < scratch, (errors, scratch)


def test_an_exploding_teacher_stops_the_run_in_one_line(tmp_path):
    # Adam at 1e6: every parameter moves by ~1e6 per update, the loss is garbage.
    config = l2t_dlf.get_config("digits,smoke")
    config.teacher.learning_rate = 1e6
    with pytest.raises(DivergenceError, match="meta/teacher_norm .* config.teacher's") as error:
        train.train_and_evaluate(config, str(tmp_path))
    assert "\n" not in str(error.value)
    assert not (tmp_path / train.SUMMARY_FILE).exists()
    # The diverged step is in the metrics, for the user to see.
    records = metrics.read_metrics(str(tmp_path / dlf.TEACHER_DIR))
    assert records[-1]["meta/teacher_norm"] > 1e6 * records[0]["meta/teacher_norm"]


def stop_then_skip(config, section, workdir, step: int) -> dict:
    """Runs `config` with ``section.on_nonfinite="raise"``, then ``"skip"``.

    Both runs are one program (the policy is the driver's), compiled once. Asserts the
    first stops at `step` without a summary; returns the second's summary.
    """
    section.on_nonfinite = "raise"
    with pytest.raises(DivergenceError, match=f"non-finite teacher update at step {step}\\b"):
        train.train_and_evaluate(config, str(workdir / "raise"))
    assert not (workdir / "raise" / train.SUMMARY_FILE).exists()
    section.on_nonfinite = "skip"
    return train.train_and_evaluate(config, str(workdir / "skip"))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the rate itself
def test_an_overflowing_teacher_update_stops_the_run_or_is_skipped_and_counted(tmp_path):
    # Adam at 1e39 overflows float32: every proposed teacher is non-finite.
    config = l2t_dlf.get_config("digits,smoke")
    config.teacher.learning_rate = 1e39
    summary = stop_then_skip(config, config.teacher, tmp_path, step=10)
    records = metrics.read_metrics(str(tmp_path / "skip" / dlf.TEACHER_DIR))
    assert summary[train.SKIPPED_FIELD] == len(records) == 3
    assert all(r["meta/nonfinite"] == 1 for r in records)
    # Nothing non-finite was kept: the student trained under the initial teacher.
    assert summary["test_error"] < 50

