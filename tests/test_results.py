"""launch.results: every method row builds a valid config; tables and JSON merge."""

import json

import pytest

from configs import distill, one
from l2t_jax import plots, train
from l2t_jax.errors import ConfigError
from l2t_jax.methods import distill as distill_methods
from launch import results


@pytest.mark.parametrize("method", list(results.METHODS))
@pytest.mark.parametrize("dataset", ["digits", "mnist_5k", "mnist1d"])
def test_every_method_row_is_a_valid_config(method, dataset):
    module = results.METHODS[method][0]
    if module in (distill, one) and dataset not in module.SETTINGS:
        pytest.skip("the distillation rows run on their configs' settings")
    if dataset == "mnist1d" and method.startswith("ms-"):
        with pytest.raises(ValueError, match="moonshine needs a residual target"):
            results.method_config(dataset, method)
        return
    config = results.method_config(dataset, method, noise=0.4)
    if dataset == "mnist1d" and distill_methods.uses_at(config.method):
        # Attention transfer needs a student with feature maps: not mnist1d's MLP.
        with pytest.raises(ConfigError):
            train.validate_config(config)
        return
    train.validate_config(config)
    assert config.data.noise_rate == 0.4
    if method == "one-base":
        assert config.method == "ce" and config.student.branches == 1
    if method == "l2t-dlf-pop4":
        assert config.teacher.population_size == 4
    if method == "l2t-dln-warm":
        assert config.dln.preserve_scale and config.dln.init == "warm"


def test_every_method_is_in_exactly_one_table_group():
    grouped = [m for group in results.GROUPS.values() for m in group]
    moonshine = [m for m in results.METHODS if m.startswith("ms-")]  # their own table
    assert sorted(grouped + moonshine) == sorted(results.METHODS)


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
    assert "over 2 seeds" in text and "seeds]" not in text
    json.dumps(rows)  # the records are plain JSON


def test_a_multi_branch_row_shows_its_ensemble_beside_the_branch(tmp_path):
    summaries = [{"test_error": e, "final_test_error": e, "ensemble_test_error": e - 1,
                  "final_ensemble_test_error": e - 1} for e in (10.0, 12.0)]
    assert results._views(summaries[0]) == ["ensemble"]
    rows = [{"dataset": "mnist1d", "noise": 0.0, "student": "cnn1d", "method": "one",
             "seeds": [0, 1], "mean": 11.0, "std": 1.41, "ensemble_mean": 10.0,
             "ensemble_std": 1.41}]
    text = results.write_table(rows, str(tmp_path / "results.md"))
    assert "| 11.00 +- 1.41; ensemble 10.00 +- 1.41 |" in text


def test_overrides_convert_types_skip_other_methods_and_are_flagged(tmp_path):
    configs = [results.method_config("digits", m) for m in ("ce-long", "l2t-dlf")]
    extra = results.parse_overrides(["teacher.num_episodes=25", "teacher.teach_online=t"],
                                    configs)
    assert extra == {"teacher.num_episodes": 25, "teacher.teach_online": True}
    config = results.method_config("digits", "l2t-dlf", 0.4, extra)
    assert config.teacher.num_episodes == 25 and config.teacher.teach_online is True
    # CE in the DLN group has no teacher section: nothing applies to it.
    assert results.applicable_overrides(configs[0], extra) == {}
    # As --config.x=v parses: "yes" is no bool, a typo is no field.
    for bad in (["episodes=3"], ["teacher.teach_online=yes"], ["teacher.num_episode=3"]):
        with pytest.raises(ConfigError):
            results.parse_overrides(bad, configs)
    rows = [{"dataset": "mnist_5k", "noise": 0.0, "student": "lenet5", "method": m,
             "seeds": [0], "test_error": [1.0], "mean": 1.0, "std": 0.0,
             **({"overrides": {"teacher.num_episodes": "25"}} if m == "l2t-dlf" else {})}
            for m in ("ce", "l2t-dlf")]
    text = results.write_table(rows, str(tmp_path / "results.md"))
    assert "1.00 +- 0.00 (1) |" in text
    assert "(1) run with `--set=teacher.num_episodes=25`" in text


def test_a_cell_over_an_unusual_number_of_seeds_says_how_many(tmp_path):
    rows = [{"dataset": "digits", "noise": 0.0, "student": "mlp", "method": m,
             "seeds": list(range(n)), "test_error": [2.0] * n, "mean": 2.0, "std": 0.0}
            for m, n in (("ce-long", 8), ("l2t-dln-fixed", 8), ("l2t-dln", 4))]
    text = results.write_table(rows, str(tmp_path / "results.md"))
    assert "over 8 seeds" in text
    assert "| 2.00 +- 0.00 | 2.00 +- 0.00 | 2.00 +- 0.00 [4 seeds] |" in text


def test_moonshine_rows_make_a_table_with_sizes_and_a_picture(tmp_path):
    config = results.method_config("mnist_5k", "ms-dconv-at-kd")
    assert (config.student.conv, config.method) == ("dconv", "at-kd")
    assert config.student.depth == config.target.model.depth  # the target's architecture
    cost = results.student_cost(config)
    assert cost["conv"] == "dconv" and cost["flops_per_example"] > 0
    plain = results.student_cost(results.method_config("mnist_5k", "ms-conv"))
    assert cost["params"] < plain["params"]
    rows = [{"dataset": "mnist_5k", "noise": 0.0, "student": "wrn", "target": "wrn",
             "method": m, "seeds": [0, 1], "test_error": [2.0, 3.0], "mean": 2.5,
             "std": 0.71, **c}
            for m, c in (("ms-dconv", cost), ("ms-dconv-at-kd", cost), ("ms-conv", plain))]
    text = results.write_table(rows, str(tmp_path / "results.md"))
    line = next(x for x in text.splitlines() if "| dconv |" in x)
    assert f"| {cost['params']:,} |" in line and line.count("2.50 +- 0.71") == 2
    assert "| conv |" in text
    plots.plot_moonshine(rows, str(tmp_path / "moonshine.png"))
    assert (tmp_path / "moonshine.png").stat().st_size > 0
