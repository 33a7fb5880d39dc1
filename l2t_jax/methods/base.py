"""The method interface and the registry the driver looks methods up in.

A method is a plug-in: its module builds a `Method` (name, config section, validation,
builder, what it writes and draws at the end) and registers it with `register`. The
driver (`l2t_jax.train`), the plot launcher and the results launcher look methods up
by name (`get`) and never name one.

Built from a config, a method is a `Plan`: one or more `Phase`s the driver runs in
order, each a resumable loop of pure outer steps (`OuterLoop`) with its own schedule and
directory, and a `finish` hook that writes the method's own files and summary fields.
The last phase trains the reported student (`EvaluatedLoop`): the driver evaluates it on
dev and test and reports the test error at the lowest dev error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import ml_collections

from l2t_jax import data, engine
from l2t_jax.config_checks import check_fields as check_fields  # the methods' validators
from l2t_jax.errors import ConfigError

PyTree = Any


class OuterLoop(Protocol):
    """One phase's pure functions: what the driver jits and calls until the phase ends.

    Attributes:
        steps_per_call: student steps one outer step advances.
    """

    steps_per_call: int

    def batches(self, splits: data.Splits, seed: int, start_step: int) -> dict:
        """The inputs of the outer step that starts at student step `start_step`."""

    def outer_step(self, state: PyTree, batches: dict) -> tuple[PyTree, dict]:
        """``(state, batches) -> (state, metrics)``; pure, jitted with the state donated.

        The metrics hold at least ``loss`` (per student step); ``meta/nonfinite`` > 0
        marks a teacher update that was skipped as non-finite.
        """


class EvaluatedLoop(OuterLoop, Protocol):
    """An outer loop whose student the driver evaluates.

    Attributes:
        model: the Flax student.
    """

    model: nn.Module

    def student(self, state: PyTree) -> engine.StudentState:
        """The student to evaluate and report."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When a phase logs, evaluates and checkpoints (all in inner student steps).

    Attributes:
        num_steps: the phase's length.
        eval_every: evaluate on dev and test this often (0: never; metrics come from
            the method's outer step only).
        checkpoint_every: save a checkpoint this often (and at the end).
        eval_batch_size: examples per evaluation forward pass.
    """

    num_steps: int
    eval_every: int
    checkpoint_every: int
    eval_batch_size: int = 1000


def student_schedule(config: ml_collections.ConfigDict) -> Schedule:
    """The reported student's schedule, from ``config.train``."""
    t = config.train
    return Schedule(t.num_steps, t.eval_every, t.checkpoint_every, t.eval_batch_size)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One resumable stretch of outer steps.

    Attributes:
        name: its directory under the run's workdir (``""``: the workdir itself).
        loop: its pure functions.
        schedule: its length and intervals.
        init: ``init(finished) -> state``: the phase's initial state (also the template
            a checkpoint is restored into) from the final states of the phases before
            it, by name.
        nonfinite_section: the config section whose ``on_nonfinite="raise"`` stops the
            phase at a non-finite teacher update (named in the error); None: never stop.
    """

    name: str
    loop: OuterLoop
    schedule: Schedule
    init: Callable[[Mapping[str, PyTree]], PyTree]
    nonfinite_section: str | None = None


def no_outputs(finished: Mapping[str, PyTree], workdir: str, summary: dict) -> dict:
    """A `Plan.finish` that writes nothing and adds no summary field."""
    del finished, workdir, summary
    return {}


@dataclasses.dataclass(frozen=True)
class Plan:
    """A method built from a config: its phases and what it writes at the end.

    Attributes:
        phases: run in order; the last one's loop is an `EvaluatedLoop` and trains the
            reported student.
        finish: ``finish(finished, workdir, summary) -> dict``: writes the method's own
            files (learned losses, snapshots) into `workdir` from the final states by
            phase name, and returns fields to add to the summary (health flags).
    """

    phases: Sequence[Phase]
    finish: Callable[[Mapping[str, PyTree], str, dict], dict] = no_outputs


def no_checks(config: ml_collections.ConfigDict) -> None:
    """A `Method.validate` for a method with nothing of its own to check."""
    del config


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: ``config.method``.
        description: one line, for ``python -m launch.methods``.
        example: a config that runs it, ``configs/x.py:arg``.
        build: ``build(config, splits, rng) -> Plan``.
        sections: the config sections (or top-level fields, ``"loss_from"``) it reads
            besides the common ones (``"teacher"``,
            ``"dln"``, ``"gce"``, ...); a missing one is reported in one line.
        validate: ``validate(config)`` raises a one-line `ConfigError` for a bad
            section (called after the sections are known to exist).
        draw: ``draw(config, workdir, records, summary) -> paths``: the method's own
            pictures of a finished run (``python -m launch.plot``) from its config,
            metric records and summary (``{}`` before the run ends); None: only the
            training curves.
    """

    name: str
    description: str
    example: str
    build: Callable[[ml_collections.ConfigDict, data.Splits, jax.Array], Plan]
    sections: tuple[str, ...] = ()
    validate: Callable[[ml_collections.ConfigDict], None] = no_checks
    draw: Callable[[ml_collections.ConfigDict, str, list[dict], dict], list[str]] | None = None


_REGISTRY: dict[str, Method] = {}


def register(*methods: Method) -> None:
    """Adds methods to the registry (a method module calls this at import)."""
    for method in methods:
        if method.name in _REGISTRY:
            raise ValueError(f"method {method.name!r} is registered twice")
        _REGISTRY[method.name] = method


def names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Method:
    """The registered method `name`.

    Raises:
        ConfigError: an unknown name (the message lists the registered ones).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown config.method {name!r}; choose one of {names()}")
    return _REGISTRY[name]


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.method`` and its section.

    Raises:
        ConfigError: an unknown method, a missing section or a bad field, in one line.
    """
    method = get(config.method)
    readers = [name for name in names() if "loss_from" in get(name).sections]
    if config.get("loss_from") and method.name not in readers:
        raise ConfigError(f"config.loss_from is read only by config.method in {readers}, "
                          f"not by {method.name!r}; set --config.method={readers[0]}")
    for section in method.sections:
        if section not in config:
            raise ConfigError(f"method {method.name!r} needs a config.{section} section "
                              f"(see {method.example.split(':')[0]})")
    method.validate(config)
