"""Writing benchmark records (the project-wide JSON layout) to a file."""

import json
import os


def write_records(records: list[dict], path: str) -> None:
    """Writes `records` as a JSON list to `path`, creating its directory."""
    out_dir = os.path.dirname(path)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {len(records)} records to {path}")
