"""Writing benchmark records (the project-wide JSON layout) to a file."""

import json
import os

import numpy as np


def timing_record(benchmark: str, framework: str, student: str, num_steps: int, threads: int,
                  times, peak_mb: float, **extra) -> dict:
    """One record in the project-wide layout: medians and extremes of `times` (seconds)."""
    return {
        "benchmark": benchmark,
        "framework": framework,
        "student": student,
        "T": num_steps,
        "threads": threads,
        "median_s": float(np.median(times)),
        "min_s": float(np.min(times)),
        "max_s": float(np.max(times)),
        "peak_mb": peak_mb,
        "repeats": len(times),
        **extra,
    }


def write_records(records: list[dict], path: str) -> None:
    """Writes `records` as a JSON list to `path`, creating its directory."""
    out_dir = os.path.dirname(path)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {len(records)} records to {path}")
