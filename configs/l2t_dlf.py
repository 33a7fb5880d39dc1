r"""L2T-DLF: a teacher sets the student's bilinear loss from its state (NeurIPS 2018).

Run (digits with 40% label noise, MLP; a few minutes on 2 CPU cores):
  python -m launch.train --config=configs/l2t_dlf.py:digits,noisy --workdir=/tmp/dlf_digits
Compare on the same settings (same student, optimizer, steps, dev selection):
  ... --config.method=ce             # plain cross-entropy
  ... --config.method=l2t-dlf-fixed  # the loss family at its untaught parameters

The argument after ':' is a comma-separated list: one dataset variant and options.
  datasets: digits (default; MLP), mnist_5k (the demo: LeNet-5, T = 200, SGD 0.01,
            batch 20, 100 episodes), mnist1d (MLP; T = 300, SGD momentum 0.9 at 0.1),
            mnist1d_cnn (1-D CNN; momentum at 0.05),
            cifar10 / cifar100 (He ResNet-20; needs a GPU and a prepared dataset),
            fake_cifar10 (random CIFAR-shaped data: checks the paper set-up runs)
  options:  noisy (40% symmetric training-label noise), smoke (seconds; for tests),
            online (no episodes: one training of 10 episode lengths, e.g. 3,000 steps on
            mnist1d, with the teacher updated every 50 steps by truncated backprop;
            --config.method=ce / l2t-dlf-fixed give the same budget untaught),
            long (online teaching on the L2T-DLN configs' student and schedule: SGD 0.1,
            batch 25, 6,000 steps, on mnist_5k the BN LeNet for 3,000; no pre-training;
            the teacher on Adam 0.03, so the DLF and DLN rows share CE's `ce-long`)

Defaults follow `../shared/specs/l2t_dlf.md`: the demo's dynamic gate W_t = W + h_t W2
(theta starts random: the demo's theta = 0 is a saddle where the gate never opens;
`teacher.gate_init_scale=0` restores it) with the CE mix a_t learned (the demo's
--combine_loss idea), Adam with global-norm clipping on the teacher (hypergradients
through long unrolls are noisy), the demo's smoothed 0-1 dev error (k = 50) as the
teacher's objective, a fresh student init and batch order each episode. (Dev
cross-entropy, `--config.teacher.objective=cross_entropy`, over-fitted the 300-example
dev set of clean digits: 0% dev error in the episodes, 4.1% test error vs CE's 2.7%; the
smoothed error stops pushing once dev examples are right with a margin.) The teaching
phase trains a fresh student for `train.num_steps` (= the episode length T, the
trajectory the teacher was trained on) and reports the dev-selected test error. With
`teacher.pretrain_steps` > 0 (mnist_5k, the demo) the episodes and, for ce /
l2t-dlf-fixed / l2t-dlf alike, the taught student start from one student CE-trained that
many steps on the run's seed: the demo teaches a pre-trained LeNet for 200 steps, and so
does the comparison.

Population: `--config.teacher.population_size=P` trains P students per episode
(own inits and data orders, one vmapped program) and averages the teacher's
meta-gradient over them; `--config.mesh.population=-1` (and/or `--config.mesh.data`)
spreads them over all devices (see README, "Multi-host").
"""

import ml_collections

from configs import ce_baseline, l2t_dln

OPTIONS = ce_baseline.OPTIONS + ("online", "long")
# The student-state features s_t (`l2t_jax.teachers.FEATURE_NAMES`); the teacher reads
# `teacher.features`, all of them or a subset.
FEATURE_NAMES = ("iteration_fraction", "minibatch_error", "train_loss", "dev_error")
# A full-length training for the online option: this many episode lengths.
ONLINE_LENGTH = 10


def _teach_online(config, window: int = 50) -> None:
    """No episodes: the teacher learns while the student trains, every `window` steps,
    from the meta-gradient through those steps (truncated backprop)."""
    config.teacher.update(num_episodes=0, teach_online=True, online_window=window)
    config.engine.update(estimator="truncated", window=window)


def get_config(arg: str = "digits") -> ml_collections.ConfigDict:
    """The L2T-DLF config; `arg` as in the module docstring."""
    tokens = [t for t in arg.split(",") if t]
    config = ce_baseline.get_config(",".join(t for t in tokens if t not in ("online", "long")))
    variant = next((t for t in tokens if t not in OPTIONS), "digits")
    config.method = "l2t-dlf"

    config.teacher = ml_collections.ConfigDict(dict(
        form="state_gate",          # static | state_gate | mlp
        hidden=32,                  # mlp form only
        gate_init_scale=1.0,        # state_gate: theta ~ N(0, scale^2 / 4); 0 is the demo's
                                    # init, a saddle where the gate never opens
        combine=True,               # teacher-set mix a_t * CE + (1 - a_t) * scale * bilinear
        bilinear_scale=4.0,
        objective="smoothed_error",  # smoothed_error (k = sharpness) | cross_entropy
        sharpness=50.0,             # k of the smoothed error
        features_grad=False,        # stop gradients through s_t, as the demo
        features=FEATURE_NAMES,     # the features s_t the l2t-dlf teacher reads (a subset)
        feature_dev_size=512,       # dev examples behind the dev-error feature
        dev_every=10,               # refresh the dev-error feature every this many steps
        num_episodes=200,
        episode_steps=150,
        restart="fresh",            # fixed (the demo) | fresh
        pretrain_steps=0,           # CE steps before the episodes' fixed start
        optimizer="adam",           # adam | sgd | momentum
        learning_rate=0.003,
        clip_norm=1.0,
        on_nonfinite="skip",        # skip | raise
        checkpoint_every=20,        # episodes
        teach_online=False,         # keep the teacher learning while teaching
        online_window=10,           # steps per online teacher update
        population_size=1,          # students per episode (meta-gradient averaged)
    ))
    # Devices: sizes of the (population, data) mesh, -1 = the rest; all 1: one device.
    config.mesh = ml_collections.ConfigDict(dict(population=1, data=1))

    if variant == "digits":
        config.student.update(hidden=(128,), activation="tanh")
        config.optimizer.update(name="sgd", learning_rate=0.5)
        config.train.update(num_steps=150, batch_size=64)
    elif variant == "mnist_5k":  # the demo's setting
        config.optimizer.update(name="sgd", learning_rate=0.01)
        config.train.update(num_steps=200, batch_size=20)
        config.teacher.update(episode_steps=200, num_episodes=100, restart="fixed",
                              pretrain_steps=1000, optimizer="sgd", learning_rate=0.01)
    elif variant in ("mnist1d", "mnist1d_cnn"):
        # Momentum, so that the student fits within the T = 300 steps the teacher sees
        # (plain SGD left it at 60 % test error, against 37 % after a long training).
        config.optimizer.update(name="momentum",
                                learning_rate=0.1 if variant == "mnist1d" else 0.05)
        config.train.update(num_steps=300, batch_size=100)
        config.teacher.update(episode_steps=300, num_episodes=150)
    else:  # CIFAR (paper setting): long trainings, so the teacher learns online.
        _teach_online(config)
        config.engine.remat = "sqrt"
    config.train.update(log_every=10, eval_every=10, checkpoint_every=50)
    if "online" in tokens:
        config.train.update(num_steps=ONLINE_LENGTH * config.teacher.episode_steps, log_every=50,
                            eval_every=100, checkpoint_every=500)
        _teach_online(config)
    if "long" in tokens:
        schedule = l2t_dln.get_config(variant + ",released")  # SGD 0.1, as ce-long
        config.student, config.optimizer, config.train = (
            schedule.student, schedule.optimizer, schedule.train)
        config.train.log_every = 50  # a multiple of the online window
        config.teacher.update(pretrain_steps=0, restart="fresh", optimizer="adam",
                              learning_rate=0.03)
        _teach_online(config)
    if variant in ("cifar10", "cifar100", "fake_cifar10"):
        config.train.update(log_every=50, eval_every=1000, checkpoint_every=1000)

    if "smoke" in tokens:
        online = "online" in tokens or "long" in tokens
        config.teacher.update(num_episodes=0 if online else 3, episode_steps=10,
                              checkpoint_every=1,
                              pretrain_steps=min(config.teacher.pretrain_steps, 10),
                              online_window=10)
        config.train.update(num_steps=20, log_every=10, eval_every=10, checkpoint_every=10)
        if config.engine.estimator == "truncated":
            config.engine.window = config.teacher.online_window
    return config
