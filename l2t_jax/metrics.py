"""Metrics a person can plot (JSONL and TensorBoard event files) and progress lines."""

from __future__ import annotations

import json
import logging as std_logging
import os
import time
from collections.abc import Mapping

from absl import logging
from tensorboardX import SummaryWriter

from l2t_jax import workdir as run_workdir

# A diverged step's non-finite values are written on purpose (the driver then stops with
# its own one-line error); tensorboardX would warn about each.
std_logging.getLogger("tensorboardX.x2num").setLevel(std_logging.ERROR)

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Appends scalar metrics to ``workdir/metrics.jsonl`` and TensorBoard event files.

    On resume from a checkpoint at step S, the JSONL file is rewritten (atomically) to
    the records saved with that checkpoint: records after S (written by the run that was
    killed, and about to be recomputed) are dropped so that each step appears once, and
    records a crash lost or tore are put back. `records` holds every record of the run
    (the resumed ones included), to be saved with the next checkpoint. In a multi-host
    run only process 0 writes the files (`l2t_jax.workdir.is_writer`); every process
    keeps `records`.
    """

    def __init__(self, workdir: str, resume_step: int = 0, records: list[dict] | None = None):
        """Opens the writers.

        Args:
            workdir: the run's directory.
            resume_step: the step the run restarts from (0 for a fresh run).
            records: the records saved with the checkpoint at `resume_step`; None for a
                checkpoint without them, whose records are then read from
                ``metrics.jsonl`` (up to `resume_step`).
        """
        self.path = os.path.join(workdir, METRICS_FILE)
        self.records = self._resumed_records(resume_step, records) if resume_step else []
        self._tb = None  # and no files: another process of a multi-host run writes them
        if run_workdir.is_writer():
            run_workdir.write_atomically(
                self.path, "".join(json.dumps(r) + "\n" for r in self.records))
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Writes one record: ``{"step": step, **scalars}``.

        Args:
            step: the global step the values belong to.
            scalars: name -> number (use ``split/name`` to group, e.g. ``dev/error``).
        """
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self.records.append(record)
        if self._tb is None:
            return
        # One write of the whole line (flushed when the file closes), so a crash tears
        # at most the last record, which a resume repairs.
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer."""
        if self._tb is not None:
            self._tb.close()

    def _resumed_records(self, resume_step: int, records: list[dict] | None) -> list[dict]:
        """The records to resume with; warns in one line if the file disagreed."""
        found, bad_lines = _parse(self.path) if os.path.exists(self.path) else (None, [])
        if found is not None:
            found = [r for r in found if r["step"] <= resume_step]
        problems = []
        if found is None:
            problems.append("it was missing")
        if bad_lines:
            problems.append(f"unreadable line(s) {_line_numbers(bad_lines)}")
        if records is None:
            kept = found or []
            source = f"its {len(kept)} readable records (the checkpoint holds none)"
        else:
            kept, source = list(records), f"the checkpoint's {len(records)} records"
            if found is not None and _canonical(found) != _canonical(records):
                problems.append(f"its records up to step {resume_step} differed from the "
                                "checkpoint's")
        if problems:
            logging.warning("%s, resuming at step %d: %s; rewrote it with %s",
                            self.path, resume_step, "; ".join(problems), source)
        return kept


def read_metrics(workdir: str, max_step: int | None = None) -> list[dict]:
    """Reads the records of ``workdir/metrics.jsonl``, optionally up to `max_step`.

    Lines that are not a record (torn by a crash mid-write, or garbage) are skipped with
    one warning naming them.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records, bad_lines = _parse(path)
    if bad_lines:
        logging.warning("%s: skipped unreadable line(s) %s (torn by a crash, or garbage)",
                        path, _line_numbers(bad_lines))
    return [r for r in records if max_step is None or r["step"] <= max_step]


def _parse(path: str) -> tuple[list[dict], list[int]]:
    """The records of a metrics file, and the numbers of its lines that are not one."""
    records, bad_lines = [], []
    # Garbage bytes must make an unreadable line, not a UnicodeDecodeError.
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = _record(line)
            if record is None:
                bad_lines.append(number)
            else:
                records.append(record)
    return records, bad_lines


def _record(line: str) -> dict | None:
    """The record a line holds, or None (torn, garbage, or JSON of another shape)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    is_record = isinstance(record, dict) and isinstance(record.get("step"), int)
    return record if is_record else None


def _line_numbers(numbers: list[int], shown: int = 10) -> str:
    """``3, 7`` or, for many, ``3, 7, ... (250 in all)``."""
    text = ", ".join(str(n) for n in numbers[:shown])
    return text if len(numbers) <= shown else f"{text}, ... ({len(numbers)} in all)"


def _canonical(records: list[dict]) -> str:
    """Records as comparable text (NaN != NaN, but their JSON is equal)."""
    return json.dumps(records, sort_keys=True)


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
