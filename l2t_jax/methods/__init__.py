"""Methods: what is trained and how, built from a config as pure `init` / `outer_step`.

* ``"ce"``: the student trained on cross-entropy (the baseline).
* ``"l2t-dlf"``: L2T-DLF: a teacher is trained (episodes and/or online), then a fresh
  student is taught by it.
* ``"l2t-dlf-fixed"``: the same loss family at the teacher's untaught initial
  parameters (separates the loss form from the teaching).
* ``"l2t-dln"``: L2T-DLN: an LSTM teacher updates the student's loss network while the
  student trains (`methods.dln.DLNTeaching`).
* ``"l2t-dln-fixed"``: the same loss network frozen at its initialisation.

``config.teacher.population_size`` (L2T-DLF episodes) and ``config.dln.population_size``
(L2T-DLN) train P students per teacher update and average the teacher's gradient over
them; ``config.mesh`` spreads them (and each batch) over devices (`build_population`).
"""

from __future__ import annotations

import jax
import optax

from l2t_jax import engine, optimizers, parallel, students, teachers
from l2t_jax.data import Splits
from l2t_jax.errors import ConfigError
from l2t_jax.losses import cross_entropy_loss
from l2t_jax.losses import dln as dln_lib
from l2t_jax.methods.dlf import EpisodicTeacherTraining, make_dlf_loss_fn
from l2t_jax.methods.dln import ACCEPT_RULES, PROTOCOLS, STUDENT_FEATURE_NAMES, DLNTeaching
from l2t_jax.methods.teaching import TeacherUpdate, Teaching
from l2t_jax.objectives import DEV_OBJECTIVES
from l2t_jax.teachers.lstm import CoordinateLSTM

DLF_METHODS = ("l2t-dlf", "l2t-dlf-fixed")
DLN_METHODS = ("l2t-dln", "l2t-dln-fixed")
METHOD_NAMES = ("ce",) + DLF_METHODS + DLN_METHODS
DLN_INITS = ("released", "warm")
RESTARTS = ("fixed", "fresh")
NONFINITE_POLICIES = ("skip", "raise")
TEACHER_OPTIMIZERS = ("adam", "sgd", "momentum")


def validate_teacher_config(config) -> None:
    """Raises a one-line ConfigError for a bad ``teacher`` config (DLF methods)."""
    t = config.teacher
    if t.form not in teachers.TEACHER_FORMS:
        raise ConfigError(
            f"unknown config.teacher.form {t.form!r}; choose one of {teachers.TEACHER_FORMS}"
        )
    checks = [
        (t.objective in DEV_OBJECTIVES,
         f"config.teacher.objective must be one of {DEV_OBJECTIVES}"),
        (t.restart in RESTARTS, f"config.teacher.restart must be one of {RESTARTS}"),
        (t.on_nonfinite in NONFINITE_POLICIES,
         f"config.teacher.on_nonfinite must be one of {NONFINITE_POLICIES}"),
        (t.optimizer in TEACHER_OPTIMIZERS,
         f"config.teacher.optimizer must be one of {TEACHER_OPTIMIZERS}"),
        (t.learning_rate > 0, "config.teacher.learning_rate must be > 0"),
        (t.clip_norm >= 0, "config.teacher.clip_norm must be >= 0 (0: no clipping)"),
        (t.num_episodes >= 0, "config.teacher.num_episodes must be >= 0"),
        (t.episode_steps >= 1, "config.teacher.episode_steps must be >= 1"),
        (t.pretrain_steps >= 0, "config.teacher.pretrain_steps must be >= 0"),
        (t.online_window >= 1, "config.teacher.online_window must be >= 1"),
        (t.dev_every >= 1, "config.teacher.dev_every must be >= 1"),
        (t.checkpoint_every >= 1, "config.teacher.checkpoint_every must be >= 1 (episodes)"),
        (t.hidden >= 1, "config.teacher.hidden must be >= 1"),
        (t.bilinear_scale > 0, "config.teacher.bilinear_scale must be > 0"),
        (t.gate_init_scale >= 0, "config.teacher.gate_init_scale must be >= 0 (0: the demo's "
         "init, where the state gate never opens)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_population_size(config, "teacher", trains_population=(
        config.method == "l2t-dlf" and t.num_episodes > 0), what="the teacher's episodes "
        "(config.teacher.num_episodes >= 1 with method 'l2t-dlf')")
    if config.method == "l2t-dlf" and not (t.num_episodes or t.teach_online):
        raise ConfigError(
            "l2t-dlf needs config.teacher.num_episodes >= 1 or config.teacher.teach_online=True "
            "(otherwise nothing teaches: use method 'l2t-dlf-fixed')"
        )
    if t.pretrain_steps and t.restart != "fixed":
        raise ConfigError(
            "config.teacher.pretrain_steps > 0 needs config.teacher.restart='fixed' (fresh "
            "restarts never start from the pre-trained student); set one of them"
        )
    if t.teach_online and config.train.log_every % t.online_window:
        raise ConfigError(
            f"config.train.log_every ({config.train.log_every}) must be a multiple of "
            f"config.teacher.online_window ({t.online_window}) when teach_online"
        )


def validate_dln_config(config) -> None:
    """Raises a one-line ConfigError for a bad ``dln`` config (DLN methods)."""
    d = config.dln
    unroll = d.unroll_steps
    checks = [
        (d.init in DLN_INITS, f"config.dln.init must be one of {DLN_INITS}"),
        (d.protocol in PROTOCOLS, f"config.dln.protocol must be one of {PROTOCOLS}"),
        (d.accept in ACCEPT_RULES, f"config.dln.accept must be one of {ACCEPT_RULES}"),
        (d.proper_tolerance >= 0, "config.dln.proper_tolerance must be >= 0"),
        (d.keep_after >= 0, "config.dln.keep_after must be >= 0 (student steps)"),
        (d.objective in DEV_OBJECTIVES, f"config.dln.objective must be one of {DEV_OBJECTIVES}"),
        (d.on_nonfinite in NONFINITE_POLICIES,
         f"config.dln.on_nonfinite must be one of {NONFINITE_POLICIES}"),
        (d.hidden >= 1 and d.depth >= 1, "config.dln.hidden and config.dln.depth must be >= 1"),
        (d.teacher_hidden >= 1 and d.teacher_cells >= 2,
         "config.dln.teacher_hidden must be >= 1 and config.dln.teacher_cells >= 2"),
        (isinstance(unroll, int) and unroll >= 1, "config.dln.unroll_steps must be an int >= 1"),
        (d.val_batch_size >= 1, "config.dln.val_batch_size must be >= 1"),
        (d.step_size > 0, "config.dln.step_size must be > 0"),
        (d.learning_rate > 0, "config.dln.learning_rate must be > 0"),
        (d.clip_norm >= 0, "config.dln.clip_norm must be >= 0 (0: no clipping)"),
        (d.warm_steps >= 1, "config.dln.warm_steps must be >= 1"),
        (d.warm_target in dln_lib.WARM_TARGETS,
         f"config.dln.warm_target must be one of {dln_lib.WARM_TARGETS}"),
        (d.redraw_every >= 1, "config.dln.redraw_every must be >= 1 (iterations)"),
        (d.num_snapshots >= 2, "config.dln.num_snapshots must be >= 2"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_population_size(config, "dln", trains_population=config.method == "l2t-dln",
                              what="method 'l2t-dln'")
    if config.method == "l2t-dln":
        for field in ("log_every", "eval_every", "checkpoint_every", "num_steps"):
            if config.train[field] % unroll:
                raise ConfigError(
                    f"config.train.{field} ({config.train[field]}) must be a multiple of "
                    f"config.dln.unroll_steps ({unroll}): one L2T-DLN iteration trains "
                    "the student that many steps"
                )


def _validate_population_size(config, section: str, trains_population: bool,
                              what: str) -> None:
    """Checks ``config.<section>.population_size`` (an int >= 1; > 1 only where used)."""
    size = config[section].get("population_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"config.{section}.population_size must be an integer >= 1, got "
                          f"{size!r}")
    if size > 1 and not trains_population:
        raise ConfigError(f"config.{section}.population_size > 1 applies to {what} only; "
                          "set it to 1 here")


def build_population(config, section: str, batch_size: int) -> parallel.Population:
    """The students per teacher update and their mesh, from the config.

    Args:
        config: the experiment config; reads ``config.<section>.population_size`` and
            ``config.mesh`` (``{"population": n, "data": m}``, -1 = the rest, see
            `parallel.mesh_shape`). No ``mesh`` or every size 1: one device, no mesh.
            Otherwise the mesh spans all devices (of every host).
        section: ``"teacher"`` (L2T-DLF) or ``"dln"`` (L2T-DLN).
        batch_size: B of the inner steps (must split over the data axis).

    Returns:
        The population (`parallel.SINGLE_STUDENT` for P = 1 without a mesh).

    Raises:
        ConfigError: a bad mesh, or P or B that does not split over it.
    """
    size = config[section].get("population_size", 1)
    spec = config.get("mesh")
    mesh = None
    if spec is not None and any(v != 1 for v in dict(spec.items()).values()):
        mesh = parallel.make_mesh(spec)
        parallel.check_population_shapes(mesh, size, batch_size)
    return parallel.Population(size, mesh)


def teacher_section(config) -> str | None:
    """The config section of the method's teacher: ``"teacher"`` (L2T-DLF), ``"dln"``
    (L2T-DLN), or None (CE has no teacher)."""
    if config.method in DLF_METHODS:
        return "teacher"
    if config.method in DLN_METHODS:
        return "dln"
    return None


def validate_method_config(config) -> None:
    """Checks ``config.method`` and its section (``teacher`` for DLF, ``dln`` for DLN)."""
    if config.method not in METHOD_NAMES:
        raise ConfigError(
            f"unknown config.method {config.method!r}; choose one of {METHOD_NAMES}"
        )
    section = teacher_section(config)
    if section is None:
        return
    validate, example = {"teacher": (validate_teacher_config, "configs/l2t_dlf.py"),
                         "dln": (validate_dln_config, "configs/l2t_dln.py")}[section]
    if section not in config:
        raise ConfigError(
            f"method {config.method!r} needs a config.{section} section (see {example})"
        )
    validate(config)
    build_population(config, section, config.train.batch_size)  # the mesh fits


def build_teacher(config, num_classes: int) -> teachers.DLFTeacher:
    """The DLF teacher's structure from ``config.teacher``.

    A run's saved config from before ``gate_init_scale`` existed gets 0, the init it ran
    with, so that its pictures can still be drawn.
    """
    t = config.teacher
    return teachers.DLFTeacher(t.form, num_classes, teachers.NUM_FEATURES, t.hidden,
                               t.combine, t.bilinear_scale, t.get("gate_init_scale", 0.0))


def build_teacher_update(config, section: str | None = None) -> TeacherUpdate:
    """Estimator, optimizer (with global-norm clipping), objective, non-finite policy.

    Read from ``config.<section>``, by default the method's (`teacher_section`):
    ``config.teacher`` for L2T-DLF and ``config.dln`` for L2T-DLN (whose teacher is
    always trained by Adam, as released).
    """
    t = config[section or teacher_section(config)]
    optimizer = t.get("optimizer", "adam")
    if optimizer == "adam":
        tx = optax.adam(t.learning_rate)
    else:
        tx = optax.sgd(t.learning_rate, momentum=0.9 if optimizer == "momentum" else None)
    if t.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(t.clip_norm), tx)
    return TeacherUpdate(engine.make_estimator(config.engine), tx, t.objective, t.sharpness,
                         t.on_nonfinite)


def initial_loss_params(config, num_classes: int, rng: jax.Array):
    """What the student's loss starts from: DLF teacher parameters or the DLN's ``phi``.

    Args:
        config: the experiment config (a method other than ``"ce"``).
        num_classes: C.
        rng: PRNG key.

    Returns:
        The parameter pytree the teaching phase starts from.
    """
    if config.method in DLF_METHODS:
        return build_teacher(config, num_classes).init(rng)
    d = config.dln
    init_rng, warm_rng = jax.random.split(rng)
    phi = dln_lib.init_dln(init_rng, d.hidden, d.depth)
    if d.init == "warm":
        phi = jax.jit(dln_lib.warm_start_dln, static_argnames=("target", "steps"))(
            phi, warm_rng, target=d.warm_target, steps=d.warm_steps,
            sharpness=d.warm_sharpness)
    return phi


def build_dln_teaching(config, splits: Splits) -> DLNTeaching:
    """The L2T-DLN method (the reported student is the one it trains: member 0 of a
    population)."""
    d = config.dln
    return DLNTeaching(
        model=students.build_student(config.student, splits.num_classes),
        tx=optimizers.make_inner_optimizer(config.optimizer, config.train.num_steps),
        teacher=CoordinateLSTM(d.teacher_hidden, d.teacher_cells,
                               len(STUDENT_FEATURE_NAMES) if d.student_features else 0),
        update=build_teacher_update(config),
        steps_per_call=d.unroll_steps,
        batch_size=config.train.batch_size,
        val_batch_size=d.val_batch_size,
        dln_step_size=d.step_size,
        total_steps=config.train.num_steps,
        num_classes=splits.num_classes,
        augment=config.data.augment,
        protocol=d.protocol,
        redraw_every=d.redraw_every,
        num_snapshots=d.num_snapshots,
        preserve_scale=d.preserve_scale,
        population=build_population(config, "dln", config.train.batch_size),
        accept=d.accept,
        proper_tolerance=d.proper_tolerance,
        keep_after=d.keep_after,
    )


def _stats_builder(config, model):
    def build(dev_x, dev_y):
        return teachers.make_stats_fn(model, dev_x, dev_y, config.teacher.dev_every)
    return build


def build_episodic(config, splits: Splits) -> EpisodicTeacherTraining:
    """The episodic teacher-training phase of L2T-DLF."""
    model = students.build_student(config.student, splits.num_classes)
    t = config.teacher
    return EpisodicTeacherTraining(
        model=model,
        tx=optimizers.make_inner_optimizer(config.optimizer, t.episode_steps),
        teacher=build_teacher(config, splits.num_classes),
        update=build_teacher_update(config, "teacher"),
        steps_per_call=t.episode_steps,
        batch_size=config.train.batch_size,
        stats_builder=_stats_builder(config, model),
        restart=t.restart,
        pretrain_steps=t.pretrain_steps,
        features_grad=t.features_grad,
        augment=config.data.augment,
        feature_dev_size=t.feature_dev_size,
        population=build_population(config, "teacher", config.train.batch_size),
    )


def build_teaching(config, splits: Splits) -> Teaching | DLNTeaching:
    """The phase that trains the reported student: CE, under a DLF teacher or a DLN."""
    if config.method == "l2t-dln":
        return build_dln_teaching(config, splits)
    model = students.build_student(config.student, splits.num_classes)
    tx = optimizers.make_inner_optimizer(config.optimizer, config.train.num_steps)
    common = dict(model=model, tx=tx, augment=config.data.augment,
                  batch_size=config.train.batch_size)
    if config.method in ("ce", "l2t-dln-fixed"):
        loss_fn = cross_entropy_loss if config.method == "ce" else dln_lib.dln_loss
        return Teaching(loss_fn=loss_fn, steps_per_call=config.train.log_every, **common)
    t = config.teacher
    online = config.method == "l2t-dlf" and t.teach_online
    return Teaching(
        loss_fn=make_dlf_loss_fn(build_teacher(config, splits.num_classes),
                                 config.train.num_steps, t.features_grad),
        steps_per_call=t.online_window if online else config.train.log_every,
        stats_builder=_stats_builder(config, model),
        initial_stats=teachers.initial_stats(splits.num_classes),
        teacher_update=build_teacher_update(config) if online else None,
        feature_dev_size=t.feature_dev_size,
        **common,
    )
