"""``transfer``: a student trained on the frozen loss another run learned.

``--config.method=transfer --config.loss_from=WORKDIR`` trains this config's student
(any architecture, any dataset with as many classes) under the loss of the finished
run in WORKDIR, as it stands at the end of that run (`l2t_jax.export`): L2T-DLF's
taught loss with its schedule (the iteration fraction is this run's), the DLN, the
learned GCE. A loss that reads the student's state reads this student's, kept as the
source run kept it. Distillation losses, which read a target model, do not transfer.
"""

from __future__ import annotations

import json
import os

import ml_collections

from l2t_jax import students
from l2t_jax import workdir as run_workdir
from l2t_jax.errors import ConfigError
from l2t_jax.methods import base, teaching

# Written into the run's workdir: where its loss came from.
SOURCE_FILE = "loss_source.json"


def build(config: ml_collections.ConfigDict, splits, rng) -> base.Plan:
    """One phase: the student under the frozen loss of ``config.loss_from``."""
    from l2t_jax import export  # noqa: PLC0415  (it imports the driver, which imports us)
    loss = export.load(config.loss_from)
    if loss.num_classes != splits.num_classes:
        raise ConfigError(f"the loss in {config.loss_from} was learned for "
                          f"{loss.num_classes} classes, this data has {splits.num_classes}; "
                          "config.loss_from must name a run with as many classes")
    if loss.reads_target or loss.self_target or loss.activations:
        raise ConfigError(f"the loss in {config.loss_from} ({loss.method}) reads a target "
                          "model or the student's activations and does not transfer; "
                          "choose a run of a loss of logits and labels")
    model = students.build_student(config.student, splits.num_classes)

    def finish(finished, workdir, summary):
        del finished, summary
        source = {"loss_from": os.path.abspath(config.loss_from), "method": loss.method,
                  "dataset": loss.config.data.name, "student": loss.config.student.name,
                  "seed": loss.config.seed}
        run_workdir.write_atomically(os.path.join(workdir, SOURCE_FILE),
                                     json.dumps(source, indent=2))
        return {"loss_from": source["loss_from"], "loss_method": loss.method}

    return teaching.fixed_loss_plan(
        config, splits, rng, loss.student_loss_fn(config.train.num_steps),
        lambda loss_rng: loss.params, finish, model=model,
        stats_builder=export.stats_builder(loss, model), initial_stats=loss.initial_stats)


def validate(config: ml_collections.ConfigDict) -> None:
    """``config.loss_from`` must be set (the run it names is checked when the method is
    built, before anything is written: `launch.results` runs it first)."""
    if not config.get("loss_from", ""):
        raise ConfigError("config.method=transfer needs --config.loss_from=WORKDIR, a "
                          "finished run whose loss to train with")


base.register(base.Method(
    name="transfer",
    description="a student trained on the frozen loss of another finished run "
                "(--config.loss_from=WORKDIR): a learned loss on a new network or dataset",
    example="configs/l2t_dlf.py:mnist_5k,noisy",
    build=build, sections=("loss_from",), validate=validate,
))
