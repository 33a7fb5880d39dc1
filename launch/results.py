r"""Regenerates the results tables: every method on every dataset, clean and noisy, n seeds.

  python -m launch.results --workdir=/tmp/l2t_results            # everything (hours)
  python -m launch.results --datasets=digits --seeds=8 --workdir=/tmp/l2t_results
  python -m launch.results --methods=ce-long,l2t-dln-fixed,l2t-dln --workdir=/tmp/l2t_results

Each (dataset, noise, method, seed) is one `launch.train`-equivalent run, in
WORKDIR/<dataset>_noise<rate>/<method>/s<seed>; finished runs are reused, so the command
can be interrupted and repeated. A method name here is a row of `METHODS`: a config
file, its options and the method, so that methods compared in one group share the
student, optimizer, step budget and dev selection:

* L2T-DLF group (configs/l2t_dlf.py: the episode length T, the DLF student optimizer):
  ``ce``, ``l2t-dlf-fixed``, ``l2t-dlf``.
* L2T-DLN defaults (configs/l2t_dln.py as it stands: the recommended recipe, the DLN
  warm-started on a soft margin, its scale preserved, the proper rule, the student's SGD
  rate dev error selects: 1.0 on digits and mnist1d, 0.1 on mnist_5k): ``l2t-dln`` (taught)
  and ``l2t-dln-fixed`` (the warm DLN frozen).
* L2T-DLN group (configs/l2t_dln.py:<dataset>,released: plain SGD 0.1, batch 25, K = 15,
  400 iterations on the small datasets): ``ce-long`` (cross-entropy on that schedule),
  ``l2t-dln-released-fixed`` and ``l2t-dln-released`` (the authors' released set-up),
  ``l2t-dln-warm-fixed`` and ``l2t-dln-warm`` (the DLN warm-started on a soft margin, and
  taught with its scale preserved), ``l2t-dln-warm-proper`` (the same, keeping only DLN
  updates under which the right answer stays the loss's minimum:
  ``dln.accept="proper"``), ``l2t-dln-warm-descent`` (and only those that do not raise
  the iteration's validation CE: ``dln.accept="proper_descent"``).
* Populations: ``l2t-dlf-pop4`` is ``l2t-dlf`` with the teacher's meta-gradient averaged
  over 4 students per episode (``teacher.population_size=4``).
* L2T-DLF on the L2T-DLN group's student and schedule (option ``long``: the teacher
  updated online every 50 steps, no episodes), so that ``ce-long`` is its CE row:
  ``l2t-dlf-fixed-long``, ``l2t-dlf-long``.
* The noise-robust losses (configs/robust.py): ``gce`` (q = 0.7), ``sce`` (alpha 0.1,
  beta 1.0, A = -4) and ``l2t-gce`` (GCE with q set by a loss teacher trained as L2T-DLF's)
  in the L2T-DLF group; ``gce-long``, ``sce-long``, ``l2t-gce-long`` on the L2T-DLN
  group's student and schedule (the teacher online every 50 steps).
* Offline distillation (configs/distill.py; the distillation settings, e.g. mnist1d: a
  1-D CNN target model, an MLP student): ``kd-target`` (the target model alone),
  ``kd-student`` (the student alone, CE), ``kd``, ``at``, ``at-kd`` (hand-set weights),
  ``l2t-kd``, ``l2t-at``, ``l2t-at-kd`` (weights set by a loss teacher). Every run of a
  seed distills from that seed's ``kd-target`` run (trained by whichever runs first);
  records name the target model (``"target"``). ``l2t-kd-ep``: the loss teacher trained
  on 8 whole trainings of 3,000 steps (episodes, fresh students) instead of online.
* Transfer (`TRANSFERS`; docs/export.md): ``l2t-dlf-transfer`` and ``l2t-dln-transfer``
  train the source row's config on this dataset (config.method=transfer) on the frozen
  loss learned by that row's run of the same seed and noise on another dataset: on
  mnist_5k from digits, on mnist1d_cnn from mnist1d (both with their MLPs). The source
  runs are run first when missing, under their own names.
* Moonshine cheap-convolution students (configs/distill.py:<setting>,moonshine: the
  target's own architecture with every block's 3x3 convolutions swapped for a cheap
  block): ``ms-<block>`` alone (CE) and ``ms-<block>-at-kd`` (AT + KD from the target
  model), for the blocks of `MOONSHINE_BLOCKS`; their records add the student's
  parameters, multiply-adds and XLA FLOPs per example, and ``moonshine.png`` draws
  error against parameters.
* ONE, online distillation (configs/one.py; the settings' base networks with their last
  stage in 3 branches): ``one-base`` (the base network alone, CE), ``one`` (ONE's ramp),
  ``l2t-one`` (the KL weight set by a loss teacher), ``one-const1`` and ``one-const4``
  (ONE's loss at a constant KL weight of 1, l2t-one's start, and 4), ``l2t-one-slow``
  (the teacher at Adam 0.03, the weight in (0, 4), instead of 0.1 and (0, 10)). The test
  error of ``one`` and ``l2t-one`` is the deployable branch's; the gated ensemble's is in
  ``ensemble_test_error`` (and in the table's cells).
* Online teaching over a full-length training (option ``online``: 10 episode lengths,
  teacher updated every 50 steps by truncated backprop, no episodes): ``ce-ol``,
  ``l2t-dlf-fixed-ol``, ``l2t-dlf-ol``.
* Separate teacher data: ``ce-md``, ``l2t-dlf-fixed-md``, ``l2t-dlf-md`` are the L2T-DLF
  group with 150 of the dev examples (300 on digits, 500 on mnist1d) set aside for the
  teacher (``data.meta_dev_size=150``); every method of the group selects on the rest.
  ``ce-long-md``, ``l2t-dln-warm-fixed-md``, ``l2t-dln-warm-proper-md``: the same for the
  L2T-DLN group.
* Student learning rate 1.0 instead of the released 0.1: ``ce-long-lr1``,
  ``l2t-dln-warm-fixed-lr1``, ``l2t-dln-warm-proper-lr1``, ``l2t-dln-warm-descent-lr1``;
  0.3: the first three with ``-lr03``. ``l2t-dln-warm-descent-k600-lr1``: the descent row
  keeping no proposal in the first 600 student steps (``dln.keep_after=600``).
* The DLN warm-started on pairwise binary cross-entropy (``dln.warm_target="bce"``),
  student SGD 0.3: ``l2t-dln-bce-fixed-lr03`` (frozen), ``l2t-dln-bce-proper-lr03``
  (taught under the proper rule, scale preserved).
* Federated (configs/federated.py; digits, mnist_5k, mnist1d; 20 clients): ``fedavg``,
  ``fedgen``, ``l2t-fedgen`` (FedGen's term scaled by a loss teacher) at Dirichlet alpha
  0.1, the same with ``-a1`` at 1.0; records add ``alpha`` and ``clients``.

Writes docs/results/<dataset>_noise<rate>.json (test error in percent, dev-selected, per
seed; records of other methods already in the file are kept), then, from every JSON file
there, the tables docs/results.md and the pictures: docs/results/<dataset>_noise<rate>.png
(each method's mean +- std as a bar, its seeds as dots; `PLOT_FIRST` on top) and
docs/results/headline.png (the `HEADLINE` rows per setting). With no methods it runs
nothing and only rewrites those from the JSON files:

  python -m launch.results --workdir=/tmp/unused --methods=
"""

import ast
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

import launch
from configs import distill, federated, l2t_dlf, l2t_dln, one, robust
from l2t_jax import data, metrics, plots, students, train
from l2t_jax.errors import ConfigError
from launch import cli

# The taught warm DLN under the proper rule (scale preserved), and with the descent test.
_PROPER = {"dln.preserve_scale": True, "dln.accept": "proper"}
_DESCENT = {**_PROPER, "dln.accept": "proper_descent"}
# The DLN warm-started on pairwise binary cross-entropy, the student at SGD 0.3.
_BCE = {"dln.warm_target": "bce", "optimizer.learning_rate": 0.3}
# configs/l2t_dln.py's options for the rows measured on the released set-up (random DLN,
# every update kept, SGD 0.1) and on that set-up with the DLN warm-started; the rows set
# what they change from there.
_RELEASED, _RELEASED_WARM = ",released", ",released,warm"
# name -> (config module, extra config options, config.method, {"section.field": value})
METHODS = {
    "ce": (l2t_dlf, "", "ce", {}),
    "l2t-dlf-fixed": (l2t_dlf, "", "l2t-dlf-fixed", {}),
    "l2t-dlf": (l2t_dlf, "", "l2t-dlf", {}),
    "ce-long": (l2t_dln, _RELEASED, "ce", {}),
    # configs/l2t_dln.py's defaults: the recommended recipe, taught and frozen.
    "l2t-dln-fixed": (l2t_dln, "", "l2t-dln-fixed", {}),
    "l2t-dln": (l2t_dln, "", "l2t-dln", {}),
    "l2t-dln-released-fixed": (l2t_dln, _RELEASED, "l2t-dln-fixed", {}),
    "l2t-dln-released": (l2t_dln, _RELEASED, "l2t-dln", {}),
    "l2t-dln-warm-fixed": (l2t_dln, _RELEASED_WARM, "l2t-dln-fixed", {}),
    "l2t-dln-warm": (l2t_dln, _RELEASED_WARM, "l2t-dln", {"dln.preserve_scale": True}),
    "l2t-dln-warm-proper": (l2t_dln, _RELEASED_WARM, "l2t-dln", _PROPER),
    "l2t-dln-warm-descent": (l2t_dln, _RELEASED_WARM, "l2t-dln", _DESCENT),
    "l2t-dlf-pop4": (l2t_dlf, "", "l2t-dlf", {"teacher.population_size": 4}),
    "ce-md": (l2t_dlf, "", "ce", {"data.meta_dev_size": 150}),
    "l2t-dlf-fixed-md": (l2t_dlf, "", "l2t-dlf-fixed", {"data.meta_dev_size": 150}),
    "l2t-dlf-md": (l2t_dlf, "", "l2t-dlf", {"data.meta_dev_size": 150}),
    "ce-long-md": (l2t_dln, _RELEASED, "ce", {"data.meta_dev_size": 150}),
    "l2t-dln-warm-fixed-md": (l2t_dln, _RELEASED_WARM, "l2t-dln-fixed",
                              {"data.meta_dev_size": 150}),
    "l2t-dln-warm-proper-md": (l2t_dln, _RELEASED_WARM, "l2t-dln",
                               {**_PROPER, "data.meta_dev_size": 150}),
    "ce-long-lr03": (l2t_dln, _RELEASED, "ce", {"optimizer.learning_rate": 0.3}),
    "ce-long-lr1": (l2t_dln, _RELEASED, "ce", {"optimizer.learning_rate": 1.0}),
    "l2t-dln-warm-fixed-lr03": (l2t_dln, _RELEASED_WARM, "l2t-dln-fixed",
                                {"optimizer.learning_rate": 0.3}),
    "l2t-dln-warm-proper-lr03": (l2t_dln, _RELEASED_WARM, "l2t-dln",
                                 {**_PROPER, "optimizer.learning_rate": 0.3}),
    "l2t-dln-warm-fixed-lr1": (l2t_dln, _RELEASED_WARM, "l2t-dln-fixed",
                               {"optimizer.learning_rate": 1.0}),
    "l2t-dln-warm-proper-lr1": (l2t_dln, _RELEASED_WARM, "l2t-dln",
                                {**_PROPER, "optimizer.learning_rate": 1.0}),
    "l2t-dln-warm-descent-lr1": (l2t_dln, _RELEASED_WARM, "l2t-dln",
                                 {**_DESCENT, "optimizer.learning_rate": 1.0}),
    "l2t-dln-warm-descent-k600-lr1": (l2t_dln, _RELEASED_WARM, "l2t-dln",
                                      {**_DESCENT, "optimizer.learning_rate": 1.0,
                                       "dln.keep_after": 600}),
    "l2t-dln-bce-fixed-lr03": (l2t_dln, _RELEASED_WARM, "l2t-dln-fixed", _BCE),
    "l2t-dln-bce-proper-lr03": (l2t_dln, _RELEASED_WARM, "l2t-dln", {**_PROPER, **_BCE}),
    "ce-ol": (l2t_dlf, ",online", "ce", {}),
    "l2t-dlf-fixed-ol": (l2t_dlf, ",online", "l2t-dlf-fixed", {}),
    "l2t-dlf-ol": (l2t_dlf, ",online", "l2t-dlf", {}),
    "l2t-dlf-fixed-long": (l2t_dlf, ",long", "l2t-dlf-fixed", {}),
    "l2t-dlf-long": (l2t_dlf, ",long", "l2t-dlf", {}),
    "gce": (robust, "", "gce", {}),
    "sce": (robust, "", "sce", {}),
    "l2t-gce": (robust, "", "l2t-gce", {}),
    "gce-long": (robust, ",long", "gce", {}),
    "sce-long": (robust, ",long", "sce", {}),
    "l2t-gce-long": (robust, ",long", "l2t-gce", {}),
    "kd-target": (distill, "", "kd-target", {}),
    "kd-student": (distill, "", "ce", {}),
    "kd": (distill, "", "kd", {}),
    "at": (distill, "", "at", {}),
    "at-kd": (distill, "", "at-kd", {}),
    "l2t-kd": (distill, "", "l2t-kd", {}),
    "l2t-at": (distill, "", "l2t-at", {}),
    "l2t-at-kd": (distill, "", "l2t-at-kd", {}),
    # The loss teacher trained on whole trainings (8 episodes of the run's full length,
    # fresh students; frozen in the reported run) instead of online 50-step windows.
    "l2t-kd-ep": (distill, "", "l2t-kd", {
        "teacher.num_episodes": 8, "teacher.episode_steps": 3000,
        "teacher.teach_online": False, "teacher.learning_rate": 0.1,
        "engine.estimator": "full", "engine.remat": "sqrt"}),
    "one-base": (one, "", "ce", {"student.branches": 1}),
    "one": (one, "", "one", {}),
    "l2t-one": (one, "", "l2t-one", {}),
    # ONE's loss at a constant KL weight (no ramp): 1 (l2t-one's untaught start), 4 (the
    # top of l2t-one-slow's range).
    "one-const1": (one, "", "one", {"one.ramp_steps": 1}),
    "one-const4": (one, "", "one", {"one.ramp_steps": 1, "one.ramp_max": 4.0}),
    # l2t-one's teacher at Adam 0.03 (the offline distillation teachers' rate) with the
    # weight in (0, 4), instead of 0.1 and (0, 10): a higher dev error on both settings.
    "l2t-one-slow": (one, "", "l2t-one", {"teacher.learning_rate": 0.03,
                                          "one.kl_weight_range": (0.0, 4.0)}),
    # Federated: 20 clients, Dirichlet label split at alpha 0.1 (FedGen's) and 1.0.
    "fedavg": (federated, "", "fedavg", {}),
    "fedgen": (federated, "", "fedgen", {}),
    "fedavg-a1": (federated, "", "fedavg", {"federated.alpha": 1.0}),
    "fedgen-a1": (federated, "", "fedgen", {"federated.alpha": 1.0}),
    "l2t-fedgen": (federated, "", "l2t-fedgen", {}),
    "l2t-fedgen-a1": (federated, "", "l2t-fedgen", {"federated.alpha": 1.0}),
}
# Moonshine: the target's own architecture with cheap blocks (config.student.conv),
# alone (CE) and with AT + KD from the target model: rows ms-<block>, ms-<block>-at-kd.
MOONSHINE_BLOCKS = ("conv", "b2", "b4", "g8b2", "dconv", "dconv_b2")
for _block in MOONSHINE_BLOCKS:
    METHODS[f"ms-{_block}"] = (distill, ",moonshine", "ce", {"student.conv": _block})
    METHODS[f"ms-{_block}-at-kd"] = (distill, ",moonshine", "at-kd", {"student.conv": _block})
# Distillation rows share one target model per (dataset, noise, seed): the kd-target run.
TARGET_ROW = "kd-target"
# Transfer rows: the student of the source row's config on this dataset, trained on the
# frozen loss of the source row's run on another dataset, same noise and seed
# (config.method=transfer): row -> (source row, {dataset: the source's dataset}).
TRANSFERS = {
    "l2t-dlf-transfer": ("l2t-dlf", {"mnist_5k": "digits", "mnist1d_cnn": "mnist1d"}),
    "l2t-dln-transfer": ("l2t-dln", {"mnist_5k": "digits", "mnist1d_cnn": "mnist1d"}),
}
for _row, (_source, _) in TRANSFERS.items():
    METHODS[_row] = (*METHODS[_source][:2], "transfer", METHODS[_source][3])

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the individual runs live.")
_DATASETS = flags.DEFINE_list("datasets", ["digits", "mnist_5k", "mnist1d"], "Dataset variants.")
_NOISE = flags.DEFINE_list("noise", ["0.0", "0.4"], "Symmetric training-label noise rates.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "Methods (rows of METHODS).")
_SEEDS = flags.DEFINE_integer("seeds", 8, "Seeds 0 .. n-1 (init, data order, teacher).")
_OUT = flags.DEFINE_string("out", "docs", "Where results.md and results/ are written.")
_SET = flags.DEFINE_list(
    "set", [], "Config overrides for every run of this call, as section.field=value (e.g. "
    "teacher.num_episodes=25 to shorten the teacher's phase); recorded in the JSON and "
    "flagged in the table. Use a separate --workdir: finished runs are reused by name.")
flags.mark_flag_as_required("workdir")


def parse_overrides(items: list[str], configs: list) -> dict:
    """``["a.b=v", ...]`` -> ``{"a.b": value}``, each value parsed as ``--config.a.b=v``
    would parse it for the field's type in the first of `configs` that has it.

    Raises:
        ConfigError: a malformed item, a field none of `configs` has, or a bad value.
    """
    overrides = {}
    for item in items:
        dotted, sep, text = item.partition("=")
        if not sep or dotted.count(".") != 1:
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        section, field = dotted.split(".")
        having = [c for c in configs if section in c and field in c[section]]
        if not having:
            raise ConfigError(f"--set {item}: no selected method's config has "
                              f"config.{dotted}; check the name (see configs/)")
        overrides[dotted] = _parse_value(item, text, having[0][section][field])
    return overrides


def _parse_value(item: str, text: str, old):
    """`text` as a value of `old`'s type (bools as absl parses them: true/false/1/0)."""
    parsers = ((bool, flags.BooleanParser()), (int, flags.IntegerParser()),
               (float, flags.FloatParser()))
    try:
        for kind, parser in parsers:
            if isinstance(old, kind):
                return parser.parse(text)
        if isinstance(old, (tuple, list)):
            return type(old)(ast.literal_eval(text))
    except (ValueError, TypeError, SyntaxError) as e:
        raise ConfigError(f"--set {item}: {e}") from None
    return text


def applicable_overrides(config, extra: dict) -> dict:
    """The entries of ``{"section.field": value}`` whose field `config` has."""
    def has(dotted):
        section, field = dotted.split(".")
        return section in config and field in config[section]
    return {k: v for k, v in extra.items() if has(k)}


def method_config(dataset: str, method: str, noise: float = 0.0, extra: dict | None = None):
    """The config of one `METHODS` row on one dataset variant and training-label noise.

    `extra` (``{"section.field": value}``, from `parse_overrides`) is applied last; a
    field the method's config does not have is skipped (so that, e.g., teacher settings
    leave the CE rows alone).
    """
    module, options, config_method, overrides = METHODS[method]
    config = module.get_config(dataset + options)
    config.method = config_method
    if method in TRANSFERS:  # the source's runs, by seed, under the results workdir
        source, row = transfer_source(dataset, method)
        config.loss_from = os.path.join(f"{source}_noise{noise}", row)
    extra = applicable_overrides(config, extra or {})
    for dotted, value in {**overrides, **extra}.items():
        section, field = dotted.split(".")
        config[section][field] = value
    if noise:
        config.data.update(noise_type="symmetric", noise_rate=noise)
    return config


def transfer_source(dataset: str, method: str) -> tuple[str, str]:
    """``(dataset, row)`` of a `TRANSFERS` row's source runs when it runs on `dataset`.

    Raises:
        ConfigError: the row has no source for `dataset`.
    """
    row, sources = TRANSFERS[method]
    if dataset not in sources:
        raise ConfigError(f"{method} runs on {sorted(sources)} (from {row} on "
                          f"{sorted(set(sources.values()))}), not on {dataset}")
    return sources[dataset], row


def checked_configs(datasets: list[str], noises: list[str], names: list[str],
                    seeds: int, items: list[str]) -> tuple[dict, dict]:
    """Every run's config of one call, checked before any runs.

    Returns:
        ``(configs, overrides)``: ``{(dataset, noise): {method: config}}`` (one results
        file per setting) and the parsed ``--set`` overrides.

    Raises:
        ConfigError: the first bad flag or config, in one line.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown --methods {unknown}; choose from {list(METHODS)}")
    rates = []
    for text in noises:
        try:
            rates.append(float(text))
        except ValueError:
            raise ConfigError(f"--noise expects rates in [0, 1), got {text!r}") from None
        if not 0.0 <= rates[-1] < 1.0:
            raise ConfigError(f"--noise expects rates in [0, 1), got {text!r}")

    def config_of(dataset, method, noise=0.0, extra=None):
        try:
            return method_config(dataset, method, noise, extra)
        except ConfigError:
            raise
        except ValueError as e:  # an unknown or unsupported dataset variant
            raise ConfigError(f"--datasets={dataset} with --methods={method}: {e}") from None

    extra = parse_overrides(items, [config_of(d, m) for d in datasets for m in names])
    configs = {}
    for dataset in datasets:
        for noise in rates:
            for method in names:
                config = config_of(dataset, method, noise, extra)
                try:
                    train.validate_config(config)
                except ConfigError as e:
                    raise ConfigError(f"{dataset} noise {noise} {method}: {e}") from None
                configs.setdefault((dataset, noise), {})[method] = config
    return configs, extra


def run_one(config, dataset: str, noise: float, method: str, seed: int) -> dict:
    """Runs (or reuses) one seed of one method (its `method_config`); returns its summary."""
    workdir = os.path.join(_WORKDIR.value, f"{dataset}_noise{noise}", method, f"s{seed}")
    path = os.path.join(workdir, train.SUMMARY_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    config = config.copy_and_resolve_references()
    config.seed = seed
    if "target" in config and not config.target.workdir:
        config.target.workdir = os.path.join(_WORKDIR.value, f"{dataset}_noise{noise}",
                                             TARGET_ROW, f"s{seed}")
    if method in TRANSFERS:  # the source run first (or its finished run, reused)
        source, row = transfer_source(dataset, method)
        run_one(method_config(source, row, noise), source, noise, row, seed)
        config.loss_from = os.path.join(_WORKDIR.value, config.loss_from, f"s{seed}")
    logging.info("running %s noise %s %s seed %d", dataset, noise, method, seed)
    return train.train_and_evaluate(config, workdir)


def _std(values: list[float]) -> float:
    """The sample standard deviation (0 for one value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _views(summary: dict) -> list[str]:
    """The other readings of the student a run's summary reports (`students.views`):
    ``ensemble`` for a multi-branch student."""
    return [key.removesuffix("_test_error") for key in summary
            if key.endswith("_test_error") and key != "test_error"
            and not key.startswith("final_")]


def student_cost(config) -> dict:
    """The config's student: its cheap block, parameters, multiply-adds (the
    architecture's) and XLA FLOPs (what runs here) per example, of an eval forward pass
    on one example of the dataset's shape."""
    splits = data.load_splits(config.data)
    model = students.build_student(config.student, splits.num_classes)
    x = jax.ShapeDtypeStruct((1, *splits.test.x.shape[1:]), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return {"conv": config.student.conv,
            "params": students.count_params(variables["params"]),
            "macs_per_example": students.count_macs(model, variables, x),
            "flops_per_example": students.count_flops(model, variables, x)}


def main(argv):
    del argv  # `cli.run` refuses extra arguments
    launch.quiet_library_logging()
    configs, extra = checked_configs(_DATASETS.value, _NOISE.value, _METHODS.value,
                                     _SEEDS.value, _SET.value)
    results_dir = os.path.join(_OUT.value, "results")
    os.makedirs(results_dir, exist_ok=True)
    for (dataset, noise), configs_of_setting in configs.items():
        records = []
        for method, config in configs_of_setting.items():
            summaries = [run_one(config, dataset, noise, method, s)
                         for s in range(_SEEDS.value)]
            errors = [s["test_error"] for s in summaries]
            record = {
                "dataset": dataset, "noise": noise, "student": config.student.name,
                "method": method, "seeds": list(range(_SEEDS.value)),
                "test_error": errors, "mean": float(np.mean(errors)), "std": _std(errors),
            }
            for view in _views(summaries[0]):
                view_errors = [s[f"{view}_test_error"] for s in summaries]
                record.update({f"{view}_test_error": view_errors,
                               f"{view}_mean": float(np.mean(view_errors)),
                               f"{view}_std": _std(view_errors)})
            if "target" in config:
                record["target"] = config.target.model.name
            if "federated" in config:
                record.update(alpha=config.federated.alpha,
                              clients=config.federated.num_clients)
            if method.startswith("ms-"):
                record.update(student_cost(config))
            used = applicable_overrides(config, extra)
            if used:
                record["overrides"] = used
            records.append(record)
        merge_records(os.path.join(results_dir, f"{dataset}_noise{noise}.json"), records)
        rounds = [m for m, config in configs_of_setting.items() if "federated" in config]
        if rounds:
            plots.plot_accuracy_curves(
                {m: test_error_curve(dataset, noise, m) for m in rounds},
                os.path.join(results_dir, f"{dataset}_noise{noise}_rounds.png"),
                f"{dataset}, noise {noise}: the server's model, "
                f"{configs_of_setting[rounds[0]].federated.num_clients} clients")
    print(write_reports(_OUT.value))


def test_error_curve(dataset: str, noise: float, method: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, test errors (seeds, T))`` of a row's finished runs, at their evaluations."""
    errors = []
    for seed in range(_SEEDS.value):
        records = metrics.read_metrics(
            os.path.join(_WORKDIR.value, f"{dataset}_noise{noise}", method, f"s{seed}"))
        evaluated = [r for r in records if "test/error" in r]
        steps = np.asarray([r["step"] for r in evaluated])
        errors.append([r["test/error"] for r in evaluated])
    return steps, np.asarray(errors)


def merge_records(path: str, records: list[dict]) -> list[dict]:
    """Writes `records` into the results file `path`, replacing its records of the same
    methods and keeping the others; in `METHODS` order (names no longer in it last).

    Returns:
        the file's records.
    """
    replaced = {r["method"] for r in records}
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [r for r in json.load(f) if r["method"] not in replaced]
    merged = in_row_order(kept + records)
    with open(path, "w") as f:
        json.dump(merged, f, indent=2)
    return merged


def in_row_order(records: list[dict], first: list[str] = ()) -> list[dict]:
    """`records` sorted by method: `first`, then in `METHODS` order, then names no longer
    in it, alphabetically."""
    order = {name: i for i, name in enumerate(dict.fromkeys([*first, *METHODS]))}
    return sorted(records, key=lambda r: (order.get(r["method"], len(order)), r["method"]))


def read_records(results_dir: str) -> dict[str, list[dict]]:
    """``{file name without .json: records}`` for every results file in `results_dir`."""
    records = {}
    for name in sorted(os.listdir(results_dir)):
        if name.endswith(".json"):
            with open(os.path.join(results_dir, name)) as f:
                records[name.removesuffix(".json")] = json.load(f)
    return records


def write_reports(out: str) -> str:
    """From every results file in OUT/results (runs nothing): OUT/results.md (returned),
    a picture per results file beside it (OUT/results/<dataset>_noise<rate>.png),
    OUT/results/headline.png (the `HEADLINE` rows) and, with Moonshine rows,
    OUT/moonshine.png."""
    results_dir = os.path.join(out, "results")
    files = read_records(results_dir)
    rows = [r for records in files.values() for r in records]
    table = write_table(rows, os.path.join(out, "results.md"))
    kinds = {name: method_kind(name) for name in {r["method"] for r in rows}}
    headline_panels = []
    for name, records in files.items():
        if not records:
            continue
        first = [m for m in PLOT_FIRST if any(r["method"] == m for r in records)]
        ordered = in_row_order(records, first)
        setting = f"{records[0]['dataset']}, noise {records[0]['noise']} ({records[0]['student']})"
        plots.plot_results(ordered, os.path.join(results_dir, f"{name}.png"),
                           f"{setting}: test error (%) at the best dev step", kinds,
                           len(first))
        headline = [(label, next(r for r in records if r["method"] == method))
                    for label, method in HEADLINE.items()
                    if any(r["method"] == method for r in records)]
        if len(headline) > 1 and headline[0][1]["method"] == HEADLINE["CE"]:
            headline_panels.append((setting, headline))
    if headline_panels:
        plots.plot_headline(headline_panels, os.path.join(results_dir, "headline.png"),
                            HEADLINE_PICTURE_TITLE, kinds)
    if any(r["method"].startswith("ms-") for r in rows):
        plots.plot_moonshine(rows, os.path.join(out, "moonshine.png"))
    return table


def method_kind(method: str) -> str:
    """What a row's loss is, for the pictures' colours: ``"cross-entropy"``, ``"learned"``
    (set by a teacher as the student trains), ``"hand-set"`` (a fixed hand-made or
    frozen loss) or ``"other"`` (the distillation target model; names not in `METHODS`)."""
    config_method = METHODS[method][2] if method in METHODS else ""
    if config_method == "ce":
        return "cross-entropy"
    if not config_method or config_method == "kd-target":
        return "other"
    if config_method.startswith("l2t-") and not config_method.endswith("-fixed"):
        return "learned"
    return "hand-set"


# The rows each results picture draws first (those its file has), in this order: the
# baselines and each family's recommended row; the rest follow in `METHODS` order.
PLOT_FIRST = ("ce", "ce-long", "l2t-dlf", "l2t-dlf-long", "l2t-dln", "gce", "sce", "l2t-gce",
              "gce-long", "sce-long", "l2t-gce-long", "kd-student", "kd", "l2t-kd", "at-kd",
              "l2t-at-kd", "one-base", "one", "l2t-one")


# Methods compared in one table share students, optimizers, step budgets and dev selection.
GROUPS = {
    "L2T-DLF group (configs/l2t_dlf.py; robust losses: configs/robust.py)": (
        "ce", "gce", "sce", "l2t-gce", "l2t-dlf-fixed", "l2t-dlf", "l2t-dlf-pop4"),
    "Offline distillation (configs/distill.py: kd-target is the target model itself; "
    "the student column names the distilled student)": (
        "kd-target", "kd-student", "kd", "at", "at-kd", "l2t-kd", "l2t-at", "l2t-at-kd",
        "l2t-kd-ep"),
    "ONE, online distillation (configs/one.py: one-base is the base network; the error "
    "of one and l2t-one is the deployable branch's, the gated ensemble's follows it)": (
        "one-base", "one", "one-const1", "one-const4", "l2t-one", "l2t-one-slow"),
    "L2T-DLF group, teacher on a separate meta-dev split (150 of the dev examples: of 300 "
    "on digits, 500 on mnist1d; selection on the rest)": ("ce-md", "l2t-dlf-fixed-md",
                                                          "l2t-dlf-md"),
    "L2T-DLF group, online teacher over a training 10 episode lengths long "
    "(configs/l2t_dlf.py:<dataset>,online)": ("ce-ol", "l2t-dlf-fixed-ol", "l2t-dlf-ol"),
    "L2T-DLN defaults (configs/l2t_dln.py: the DLN warm-started, scale preserved, proper "
    "rule; batch 25, K = 15; the student's SGD rate dev error selects: 1.0 on digits and "
    "mnist1d, 0.1 on mnist_5k; the records are the runs of the same configs as rows "
    "l2t-dln-warm-proper-lr1 and l2t-dln-warm-fixed-lr1, on mnist_5k l2t-dln-warm-proper "
    "and l2t-dln-warm-fixed)": (
        "l2t-dln-fixed", "l2t-dln"),
    "L2T-DLN group (configs/l2t_dln.py:<dataset>,released: SGD 0.1, batch 25, K = 15; 400 "
    "iterations, mnist_5k 200), with L2T-DLF and the robust losses on the same student and "
    "schedule (configs/l2t_dlf.py:<dataset>,long, configs/robust.py:<dataset>,long)": (
        "ce-long", "gce-long", "sce-long", "l2t-gce-long", "l2t-dlf-fixed-long",
        "l2t-dlf-long", "l2t-dln-released-fixed", "l2t-dln-released",
        "l2t-dln-warm-fixed", "l2t-dln-warm", "l2t-dln-warm-proper", "l2t-dln-warm-descent"),
    "L2T-DLN group, teacher on a separate meta-dev split (150 of the 300 dev examples; "
    "selection on the other 150)": ("ce-long-md", "l2t-dln-warm-fixed-md",
                                    "l2t-dln-warm-proper-md"),
    "L2T-DLN group at other student learning rates (suffix lr03: 0.3, lr1: 1.0; see "
    "l2t_dln.md for the rates dev error selects; bce: the DLN warm-started on pairwise "
    "binary cross-entropy)": (
        "ce-long-lr03", "l2t-dln-warm-fixed-lr03", "l2t-dln-warm-proper-lr03",
        "ce-long-lr1", "l2t-dln-warm-fixed-lr1", "l2t-dln-warm-proper-lr1",
        "l2t-dln-warm-descent-lr1", "l2t-dln-warm-descent-k600-lr1",
        "l2t-dln-bce-fixed-lr03", "l2t-dln-bce-proper-lr03"),
    "Federated (configs/federated.py: 20 clients, 10 a round, 20 local steps of batch 32, "
    "100 rounds; an MLP 200-32; the server's model after the round selected on half the dev "
    "split, the other half being the server's validation split; -a1: Dirichlet alpha 1.0 "
    "instead of 0.1)": ("fedavg", "fedgen", "l2t-fedgen", "fedavg-a1",
                                          "fedgen-a1", "l2t-fedgen-a1"),
    "Transfer: the frozen loss of a run on another dataset (mnist_5k: digits with its MLP; "
    "mnist1d_cnn: mnist1d with its MLP), same noise and seed, on the student and schedule "
    "of the source row's config here (compare l2t-dlf-transfer with the L2T-DLF group, "
    "l2t-dln-transfer with the L2T-DLN defaults' ce-long on mnist_5k, ce-long-lr1 on "
    "mnist1d_cnn)": ("l2t-dlf-transfer", "l2t-dln-transfer"),
}


# The headline: each method family at its recommended setting, all on one student and
# schedule (the L2T-DLN group's), so that its columns compare: label -> row of `METHODS`.
HEADLINE = {"CE": "ce-long", "GCE": "gce-long", "SCE": "sce-long", "L2T-DLF": "l2t-dlf-long",
            "l2t-gce": "l2t-gce-long", "L2T-DLN": "l2t-dln-warm-proper"}
HEADLINE_PICTURE_TITLE = (
    "Test error (%) at the best dev step, mean +- std (dots: seeds): each family at its "
    "recommended setting on one student and schedule (the L2T-DLN group's, SGD 0.1)")
HEADLINE_TITLE = (
    "## Headline\n\nEach method family at its recommended setting, on one student and "
    "schedule (the L2T-DLN group's: SGD 0.1, batch 25; robust losses at their papers' "
    "defaults; L2T-DLN warm-started, scale preserved, proper rule; L2T-DLF and l2t-gce "
    "teachers online every 50 steps). L2T-DLF's episodic teacher, its strongest setting "
    "on digits, has its own group below. The full sweep follows.")


def _table(title: str, columns: dict[str, str], rows: list[dict], usual: int) -> str | None:
    """A markdown table of the `rows` of the methods `columns` (header -> method): a line
    per (dataset, noise), a cell per method; None when none of them has results."""
    columns = {h: m for h, m in columns.items() if any(r["method"] == m for r in rows)}
    if not columns:
        return None
    group_rows = [r for r in rows if r["method"] in columns.values()]
    settings = list(dict.fromkeys((r["dataset"], r["noise"], r["student"])
                                  for r in group_rows))
    lines = [title, "",
             "| dataset | noise | student | " + " | ".join(columns) + " |",
             "|---" * (3 + len(columns)) + "|"]
    notes = []
    for dataset, noise, student in settings:
        cells = []
        for method in columns.values():
            match = [r for r in group_rows if (r["dataset"], r["noise"], r["method"]) ==
                     (dataset, noise, method)]
            cell = f"{match[0]['mean']:.2f} +- {match[0]['std']:.2f}" if match else ""
            for view in [k.removesuffix("_mean") for k in (match[0] if match else {})
                         if k.endswith("_mean")]:
                cell += f"; {view} {match[0][view + '_mean']:.2f} +- {match[0][view + '_std']:.2f}"
            if match and len(match[0]["seeds"]) != usual:
                cell += f" [{len(match[0]['seeds'])} seeds]"
            if match and match[0].get("overrides"):
                note = ", ".join(f"{k}={v}" for k, v in match[0]["overrides"].items())
                if note not in notes:
                    notes.append(note)
                cell += f" ({notes.index(note) + 1})"
            cells.append(cell)
        lines.append(f"| {dataset} | {noise} | {student} | " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines.extend(f"({i}) run with `--set={note}`" for i, note in enumerate(notes, 1))
    return "\n".join(lines)


def _moonshine_table(rows: list[dict], usual: int) -> str | None:
    """The Moonshine table: per (dataset, noise) and cheap block, the student's
    parameters and FLOPs, and its test error alone and with AT + KD."""
    cheap = [r for r in rows if r["method"].startswith("ms-")]
    if not cheap:
        return None
    lines = ["### Moonshine cheap-convolution students (configs/distill.py:<dataset>,"
             "moonshine: the target model's own architecture, every block's 3x3 "
             "convolutions swapped for the cheap block; conv is the target's own)", "",
             "| dataset | noise | target | block | params | M mult-adds | XLA MFLOPs | "
             "alone | AT + KD |", "|---" * 9 + "|"]

    def cell(record):
        if record is None:
            return ""
        text = f"{record['mean']:.2f} +- {record['std']:.2f}"
        seeds = len(record["seeds"])
        return text if seeds == usual else f"{text} [{seeds} seeds]"

    for dataset, noise in dict.fromkeys((r["dataset"], r["noise"]) for r in cheap):
        setting = {r["method"]: r for r in cheap if (r["dataset"], r["noise"]) == (dataset, noise)}
        for block in MOONSHINE_BLOCKS:
            alone, distilled = setting.get(f"ms-{block}"), setting.get(f"ms-{block}-at-kd")
            some = alone or distilled
            if some is None:
                continue
            lines.append(f"| {dataset} | {noise} | {some['target']} | {block} | "
                         f"{some['params']:,} | {some['macs_per_example'] / 1e6:.1f} | "
                         f"{some['flops_per_example'] / 1e6:.1f} | "
                         f"{cell(alone)} | {cell(distilled)} |")
    return "\n".join(lines)


def write_table(rows: list[dict], path: str) -> str:
    """Writes (and returns) markdown tables: the `HEADLINE` table, then one per `GROUPS`
    entry with results: a line per (dataset, noise), a column per method; a cell over
    fewer or more seeds than most says how many."""
    counts = [len(r["seeds"]) for r in rows]
    usual = max(set(counts), key=counts.count) if counts else 0
    headline = _table(HEADLINE_TITLE, {f"{label} ({method})": method
                                       for label, method in HEADLINE.items()}, rows, usual)
    sections = [_table(f"### {title}", {m: m for m in group}, rows, usual)
                for title, group in GROUPS.items()]
    sections.append(_moonshine_table(rows, usual))
    if headline is not None:
        sections.insert(0, headline + "\n\n## All results")
    header = (f"Test error (%), mean +- std (sample std) over {usual} seeds (other counts "
              "are marked in the cell), each at the step with the lowest dev error (never "
              "selected on test). "
              "Methods are defined in `launch/results.py` (`METHODS`); what the numbers "
              "mean: [l2t_dlf.md](l2t_dlf.md), [l2t_dln.md](l2t_dln.md) (with the cost of "
              "an L2T-DLN iteration), [robust.md](robust.md), [distillation.md](distillation.md), "
              "[one.md](one.md), "
              "populations: "
              "[population.md](population.md). "
              "Pictures: a bar per method, its seeds as dots, for each results file "
              "(`results/<dataset>_noise<rate>.png`) and the headline "
              "([results/headline.png](results/headline.png)). "
              "Regenerate with `python -m launch.results --workdir=DIR`; the tables and "
              "pictures alone, from the JSON files, with `--methods=`.\n\n")
    text = header + "\n\n".join(s for s in sections if s is not None) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def entry() -> None:
    """The ``l2t-results`` command (``python -m launch.results``)."""
    cli.run(main)


if __name__ == "__main__":
    entry()
