r"""Noise-robust losses: GCE and SCE hand-set, and GCE with its q set by a loss teacher.

Run (digits with 40% label noise, MLP; seconds on 2 CPU cores):
  python -m launch.train --config=configs/robust.py:digits,noisy --workdir=/tmp/gce
  ... --config.method=sce       # symmetric cross-entropy
  ... --config.method=l2t-gce   # GCE whose q a loss teacher sets (trained as L2T-DLF's)
  ... --config.method=ce        # cross-entropy on the same student and schedule

The argument after ':' is that of configs/l2t_dlf.py (same datasets and options), so a
row here shares the student, optimizer, schedule and dev selection of the L2T-DLF runs
of the same argument: e.g. `digits,noisy,long` is the L2T-DLN group's schedule (SGD
0.1, batch 25, 6,000 steps), with `l2t-gce` taught online every 50 steps.

Defaults: `../shared/specs/robust_losses.md`: GCE q = 0.7 (Zhang & Sabuncu 2018), SCE
alpha = 0.1, beta = 1.0, log 0 clipped to A = -4 (Wang et al. 2019, CIFAR-10). The
`l2t-gce` teacher maps the student-state features s_t (iteration fraction, minibatch
error, running train loss, dev error) to q_t = sigmoid(theta . s_t + b), starting at
the hand-set q (theta = 0), and is trained by exact meta-gradients of the smoothed dev
error exactly as L2T-DLF's teacher (`config.teacher`: episodes, online window, Adam).
"""

import ml_collections

from configs import l2t_dlf


def get_config(arg: str = "digits") -> ml_collections.ConfigDict:
    """The robust-loss config; `arg` as in configs/l2t_dlf.py."""
    config = l2t_dlf.get_config(arg)
    config.method = "gce"
    config.gce = ml_collections.ConfigDict(dict(q=0.7))
    config.sce = ml_collections.ConfigDict(dict(alpha=0.1, beta=1.0, log_zero=-4.0))
    return config
