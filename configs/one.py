r"""Online distillation: ONE, and its KL weight set by a loss teacher (l2t-one).

Run (mnist1d, the 1-D CNN with its last convolution in 3 branches; about a minute on 2
CPU cores):
  python -m launch.train --config=configs/one.py:mnist1d --workdir=/tmp/one
  ... --config.method=l2t-one                            # the KL weight set by a loss teacher
  ... --config.method=ce --config.student.branches=1     # the base network (results: one-base)

The argument after ':' is a comma-separated list: one setting and options.
  settings: mnist1d (default; the MNIST-1D paper's 1-D CNN, Adam 3e-3, 3,000 steps of
            batch 100), mnist_5k (He ResNet-8, SGD 0.05 momentum 0.9, wd 1e-4, 1,000 steps
            of batch 32),
            cifar10 / cifar100 (the paper's setting, for a GPU: He ResNet-32, SGD 0.1
            momentum 0.9, wd 1e-4, 300 epochs, lr x0.1 at 150 and 225, batch 128),
            fake_cifar10 (that setting on random data, a few steps)
  options:  noisy (40% symmetric noise on the training labels), resnet110 (the CIFAR
            settings' ResNet-110), smoke (seconds; for tests)

Defaults (`../shared/specs/distillation.md`): m = 3 branches (`student.branches`), T = 3,
the KL weight on ONE's ramp exp(-5 (1 - min(t, R) / R)^2) with R = 80 / 300 of the
training (`one.ramp_steps`). l2t-one's loss teacher maps the L2T-DLF student-state
features (iteration fraction, minibatch error, running train loss, dev error) to the KL
weight in `one.kl_weight_range`, starting at `one.kl_weight` (1, the ramp's plateau),
and learns online: every 50 student steps, from the exact meta-gradient of the
deployable branch's smoothed dev error through those steps (`config.teacher`, as
configs/distill.py, at Adam 0.1). `one.learn_temperature=True` lets it set T too.
"""

import ml_collections

from configs import distill, l2t_dlf

SETTINGS = ("mnist1d", "mnist_5k", "cifar10", "cifar100", "fake_cifar10")
OPTIONS = ("noisy", "resnet110", "smoke")
# ONE's ramp: 80 of the paper's 300 epochs.
RAMP_FRACTION = 80 / 300


def get_config(arg: str = "mnist1d") -> ml_collections.ConfigDict:
    """The ONE config; `arg` as in the module docstring."""
    setting, tokens = distill.parse_arg(arg, "configs/one.py", SETTINGS, OPTIONS)
    cifar = setting in ("cifar10", "cifar100", "fake_cifar10")
    if "resnet110" in tokens and not cifar:
        raise ValueError("resnet110 is an option of the CIFAR settings")
    config = l2t_dlf.get_config(",".join([setting] + [t for t in tokens if t == "noisy"]))
    config.method = "one"
    config.one = ml_collections.ConfigDict(dict(
        temperature=3.0,
        ramp_steps=0,                  # set below: RAMP_FRACTION of the training
        ramp_max=1.0,                  # the ramp's plateau
        kl_weight=1.0,                 # l2t-one: the loss teacher's start
        kl_weight_range=(0.0, 10.0),   # what the loss teacher may set
        learn_temperature=False,
        temperature_range=(1.0, 10.0),
    ))
    distill.online_weight_teacher(config)
    # Faster than the offline distillation teachers' 0.03, at which the KL weight was
    # still rising when the run ended (a higher dev error on both mnist1d settings).
    config.teacher.learning_rate = 0.1

    if setting == "mnist1d":
        config.student = ml_collections.ConfigDict(dict(name="cnn1d", channels=25))
        config.optimizer.update(name="adam", learning_rate=0.003)
        config.train.update(num_steps=3000, batch_size=100, log_every=50, eval_every=100,
                            checkpoint_every=500)
    elif setting == "mnist_5k":  # sized for 2 CPU cores
        config.student = ml_collections.ConfigDict(dict(name="resnet_he", depth=8))
        config.optimizer.update(name="momentum", learning_rate=0.05, weight_decay=1e-4)
        config.train.update(num_steps=1000, batch_size=32, log_every=50, eval_every=100,
                            checkpoint_every=500)
    else:  # the paper's CIFAR setting
        depth = 110 if "resnet110" in tokens else 32
        config.student = ml_collections.ConfigDict(dict(name="resnet_he", depth=depth))
        epoch = distill.CIFAR_EPOCH
        config.optimizer.update(
            name="momentum", learning_rate=0.1, weight_decay=1e-4, schedule="step",
            boundaries=(150 * epoch, 225 * epoch), decay_factor=0.1)
        config.train.update(num_steps=300 * epoch, batch_size=128, log_every=50,
                            eval_every=distill.CIFAR_EVAL_EVERY,
                            checkpoint_every=distill.CIFAR_EVAL_EVERY)
        config.engine.remat = "sqrt"
    config.student.branches = 3

    if "smoke" in tokens:
        distill.smoke_schedule(config)
        if cifar:
            config.student.depth = 8
    config.one.ramp_steps = max(1, round(RAMP_FRACTION * config.train.num_steps))
    return config
