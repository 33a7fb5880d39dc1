r"""Regenerates the results tables: every method on every dataset, clean and noisy, n seeds.

  python -m launch.results --workdir=/tmp/l2t_results            # everything (hours)
  python -m launch.results --datasets=digits --seeds=8 --workdir=/tmp/l2t_results

Each (dataset, noise, method, seed) is one `launch.train`-equivalent run of
configs/l2t_dlf.py (methods differ only in `config.method`, so students, optimizers, step
budgets and dev selection are identical), in WORKDIR/<dataset>_noise<rate>/<method>/s<seed>;
finished runs are reused, so the command can be interrupted and repeated. Writes
docs/results/<dataset>_noise<rate>.json (test error in percent, dev-selected, per seed)
and the table docs/results.md.
"""

import json
import os

import numpy as np
from absl import app, flags, logging

import launch
from configs import l2t_dlf
from l2t_jax import train

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the individual runs live.")
_DATASETS = flags.DEFINE_list("datasets", ["digits", "mnist_5k", "mnist1d"], "Dataset variants.")
_NOISE = flags.DEFINE_list("noise", ["0.0", "0.4"], "Symmetric training-label noise rates.")
_METHODS = flags.DEFINE_list("methods", ["ce", "l2t-dlf-fixed", "l2t-dlf"], "Methods.")
_SEEDS = flags.DEFINE_integer("seeds", 8, "Seeds 0 .. n-1 (init, data order, teacher).")
_OUT = flags.DEFINE_string("out", "docs", "Where results.md and results/ are written.")
flags.mark_flag_as_required("workdir")


def run_one(dataset: str, noise: float, method: str, seed: int) -> dict:
    """Runs (or reuses) one seed of one method; returns its summary."""
    workdir = os.path.join(_WORKDIR.value, f"{dataset}_noise{noise}", method, f"s{seed}")
    path = os.path.join(workdir, train.SUMMARY_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    config = l2t_dlf.get_config(dataset)
    config.method, config.seed = method, seed
    if noise:
        config.data.update(noise_type="symmetric", noise_rate=noise)
    logging.info("running %s noise %s %s seed %d", dataset, noise, method, seed)
    return train.train_and_evaluate(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    launch.quiet_library_logging()
    os.makedirs(os.path.join(_OUT.value, "results"), exist_ok=True)
    rows = []
    for dataset in _DATASETS.value:
        for noise in (float(n) for n in _NOISE.value):
            records = []
            for method in _METHODS.value:
                summaries = [run_one(dataset, noise, method, s) for s in range(_SEEDS.value)]
                errors = [s["test_error"] for s in summaries]
                records.append({
                    "dataset": dataset, "noise": noise, "student": summaries[0]["student"],
                    "method": method, "seeds": list(range(_SEEDS.value)),
                    "test_error": errors, "mean": float(np.mean(errors)),
                    "std": float(np.std(errors, ddof=1)) if len(errors) > 1 else 0.0,
                })
            with open(os.path.join(_OUT.value, "results", f"{dataset}_noise{noise}.json"),
                      "w") as f:
                json.dump(records, f, indent=2)
            rows.extend(records)
    table = write_table(rows, os.path.join(_OUT.value, "results.md"))
    print(table)


def write_table(rows: list[dict], path: str) -> str:
    """Writes (and returns) a markdown table: a line per (dataset, noise), a column per method."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    settings = list(dict.fromkeys((r["dataset"], r["noise"], r["student"]) for r in rows))
    lines = ["| dataset | noise | student | " + " | ".join(methods) + " |",
             "|---" * (3 + len(methods)) + "|"]
    for dataset, noise, student in settings:
        cells = []
        for method in methods:
            match = [r for r in rows if (r["dataset"], r["noise"], r["method"]) ==
                     (dataset, noise, method)]
            cells.append(f"{match[0]['mean']:.2f} +- {match[0]['std']:.2f}" if match else "")
        lines.append(f"| {dataset} | {noise} | {student} | " + " | ".join(cells) + " |")
    n = len(rows[0]["seeds"]) if rows else 0
    header = (f"Test error (%), mean +- std (sample std) over {n} seeds, each at the step with "
              "the lowest dev error (never selected on test). Regenerate with "
              "`python -m launch.results --workdir=DIR`.\n\n")
    text = header + "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    app.run(main)
