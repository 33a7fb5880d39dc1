"""The project installs as a package (pyproject.toml) whose commands run from anywhere.

A copy of the working tree is installed once with ``pip install --no-deps
--no-build-isolation --no-index --target`` (offline: the dependencies are this venv's;
a copy, so that the build writes nothing into the tree); the installed commands then run
from another directory with only the installed copy on ``PYTHONPATH``.
"""

import os
import shutil
import subprocess
import sys

import pytest

import configs
from launch import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("l2t-train", "l2t-results", "l2t-plot", "l2t-methods", "l2t-flower")
# Not part of a source tree: environments, build outputs, runs.
_NOT_SOURCE = {".git", ".venv", "venv", "build", "dist", ".pytest_cache"}


def _not_source(directory: str, names: list[str]) -> set[str]:
    ignored = {"__pycache__"} & set(names)
    if os.path.samefile(directory, REPO):
        ignored |= {n for n in names if n in _NOT_SOURCE or n.endswith(".egg-info")
                    or n.startswith("workdir")}
    return ignored


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(site, elsewhere, env)``: the install target, a directory to run in, and an
    environment whose path has the installed packages, not the repository."""
    root = tmp_path_factory.mktemp("package")
    source, site, elsewhere = root / "source", root / "site", root / "elsewhere"
    shutil.copytree(REPO, source, ignore=_not_source)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", "--disable-pip-version-check",
         "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    elsewhere.mkdir()
    return str(site), str(elsewhere), {**os.environ, "PYTHONPATH": str(site)}


def _run(installed, *args: str) -> subprocess.CompletedProcess:
    _, elsewhere, env = installed
    return subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_packages_import_from_the_install(installed):
    site = installed[0]
    done = _run(installed, sys.executable, "-c",
                "import configs, l2t_jax, l2t_jax.students, launch\n"
                "for m in (configs, l2t_jax, l2t_jax.students, launch): print(m.__file__)")
    assert done.returncode == 0, done.stderr
    files = done.stdout.split()
    assert len(files) == 4
    assert all(f.startswith(site + os.sep) for f in files), files
    assert os.path.isfile(os.path.join(site, "configs", "l2t_dlf.py"))
    assert not os.path.exists(os.path.join(site, "tests"))
    assert not os.path.exists(os.path.join(site, "benchmarks"))
    with open(os.path.join(site, "l2t_jax-0.1.0.dist-info", "METADATA")) as f:
        metadata = f.read()
    for field in ("Name: l2t-jax", "Version: 0.1.0", "Requires-Dist: jax", "Provides-Extra: bench"):
        assert field in metadata, field


def test_each_command_is_installed(installed):
    for command in COMMANDS:
        assert os.access(os.path.join(installed[0], "bin", command), os.X_OK), command


def test_help_lists_the_launchers_flags_and_exits_0(installed):
    done = _run(installed, os.path.join(installed[0], "bin", "l2t-train"), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Trains as a config says")
    assert "--config:" in done.stdout and "--workdir:" in done.stdout


def test_methods_lists_the_registered_methods(installed):
    done = _run(installed, os.path.join(installed[0], "bin", "l2t-methods"))
    assert done.returncode == 0, done.stderr
    names = {line.split()[0] for line in done.stdout.splitlines()[1:]}
    assert {"ce", "l2t-dlf", "l2t-dln", "kd", "one"} <= names


def test_config_paths_resolve_from_any_directory(installed):
    # The file is found in the installed package: it loads, and the override that names
    # no field is what stops the run (exit 2, one line, nothing written).
    workdir = os.path.join(installed[1], "run")
    done = _run(installed, os.path.join(installed[0], "bin", "l2t-train"),
                "--config=configs/ce_baseline.py:digits,smoke", "--config.train.nope=1",
                f"--workdir={workdir}")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: --config.train.nope: config.train has no field "
                                  "'nope'") and done.stderr.count("\n") == 1, done.stderr
    assert not os.path.exists(workdir)


def test_resolve_config_args(tmp_path, monkeypatch):
    installed = os.path.join(os.path.dirname(configs.__file__), "l2t_dlf.py")
    monkeypatch.chdir(tmp_path)
    argv = ["prog", "--config=configs/l2t_dlf.py:digits,smoke", "--config.seed=1",
            "-config", "./configs/l2t_dlf.py", "--config=configs/nope.py", "--workdir=w"]
    assert cli.resolve_config_args(argv) == [
        "prog", f"--config={installed}:digits,smoke", "--config.seed=1",
        "-config", installed, "--config=configs/nope.py", "--workdir=w"]
    # A file under the current directory is the one meant.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "l2t_dlf.py").write_text("")
    assert cli.resolve_config_args(argv[:2]) == argv[:2]


def test_a_config_file_found_nowhere_is_reported_as_given(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.parse_flags(["prog", "--config=configs/nope.py:digits"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(
        "error: --config: no config file 'configs/nope.py'")
