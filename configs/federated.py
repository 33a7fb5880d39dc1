r"""Federated learning: N clients holding non-IID shares of the train split.

Run (mnist_5k, 20 clients, Dirichlet 0.1 label split, 10 clients a round; about a
minute on 2 CPU cores):
  python -m launch.train --config=configs/federated.py:mnist_5k --workdir=/tmp/fedavg
  ... --config.method=fedgen                # FedGen's generator term in every client
  ... --config.method=l2t-fedgen            # its weight scaled by a loss teacher
  ... --config.federated.alpha=1.0          # a milder label skew
  ... --config.federated.partition=iid      # IID clients
  ... --config.mesh.population=-1           # the round's clients over every device

The argument after ':' is one dataset variant and options:
  datasets: digits (default), mnist_5k, mnist1d: offline; fedgen_mnist: the FedGen
            paper's MNIST setting (TFDS mnist: needs a network or a prepared data_dir;
            200 rounds)
  options:  noisy (40% symmetric label noise on every client), smoke (seconds; tests)

A step of the driver is one round: `config.train.num_steps` rounds, evaluated every
`config.train.eval_every`; `config.train.batch_size` is a client's local batch B. The
defaults follow FedGen's MNIST setting (`../shared/specs/distillation.md`): 20 clients,
Dirichlet alpha 0.1 over labels, 10 clients a round, 20 local steps of batch 32, SGD; the
partition is fixed across training seeds (`config.federated.partition_seed`), as a
federated benchmark's data split is. Half of the dev split is the server's validation
split (`config.data.meta_dev_size`), which l2t-fedgen's loss teacher learns on; every
method selects its round on the other half. The network is an MLP whose last hidden
layer is 32 wide (FedGen's generator feeds that layer).
"""

import ml_collections

from configs import ce_baseline

VARIANTS = ("digits", "mnist_5k", "mnist1d", "fedgen_mnist")


def get_config(arg: str = "digits") -> ml_collections.ConfigDict:
    """The federated config; `arg` as in the module docstring."""
    tokens = [t for t in arg.split(",") if t]
    variants = [t for t in tokens if t not in ce_baseline.OPTIONS]
    if len(variants) > 1 or (variants and variants[0] not in VARIANTS):
        raise ValueError(f"give one dataset variant of {VARIANTS}, got {variants}")
    variant = variants[0] if variants else "digits"
    options = [t for t in tokens if t in ce_baseline.OPTIONS]
    data_variant = "mnist_5k" if variant == "fedgen_mnist" else variant
    config = ce_baseline.get_config(",".join([data_variant, *options]))
    config.method = "fedavg"
    if variant == "fedgen_mnist":
        config.data.update(name="mnist", dev_size=5000)
    config.student.update(name="mlp", hidden=(200, 32), activation="relu")
    config.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", learning_rate=0.05, momentum=0.9, nesterov=False, weight_decay=0.0,
        b1=0.9, b2=0.999, eps=1e-8, eps_root=1e-8, schedule="constant", boundaries=(),
        decay_factor=0.1,
    ))
    config.federated = ml_collections.ConfigDict(dict(
        num_clients=20,          # N
        clients_per_round=10,    # K, drawn without replacement each round
        local_steps=20,          # E
        partition="dirichlet",   # or "iid"
        alpha=0.1,               # Dirichlet concentration over labels
        partition_seed=0,        # fixed across training seeds
    ))
    # FedGen (`--config.method=fedgen`): the generator and the weight a_r of its term,
    # a_r = max(weight_min, weight_init * weight_decay^r) (FedGen's MNIST settings).
    config.fedgen = ml_collections.ConfigDict(dict(
        hidden=256, noise_dim=32, steps=50, batch_size=32, learning_rate=3e-4,
        diversity=1.0, weight_init=10.0, weight_decay=0.98, weight_min=1e-4,
    ))
    # l2t-fedgen: the loss teacher multiplies a_r by m_r = low + (high - low) *
    # sigmoid(theta * r / R + b), starting at 1 (FedGen's schedule), and learns from the
    # exact meta-gradient of the server's smoothed dev error after each round.
    config.teacher = ml_collections.ConfigDict(dict(
        optimizer="adam", learning_rate=0.03, clip_norm=1.0, objective="smoothed_error",
        sharpness=50.0, on_nonfinite="skip", multiplier_range=(0.0, 4.0),
    ))
    # Devices: the round's clients on "population", each local batch on "data".
    config.mesh = ml_collections.ConfigDict(dict(population=1, data=1))
    # The server's validation split, carved from the dev split: the loss teacher of
    # l2t-fedgen learns on it, and every method selects its round on the rest.
    config.data.meta_dev_size = config.data.dev_size // 2
    rounds = 200 if variant == "fedgen_mnist" else 100
    config.train.update(num_steps=rounds, batch_size=32, log_every=5, eval_every=10,
                        checkpoint_every=20)
    if "smoke" in tokens:
        config.federated.update(num_clients=4, clients_per_round=2, local_steps=3)
        config.fedgen.update(steps=3, hidden=16)
        config.train.update(num_steps=4, log_every=2, eval_every=2, checkpoint_every=2)
    return config
