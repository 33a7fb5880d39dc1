r"""Offline distillation: KD, attention transfer, and their weights set by a loss teacher.

Run (mnist1d, 1-D CNN target -> MLP student, 40% label noise; about a minute on 2 CPU
cores, the target model trained first in WORKDIR/target):
  python -m launch.train --config=configs/distill.py:mnist1d,noisy --workdir=/tmp/kd
  ... --config.method=l2t-kd       # alpha and T set by a loss teacher
  ... --config.method=kd-target    # the target model alone
  ... --config.method=ce           # the student alone (results: "kd-student")
Reuse a trained target model (a kd-target run, or another run's WORKDIR/target; trained
there first if missing):  --config.target.workdir=/tmp/kd_target

The argument after ':' is a comma-separated list: one setting and options.
  settings: mnist1d (default; 1-D CNN target, MLP student: the MLP lacks the CNN's
            translation bias, the gap KD closes), mnist_5k (WRN-10-2 target, WRN-10-1
            student; 1,000 steps of batch 32),
            cifar10 / cifar100 (the papers' setting, for a GPU: WRN-40-2 target, WRN-16-1
            student, SGD 0.1 momentum 0.9, wd 5e-4, 200 epochs, lr x0.2 at 60 / 120 /
            160, batch 128), fake_cifar10 (that setting on random data, a few steps)
  options:  noisy (40% symmetric noise on the training labels, the target trained on the
            same labels), moonshine (the student is the target's own architecture with
            cheap blocks, --config.student.conv=dconv (the default), b2, g8b2, ...:
            Crowley et al. 2018; the names in l2t_jax/students/cheap.py),
            smoke (seconds; for tests)

Methods (`--config.method`): kd-target, kd, at, at-kd (AT needs a student with feature
maps: not the MLP), l2t-kd, l2t-at, l2t-at-kd, and any method of the library (ce).
Defaults: `../shared/specs/distillation.md`: KD T = 4, alpha = 0.9 (KL per example,
summed over classes, averaged over the batch, times T^2); AT beta = 1e3 at the end of each
residual group. The loss teachers map the student-state features of L2T-DLF (iteration
fraction, minibatch error, running train loss, dev error) to each weight within its range
(alpha in (0, 1), T in `distill.temperature_range`, each beta in `distill.beta_range`),
starting at the hand-set values, and learn online: every 50 student steps, from the exact
meta-gradient of the smoothed dev error through those steps (`config.teacher`, as
configs/l2t_dlf.py; `teacher.num_episodes > 0` adds episodes before the reported run).

Names: `config.target` is the network distilled from (the KD literature's "teacher");
`config.teacher` is always the loss teacher, which sets the loss's weights.
"""

import ml_collections

from configs import l2t_dlf

SETTINGS = ("mnist1d", "mnist_5k", "cifar10", "cifar100", "fake_cifar10")
OPTIONS = ("noisy", "moonshine", "smoke")
# The papers' CIFAR schedule in steps: 45,000 training images (5,000 kept for dev) in
# batches of 128 are 352 steps an epoch.
CIFAR_EPOCH = 352
# Evaluate and checkpoint about every 2 epochs, at a multiple of the 50-step log interval.
CIFAR_EVAL_EVERY = 700


def _wrn(depth: int, widen_factor: int) -> dict:
    return dict(name="wrn", depth=depth, widen_factor=widen_factor, dropout_rate=0.0)


def online_weight_teacher(config: ml_collections.ConfigDict) -> None:
    """The loss teachers of hand-set weights learn online while the reported student
    trains: Adam 0.03 every 50 steps, from the meta-gradient through those steps."""
    config.teacher.update(num_episodes=0, teach_online=True, online_window=50,
                          restart="fresh", pretrain_steps=0, optimizer="adam",
                          learning_rate=0.03)
    config.engine.update(estimator="truncated", window=50)


def smoke_schedule(config: ml_collections.ConfigDict) -> None:
    """A few seconds' run (tests): 20 steps of at most 16 examples, windows of 10."""
    config.train.update(num_steps=20, log_every=10, eval_every=10, checkpoint_every=10,
                        batch_size=min(config.train.batch_size, 16))
    config.teacher.online_window = 10
    config.engine.window = 10


def parse_arg(arg: str, config_file: str, settings: tuple, options: tuple
              ) -> tuple[str, list[str]]:
    """``(setting, tokens)`` of a comma-separated config argument: at most one of
    `settings` (default the first) and any of `options`.

    Raises:
        ValueError: an unknown token or two settings.
    """
    tokens = [t for t in arg.split(",") if t]
    unknown = [t for t in tokens if t not in settings + options]
    chosen = [t for t in tokens if t in settings]
    if unknown or len(chosen) > 1:
        raise ValueError(f"{config_file} takes one of {settings} and options {options}, "
                         f"got {arg!r}")
    return (chosen[0] if chosen else settings[0]), tokens


def get_config(arg: str = "mnist1d") -> ml_collections.ConfigDict:
    """The distillation config; `arg` as in the module docstring."""
    setting, tokens = parse_arg(arg, "configs/distill.py", SETTINGS, OPTIONS)
    config = l2t_dlf.get_config(",".join([setting] + [t for t in tokens if t == "noisy"]))
    config.method = "kd"
    config.student = ml_collections.ConfigDict(dict(config.student))
    config.student.conv = "conv"
    config.target = ml_collections.ConfigDict(dict(
        model=ml_collections.ConfigDict(dict(config.student)),
        num_steps=0,        # set below: the target's training length
        workdir="",         # a finished target run to restore; "" = WORKDIR/target
    ))
    config.distill = ml_collections.ConfigDict(dict(
        alpha=0.9,
        temperature=4.0,
        beta=1e3,
        stages=("group_1", "group_2", "group_3"),
        temperature_range=(1.0, 10.0),  # what a loss teacher may set
        beta_range=(0.0, 1e4),
    ))
    online_weight_teacher(config)

    if setting == "mnist1d":
        config.student.update(name="mlp", hidden=(100, 100), activation="relu")
        config.target.model.update(name="cnn1d", channels=25)
        config.optimizer.update(name="adam", learning_rate=0.003)
        config.train.update(num_steps=3000, batch_size=100, log_every=50, eval_every=100,
                            checkpoint_every=500)
    elif setting == "mnist_5k":  # sized for 2 CPU cores: a WRN with one block a stage
        config.student.update(_wrn(10, 1))
        config.target.model.update(_wrn(10, 2))
        config.optimizer.update(name="momentum", learning_rate=0.05, weight_decay=5e-4)
        config.train.update(num_steps=1000, batch_size=32, log_every=50, eval_every=100,
                            checkpoint_every=500)
    else:  # the papers' CIFAR setting (AT paper, Moonshine): WRN-40-2 -> WRN-16-1
        config.student.update(_wrn(16, 1))
        config.target.model.update(_wrn(40, 2))
        epochs = 200
        config.optimizer.update(
            name="momentum", learning_rate=0.1, weight_decay=5e-4, schedule="step",
            boundaries=tuple(e * CIFAR_EPOCH for e in (60, 120, 160)), decay_factor=0.2)
        config.train.update(num_steps=epochs * CIFAR_EPOCH, batch_size=128, log_every=50,
                            eval_every=CIFAR_EVAL_EVERY, checkpoint_every=CIFAR_EVAL_EVERY)
        config.engine.remat = "sqrt"
    config.target.num_steps = config.train.num_steps

    if "moonshine" in tokens:
        if setting == "mnist1d":
            raise ValueError("moonshine needs a residual target model (mnist_5k or the "
                             "CIFAR settings); mnist1d's is a plain 1-D CNN")
        config.student = ml_collections.ConfigDict(dict(config.target.model))
        config.student.conv = "dconv"
    if "smoke" in tokens:
        smoke_schedule(config)
        config.target.num_steps = 20
        if setting in ("cifar10", "cifar100", "fake_cifar10"):
            config.student.update(_wrn(10, 1))
            config.target.model.update(_wrn(10, 1))
    return config
