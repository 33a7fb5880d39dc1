"""Metrics a person can plot (JSONL and TensorBoard event files) and progress lines."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

from absl import logging
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Appends scalar metrics to ``workdir/metrics.jsonl`` and TensorBoard event files.

    On resume from a checkpoint at step S, records after S (written by the run that was
    killed, and about to be recomputed) are dropped from the JSONL file so that each step
    appears once.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        """Opens the writers.

        Args:
            workdir: the run's directory.
            resume_step: the step the run restarts from (0 for a fresh run).
        """
        self.path = os.path.join(workdir, METRICS_FILE)
        kept = read_metrics(workdir, max_step=resume_step) if resume_step else []
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes one record: ``{"step": step, **scalars}``.

        Args:
            step: the global step the values belong to.
            scalars: name -> number (use ``split/name`` to group, e.g. ``dev/error``).
        """
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer."""
        self._tb.close()


def read_metrics(workdir: str, max_step: int | None = None) -> list[dict]:
    """Reads the records of ``workdir/metrics.jsonl``, optionally up to `max_step`."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if max_step is None or r["step"] <= max_step]


class Progress:
    """Reports steps/s and the estimated time to finish, at most every few seconds."""

    def __init__(self, start_step: int, total_steps: int, interval_seconds: float = 5.0):
        """Starts the clock.

        Args:
            start_step: the step this run starts at (after a resume, not 0).
            total_steps: the step the run ends at.
            interval_seconds: least time between two unforced lines.
        """
        self.start_step, self.total_steps = start_step, total_steps
        self.interval_seconds = interval_seconds
        self.start_time = self.last_time = time.perf_counter()

    def report(self, step: int, scalars: Mapping[str, float], force: bool = False) -> str | None:
        """Logs a progress line for `step` if forced or due; returns it (or None)."""
        now = time.perf_counter()
        if not force and now - self.last_time < self.interval_seconds:
            return None
        self.last_time = now
        elapsed = now - self.start_time
        rate = (step - self.start_step) / max(elapsed, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        values = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        text = (
            f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) "
            f"{rate:.1f} steps/s ETA {format_seconds(eta)} | {values}"
        )
        logging.info(text)
        return text


def format_seconds(seconds: float) -> str:
    """Formats a duration as e.g. ``42s``, ``3m05s`` or ``2h01m``."""
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
