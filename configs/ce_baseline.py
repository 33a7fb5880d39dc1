r"""Plain cross-entropy training of a student: the baseline every method is compared with.

Run (digits, MLP; about 20 s on 2 CPU cores):
  python -m launch.train --config=configs/ce_baseline.py --workdir=/tmp/ce_digits

The argument after ':' is a comma-separated list: one dataset variant and options.
  datasets: digits (default; MLP), mnist_5k (LeNet-5), mnist1d (MLP), mnist1d_cnn (1-D CNN),
            cifar10 / cifar100 (He ResNet-20, needs a network or a prepared data_dir),
            fake_cifar10 (random images of CIFAR shape, to check the set-up runs)
  options:  noisy (40% symmetric training-label noise), smoke (a few seconds; for tests)
e.g.
  python -m launch.train --config=configs/ce_baseline.py:mnist_5k,noisy --workdir=/tmp/ce_m5k
  python -m launch.train --config=configs/ce_baseline.py:mnist1d \
      --config.optimizer.learning_rate=0.005 --workdir=/tmp/ce_m1d
"""

import ml_collections

VARIANTS = ("digits", "mnist_5k", "mnist1d", "mnist1d_cnn", "cifar10", "cifar100",
            "fake_cifar10")
OPTIONS = ("noisy", "smoke")


def _dataset_settings(variant: str) -> dict:
    """Data, student, optimizer and schedule for one dataset variant."""
    if variant == "digits":
        return dict(
            data=dict(name="digits", dev_size=300),
            student=dict(name="mlp", hidden=(128,), activation="relu"),
            optimizer=dict(name="momentum", learning_rate=0.05),
            train=dict(num_steps=2000, batch_size=64, eval_every=100),
        )
    if variant == "mnist_5k":
        return dict(
            data=dict(name="mnist_5k", dev_size=500),
            student=dict(name="lenet5"),
            optimizer=dict(name="momentum", learning_rate=0.01),
            train=dict(num_steps=3000, batch_size=64, eval_every=100),
        )
    if variant in ("mnist1d", "mnist1d_cnn"):
        student = (dict(name="cnn1d", channels=25) if variant == "mnist1d_cnn"
                   else dict(name="mlp", hidden=(100, 100), activation="relu"))
        return dict(
            data=dict(name="mnist1d", dev_size=500),
            student=student,
            optimizer=dict(name="adam", learning_rate=0.003),
            train=dict(num_steps=6000, batch_size=100, eval_every=200),
        )
    if variant in ("cifar10", "cifar100", "fake_cifar10"):
        # He et al. 2016: SGD 0.1, momentum 0.9, wd 1e-4, batch 128, 64k steps,
        # lr / 10 at 32k and 48k, pad-4 crop + flip; 5k of the 50k train images as dev.
        return dict(
            data=dict(name=variant, dev_size=5000 if variant != "fake_cifar10" else 64,
                      augment="cifar"),
            student=dict(name="resnet_he", depth=20),
            optimizer=dict(name="momentum", learning_rate=0.1, weight_decay=1e-4,
                           schedule="step", boundaries=(32000, 48000), decay_factor=0.1),
            train=dict(num_steps=64000, batch_size=128, eval_every=1000),
        )
    raise ValueError(f"unknown variant {variant!r} for configs/ce_baseline.py; "
                     f"choose one of {VARIANTS}")


def get_config(arg: str = "digits") -> ml_collections.ConfigDict:
    """The CE baseline config; `arg` as in the module docstring."""
    tokens = [t for t in arg.split(",") if t]
    variants = [t for t in tokens if t not in OPTIONS]
    if len(variants) > 1:
        raise ValueError(f"give one dataset variant, got {variants}")
    settings = _dataset_settings(variants[0] if variants else "digits")

    config = ml_collections.ConfigDict()
    config.method = "ce"
    config.seed = 0
    # A finished run's directory whose learned loss config.method=transfer trains with.
    config.loss_from = ""

    config.data = ml_collections.ConfigDict(dict(
        name="digits", data_dir=ml_collections.FieldReference(None, field_type=str),
        dev_size=300, meta_dev_size=0, split_seed=0, noise_type="none", noise_rate=0.0,
        noise_seed=0,
        augment="none",
    ))
    config.data.update(settings["data"])
    if "noisy" in tokens:
        config.data.noise_type = "symmetric"
        config.data.noise_rate = 0.4

    config.student = ml_collections.ConfigDict(dict(
        name="mlp", hidden=(128,), activation="relu", depth=20, channels=25,
        dtype="float32",
    ))
    config.student.update(settings["student"])

    config.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", learning_rate=0.1, momentum=0.9, nesterov=False, weight_decay=0.0,
        b1=0.9, b2=0.999, eps=1e-8, eps_root=1e-8, schedule="constant", boundaries=(),
        decay_factor=0.1,
    ))
    config.optimizer.update(settings["optimizer"])

    # The engine's switches (the CE baseline takes no meta-gradient; kept for methods).
    config.engine = ml_collections.ConfigDict(dict(
        estimator="full", remat="none", window=0, chunk_size=0,
    ))

    config.train = ml_collections.ConfigDict(dict(
        num_steps=2000, batch_size=64, log_every=50, eval_every=100,
        checkpoint_every=500, eval_batch_size=1000,
        # The run stops as diverged when the student's mean train cross-entropy over a
        # log interval exceeds this (nats; chance is log(classes), a few nats).
        max_cross_entropy=1000.0,
        # ... or when any logged value's magnitude exceeds this many times its first
        # (or 1): an exploding loss teacher, loss network or loss.
        max_growth=1e6,
    ))
    config.train.update(settings["train"])

    if "smoke" in tokens:
        config.train.update(num_steps=60, log_every=10, eval_every=20, checkpoint_every=20)
        if config.data.name == "fake_cifar10":
            config.train.batch_size = 16
            config.student.depth = 8
    return config
