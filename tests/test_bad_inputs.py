"""Every launcher answers bad input with one line on stderr and exit code 2, writing nothing.

Each launcher runs its whole table in one process (`launcher_cases.py`: the real flag
parsing and `main`, once per command line); two command lines also run as real
processes, through ``absl.app.run``.
"""

import errno
import json
import os
import subprocess
import sys

import pytest

from configs import ce_baseline
from l2t_jax import train
from l2t_jax.errors import ConfigError, DivergenceError
from launch import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CE = "--config=configs/ce_baseline.py:digits,smoke"
DLF = "--config=configs/l2t_dlf.py:digits,smoke"
DLN = "--config=configs/l2t_dln.py:digits,smoke"
RESULTS = ["--workdir={new}", "--out={out}", "--datasets=digits", "--methods=ce,l2t-dlf",
           "--seeds=1"]

# (launcher, command line, what the one line must name). {run}: a finished CE smoke run
# (its files must stay byte for byte as they are); {new}: a path that must stay absent;
# {file}: a plain file; {empty}: an empty directory; {alien}: a run of an unknown method.
CASES = [
    # Config files, variants and overrides that do not exist.
    ("train", ["--config=configs/nope.py", "--workdir={new}"], "configs/nope.py"),
    ("train", ["--config=configs/ce_baseline.py:digits,nope", "--workdir={new}"], "nope"),
    ("train", ["--config=configs/ce_baseline.py:digits,mnist1d", "--workdir={new}"],
     "one dataset variant"),
    ("train", [CE, "--config.train.nope=1", "--workdir={new}"], "config.train"),
    ("train", [CE, "--config.train.num_stesp=3", "--workdir={new}"], "num_steps"),
    ("train", [CE, "--config.teacher.learning_rate=1", "--workdir={new}"], "teacher"),
    ("train", [CE, "--config.nope=1", "--workdir={new}"], "nope"),
    # Values of the wrong type or out of range.
    ("train", [CE, "--config.train.num_steps=abc", "--workdir={new}"], "num_steps"),
    ("train", [CE, "--config.train.num_steps=1.5", "--workdir={new}"], "num_steps"),
    ("train", [CE, "--config.train.num_steps=0", "--workdir={new}"], "num_steps"),
    ("train", [CE, "--config.train.batch_size=0", "--workdir={new}"], "batch_size"),
    ("train", [CE, "--config.train.batch_size=100000", "--workdir={new}"], "batch_size"),
    ("train", [CE, "--config.train.eval_batch_size=-1", "--workdir={new}"], "eval_batch_size"),
    ("train", [CE, "--config.train.eval_batch_size=0", "--workdir={new}"], "eval_batch_size"),
    ("train", [CE, "--config.train.log_every=7", "--workdir={new}"], "log_every"),
    ("train", [CE, "--config.train.max_cross_entropy=0", "--workdir={new}"],
     "max_cross_entropy"),
    ("train", [CE, "--config.seed=-1", "--workdir={new}"], "seed"),
    ("train", [CE, "--config.method=nope", "--workdir={new}"], "config.method"),
    ("train", [CE, "--config.optimizer.learning_rate=-0.1", "--workdir={new}"],
     "learning_rate"),
    ("train", [CE, "--config.optimizer.name=adamx", "--workdir={new}"], "optimizer.name"),
    ("train", [CE, "--config.optimizer.decay_factor=-1", "--workdir={new}"], "decay_factor"),
    ("train", [CE, "--config.data.name=nope", "--workdir={new}"], "data.name"),
    ("train", [CE, "--config.data.noise_rate=1.5", "--workdir={new}"], "noise_rate"),
    ("train", [CE, "--config.data.noise_type=weird", "--workdir={new}"], "noise_type"),
    ("train", [CE, "--config.student.name=nope", "--workdir={new}"], "student.name"),
    ("train", [CE, "--config.student.hidden=(0,)", "--workdir={new}"], "hidden"),
    ("train", [CE, "--config.engine.remat=nope", "--workdir={new}"], "remat"),
    ("train", [DLF, "--config.teacher.feature_dev_size=0", "--workdir={new}"],
     "feature_dev_size"),
    ("train", [DLF, "--config.teacher.sharpness=-50", "--workdir={new}"], "sharpness"),
    ("train", [DLF, "--config.teacher.hidden=0", "--workdir={new}"], "teacher.hidden"),
    ("train", [DLF, "--config.teacher.on_nonfinite=ignore", "--workdir={new}"],
     "on_nonfinite"),
    ("train", [DLN, "--config.dln.val_batch_size=100000", "--workdir={new}"],
     "dln.val_batch_size"),
    ("train", [DLN, "--config.dln.learning_rate=-1", "--workdir={new}"], "dln.learning_rate"),
    # Workdirs: a file, and a finished run of another config.
    ("train", [CE, "--workdir={file}"], "is a file"),
    ("train", [CE, "--config.optimizer.learning_rate=0.5", "--workdir={run}"],
     "config.optimizer.learning_rate"),
    ("train", [CE, "--config.seed=1", "--workdir={run}"], "config.seed"),
    ("train", [DLF, "--workdir={run}"], "config.method"),
    ("train", ["--config=configs/ce_baseline.py:mnist1d,smoke", "--workdir={run}"],
     "config.data.name"),
    # Flags of the launcher itself.
    ("train", [CE, "--workdir={new}", "extra"], "unexpected arguments"),
    ("train", [CE], "workdir"),
    ("train", [CE, "--workdir={new}", "--num_processes=2"], "--coordinator_address"),
    ("train", [CE, "--workdir={new}", "--nope=1"], "nope"),
    # The plot launcher.
    ("plot", ["--workdir={new}"], "not a directory"),
    ("plot", ["--workdir={empty}"], "config.json"),
    ("plot", ["--workdir={alien}"], "config.method"),
    ("plot", [], "workdir"),
    # The results launcher.
    ("results", [*RESULTS, "--datasets=nope"], "--datasets=nope"),
    ("results", [*RESULTS, "--noise=abc"], "--noise"),
    ("results", [*RESULTS, "--noise=1.0"], "--noise"),
    ("results", [*RESULTS, "--seeds=0"], "--seeds"),
    ("results", [*RESULTS, "--methods=nope"], "nope"),
    ("results", [*RESULTS, "--set=train.num_step=20"], "train.num_step"),
    ("results", [*RESULTS, "--set=teacher.teach_online=yes"], "teacher.teach_online"),
    ("results", [*RESULTS, "--set=train.num_steps=abc"], "train.num_steps"),
    ("results", [*RESULTS, "--set=train.num_steps=-5"], "num_steps"),
    ("results", [*RESULTS, "--set=episodes=3"], "section.field=value"),
    # The Flower launcher.
    ("flower", ["--config=configs/federated.py:digits,smoke", "--config.method=ce",
                "--workdir={new}"], "does not run on Flower"),
    ("flower", ["--config=configs/federated.py:digits,smoke",
                "--config.federated.clients_per_round=9", "--workdir={new}"],
     "clients_per_round"),
]
LAUNCHERS = {"train": "launch.train", "plot": "launch.plot", "results": "launch.results",
             "flower": "launch.flower"}


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """The paths the table's placeholders stand for."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    train.train_and_evaluate(ce_baseline.get_config("digits,smoke"), str(run))
    (root / "file").write_text("not a directory\n")
    (root / "empty").mkdir()
    (root / "alien").mkdir()
    (root / "alien" / "config.json").write_text(json.dumps({"method": "nope"}))
    (root / "alien" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
    return {"run": str(run), "file": str(root / "file"), "empty": str(root / "empty"),
            "alien": str(root / "alien"), "root": str(root)}


def _fill(args, places, index):
    fresh = {"new": os.path.join(places["root"], f"new{index}"),
             "out": os.path.join(places["root"], f"out{index}")}
    return [a.format(**places, **fresh) for a in args], [
        fresh["new"], fresh["out"], places["run"], places["file"], places["empty"],
        places["alien"]]


@pytest.fixture(scope="module")
def outcomes(places):
    """Each case's exit code, stderr and the watched paths it changed, by index."""
    results = {}
    for launcher, module in LAUNCHERS.items():
        indices = [i for i, case in enumerate(CASES) if case[0] == launcher]
        cases = []
        for i in indices:
            args, watch = _fill(CASES[i][1], places, i)
            cases.append({"args": args, "watch": watch})
        cases_path = os.path.join(places["root"], f"{launcher}_cases.json")
        results_path = os.path.join(places["root"], f"{launcher}_results.json")
        with open(cases_path, "w") as f:
            json.dump(cases, f)
        subprocess.run([sys.executable, os.path.join(REPO, "tests", "launcher_cases.py"),
                        module, cases_path, results_path], cwd=REPO, check=True,
                       timeout=600)
        with open(results_path) as f:
            results.update(zip(indices, json.load(f)))
    return results


def test_the_table_is_long_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_bad_input_is_one_line_with_exit_code_2_and_writes_nothing(index, outcomes):
    launcher, _, field = CASES[index]
    outcome = outcomes[index]
    lines = outcome["stderr"].strip().splitlines()
    assert outcome["code"] == 2, outcome["stderr"]
    assert 1 <= len(lines) <= 2, outcome["stderr"]
    assert field in lines[-1]
    assert "defined twice" not in lines[-1]  # the harness's own failure, not the launcher's
    assert outcome["changed"] == []


@pytest.mark.parametrize("launcher,args", [
    ("launch.train", [CE, "--config.train.nope=1", "--workdir=/nonexistent/w"]),
    ("launch.results", ["--workdir=/nonexistent/w", "--noise=abc"]),
])
def test_a_real_process_prints_one_line_and_exits_2(launcher, args):
    done = subprocess.run([sys.executable, "-m", launcher, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: ")


@pytest.mark.parametrize("error, code, line", [
    (ConfigError("config.seed must be >= 0,\ngot -1"), 2, "config.seed must be >= 0, got -1"),
    (DivergenceError("diverged at step 10: train/loss is inf"), 1,
     "diverged at step 10: train/loss is inf"),
    (OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints"), 1,
     "cannot write: /w/checkpoints: No space left on device"),
])
def test_a_failed_run_ends_with_one_line_and_its_exit_code(error, code, line, capsys):
    def main(argv):
        del argv
        raise error

    with pytest.raises(SystemExit) as exit_:
        cli.guarded(main)(["launch.train"])
    assert exit_.value.code == code
    assert capsys.readouterr().err == f"error: {line}\n"
