"""launch.results: every method row builds a valid config; tables and JSON merge."""

import json

import pytest

from l2t_jax import train
from launch import results


@pytest.mark.parametrize("method", list(results.METHODS))
@pytest.mark.parametrize("dataset", ["digits", "mnist_5k", "mnist1d"])
def test_every_method_row_is_a_valid_config(method, dataset):
    config = results.method_config(dataset, method, noise=0.4)
    train.validate_config(config)
    assert config.data.noise_rate == 0.4
    if method == "l2t-dlf-pop4":
        assert config.teacher.population_size == 4
    if method == "l2t-dln-warm":
        assert config.dln.preserve_scale and config.dln.init == "warm"


def test_every_method_is_in_exactly_one_table_group():
    grouped = [m for group in results.GROUPS.values() for m in group]
    assert sorted(grouped) == sorted(results.METHODS)


def test_table_has_a_column_per_method_and_a_row_per_setting(tmp_path):
    rows = [{"dataset": "digits", "noise": n, "student": "mlp", "method": m,
             "seeds": [0, 1], "test_error": [1.0, 3.0], "mean": 2.0, "std": 1.41}
            for n in (0.0, 0.4) for m in ("ce", "l2t-dln")]
    text = results.write_table(rows, str(tmp_path / "results.md"))
    lines = [line for line in text.splitlines() if line.startswith("| digits")]
    # Two groups (ce: L2T-DLF, l2t-dln: L2T-DLN), each a line per noise level.
    assert len(lines) == 4 and all(line.count("2.00 +- 1.41") == 1 for line in lines)
    assert "| ce |" in text and "| ce-long |" not in text  # one table per group present
    assert text.count("### ") == 2
    json.dumps(rows)  # the records are plain JSON
