"""launch.results: every method row builds a valid config; tables and JSON merge."""

import json

import pytest

from configs import distill, l2t_dln, one
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
    if method in results.TRANSFERS and dataset not in results.TRANSFERS[method][1]:
        with pytest.raises(ConfigError, match="runs on"):
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
    if method in results.TRANSFERS:  # the same config as its source row, on a frozen loss
        source = results.method_config(dataset, results.TRANSFERS[method][0], noise=0.4)
        assert config.method == "transfer"
        assert config.loss_from == f"digits_noise0.4/{results.TRANSFERS[method][0]}"
        config.update(method=source.method, loss_from="")
        assert config == source
    if method == "l2t-dln-warm":
        assert config.dln.preserve_scale and config.dln.init == "warm"


# Every row built on configs/l2t_dln.py (directly, or through the `long` option of
# configs/l2t_dlf.py and configs/robust.py) as it ran for its recorded numbers in
# docs/results: (config.method, dln.init, dln.preserve_scale, dln.accept, optimizer.name,
# optimizer.learning_rate), the fields that changed when the file's defaults became the
# recommended recipe; `None`: no dln section. The records stay valid while these hold.
RECORDED_ROWS = {
    "ce-long": ("ce", "released", False, "always", "sgd", 0.1),
    "l2t-dln-released-fixed": ("l2t-dln-fixed", "released", False, "always", "sgd", 0.1),
    "l2t-dln-released": ("l2t-dln", "released", False, "always", "sgd", 0.1),
    "l2t-dln-warm-fixed": ("l2t-dln-fixed", "warm", False, "always", "sgd", 0.1),
    "l2t-dln-warm": ("l2t-dln", "warm", True, "always", "sgd", 0.1),
    "l2t-dln-warm-proper": ("l2t-dln", "warm", True, "proper", "sgd", 0.1),
    "l2t-dln-warm-descent": ("l2t-dln", "warm", True, "proper_descent", "sgd", 0.1),
    "ce-long-md": ("ce", "released", False, "always", "sgd", 0.1),
    "l2t-dln-warm-fixed-md": ("l2t-dln-fixed", "warm", False, "always", "sgd", 0.1),
    "l2t-dln-warm-proper-md": ("l2t-dln", "warm", True, "proper", "sgd", 0.1),
    "ce-long-lr03": ("ce", "released", False, "always", "sgd", 0.3),
    "ce-long-lr1": ("ce", "released", False, "always", "sgd", 1.0),
    "l2t-dln-warm-fixed-lr03": ("l2t-dln-fixed", "warm", False, "always", "sgd", 0.3),
    "l2t-dln-warm-proper-lr03": ("l2t-dln", "warm", True, "proper", "sgd", 0.3),
    "l2t-dln-warm-fixed-lr1": ("l2t-dln-fixed", "warm", False, "always", "sgd", 1.0),
    "l2t-dln-warm-proper-lr1": ("l2t-dln", "warm", True, "proper", "sgd", 1.0),
    "l2t-dln-warm-descent-lr1": ("l2t-dln", "warm", True, "proper_descent", "sgd", 1.0),
    "l2t-dln-warm-descent-k600-lr1": ("l2t-dln", "warm", True, "proper_descent", "sgd", 1.0),
    "l2t-dln-bce-fixed-lr03": ("l2t-dln-fixed", "warm", False, "always", "sgd", 0.3),
    "l2t-dln-bce-proper-lr03": ("l2t-dln", "warm", True, "proper", "sgd", 0.3),
    "l2t-dlf-fixed-long": ("l2t-dlf-fixed", None, None, None, "sgd", 0.1),
    "l2t-dlf-long": ("l2t-dlf", None, None, None, "sgd", 0.1),
    "gce-long": ("gce", None, None, None, "sgd", 0.1),
    "sce-long": ("sce", None, None, None, "sgd", 0.1),
    "l2t-gce-long": ("l2t-gce", None, None, None, "sgd", 0.1),
}


@pytest.mark.parametrize("dataset", ["digits", "mnist_5k", "mnist1d", "mnist1d_cnn"])
def test_recorded_rows_keep_the_config_they_ran_with(dataset):
    for method, recorded in RECORDED_ROWS.items():
        config = results.method_config(dataset, method, noise=0.4)
        dln = config.get("dln")
        assert (config.method, *((dln.init, dln.preserve_scale, dln.accept) if dln else
                                 (None,) * 3),
                config.optimizer.name, config.optimizer.learning_rate) == recorded, method
    # The rows above are every row that reads configs/l2t_dln.py, but its two defaults
    # (and the transfer rows, which are their source row's config: tested above).
    reading = {name for name, (module, options, _, _) in results.METHODS.items()
               if (module is l2t_dln or "long" in options) and name not in results.TRANSFERS}
    assert reading - set(RECORDED_ROWS) == {"l2t-dln", "l2t-dln-fixed"}


# Datasets on which the default rows ran under other names: the row the numbers of
# l2t-dln and l2t-dln-fixed in docs/results were recorded as.
DEFAULT_RAN_AS = {"digits": "-lr1", "mnist1d": "-lr1", "mnist1d_cnn": "-lr1", "mnist_5k": ""}


@pytest.mark.parametrize("dataset", list(DEFAULT_RAN_AS))
@pytest.mark.parametrize("noise", [0.0, 0.4])
def test_default_rows_are_the_runs_their_records_come_from(dataset, noise):
    def fields(method):
        return _flat(results.method_config(dataset, method, noise).to_dict())

    suffix = DEFAULT_RAN_AS[dataset]
    assert fields("l2t-dln") == fields("l2t-dln-warm-proper" + suffix)
    taught, frozen = fields("l2t-dln-fixed"), fields("l2t-dln-warm-fixed" + suffix)
    # Only the taught method reads the acceptance rule and the scale preservation.
    differing = {k for k in taught.keys() | frozen.keys() if taught.get(k) != frozen.get(k)}
    assert differing == {"dln.preserve_scale", "dln.accept"}


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"section.field": value}`` of a nested dict."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


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
    # Two groups (ce: L2T-DLF, l2t-dln: the L2T-DLN defaults), each a line per noise level.
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
            for m, n in (("ce-long", 8), ("l2t-dln-released-fixed", 8), ("l2t-dln-released", 4))]
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


def test_reports_draw_a_picture_per_results_file_and_the_headline(tmp_path):
    def record(method, noise, mean):
        return {"dataset": "digits", "noise": noise, "student": "mlp", "method": method,
                "seeds": [0, 1], "test_error": [mean - 1, mean + 1], "mean": mean,
                "std": 1.41}

    (tmp_path / "results").mkdir()
    for noise in (0.0, 0.4):
        path = str(tmp_path / "results" / f"digits_noise{noise}.json")
        results.merge_records(path, [record("ce-long", noise, 8.0), record("l2t-dln", noise, 5.0)])
        # A rerun replaces its rows, keeps the others; a name METHODS lacks goes last.
        merged = results.merge_records(path, [record("unknown-row", noise, 9.0),
                                              record("sce-long", noise, 4.0),
                                              record("l2t-dln", noise, 6.0)])
        assert [r["method"] for r in merged] == ["ce-long", "l2t-dln", "sce-long",
                                                 "unknown-row"]
        assert merged[1]["mean"] == 6.0
    table = results.write_reports(str(tmp_path))
    assert "| digits | 0.4 | mlp |" in table and (tmp_path / "results.md").exists()
    for name in ("digits_noise0.0.png", "digits_noise0.4.png", "headline.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    # Pictures beside the JSON files are not read as results.
    assert results.write_reports(str(tmp_path)) == table
    assert results.method_kind("l2t-dln") == "learned"
    assert results.method_kind("l2t-dln-fixed") == results.method_kind("sce") == "hand-set"
    assert results.method_kind("ce-long") == "cross-entropy"
    assert results.method_kind("kd-target") == results.method_kind("unknown-row") == "other"
