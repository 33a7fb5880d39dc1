"""Multi-host runs for real: the launcher as 2 processes on localhost, 4 CPU devices each.

The same code path as a GPU or TPU cluster (`jax.distributed.initialize`, CPU collectives
through gloo), minus the interconnect: each process builds only its share of every batch,
the mesh spans the 8 devices of both, process 0 writes the run's files and both write the
orbax checkpoints. Each run is compared with the same config in this (single) process on
its 8 fake devices, to float tolerance (the sums are ordered differently across
processes).
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import l2t_dlf, l2t_dln
from l2t_jax import data, metrics, train
from l2t_jax.methods import dlf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = 2
HEARTBEAT = 10  # seconds: how soon a lost process stops the other
# Float tolerance between one process and two: gloo sums in another order.
RTOL, ATOL = 1e-4, 1e-5

# L2T-DLF: 2 students per episode, every batch of 64 split over the 8 devices of both
# processes (each process feeds half of every batch).
DLF_CONFIG = "configs/l2t_dlf.py:digits,noisy,smoke"
DLF_OVERRIDES = {"teacher.population_size": 2, "mesh.population": 1, "mesh.data": -1}
# L2T-DLN: a population of 8 students, one per device (each process trains 4). The
# student's learning rate is lowered from the digits recipe's 1.0, at which the unrolled
# training amplifies the order of the cross-process sums past float tolerance in a few
# steps (measured: 1e-7 at step 5, 4e-4 at step 10).
DLN_CONFIG = "configs/l2t_dln.py:digits,noisy,smoke"
DLN_OVERRIDES = {"dln.population_size": 8, "mesh.population": -1,
                 "optimizer.learning_rate": 0.1, "train.checkpoint_every": 5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Launch:
    """The launcher's multi-host command, once per process, as a user would run it."""

    def __init__(self, config: str, overrides: dict, workdir, logs):
        port = free_port()
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=4")
        flags = [f"--config.{k}={v}" for k, v in overrides.items()]
        self.logs = [logs / f"process{i}.log" for i in range(PROCESSES)]
        self.processes = []
        for i, log in enumerate(self.logs):
            command = [sys.executable, "-m", "launch.train", f"--config={config}", *flags,
                       f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
                       f"--num_processes={PROCESSES}", f"--process_id={i}",
                       f"--heartbeat_timeout={HEARTBEAT}"]
            with open(log, "w") as f:
                self.processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=f,
                                                       stderr=subprocess.STDOUT))

    def log(self, i: int) -> str:
        return self.logs[i].read_text()

    def wait(self, timeout: float = 300) -> None:
        for i, process in enumerate(self.processes):
            assert process.wait(timeout) == 0, self.log(i)[-3000:]

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def launch(tmp_path):
    """Starts multi-host launches; whatever a failing test left running is killed."""
    launches = []

    def start(config, overrides, name):
        (tmp_path / name).mkdir()
        launches.append(Launch(config, overrides, tmp_path / "run", tmp_path / name))
        return launches[-1]

    yield start
    for started in launches:
        started.kill()


def reference_run(module, config_arg: str, overrides: dict, workdir):
    """The same config in this process, on its 8 devices."""
    config = module.get_config(config_arg)
    for path, value in overrides.items():
        section, field = path.split(".")
        config[section][field] = value
    train.train_and_evaluate(config, str(workdir))
    return config


def assert_same_metrics(workdir, reference) -> None:
    ours, theirs = metrics.read_metrics(str(workdir)), metrics.read_metrics(str(reference))
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for mine, other in zip(ours, theirs):
        assert mine.keys() == other.keys()
        np.testing.assert_allclose([mine[k] for k in mine], [other[k] for k in mine],
                                   rtol=RTOL, atol=ATOL, err_msg=f"step {mine['step']}")


def assert_same_state(config, workdir, reference) -> None:
    """The two-process checkpoint restores in this one process, to the reference state."""
    splits = data.load_splits(config.data)
    _, restored = train.restore_final_state(config, str(workdir), splits)
    _, expected = train.restore_final_state(config, str(reference), splits)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float64),
                                                np.asarray(b, np.float64), RTOL, ATOL),
        restored, expected)


def host_share(i: int, members: tuple[int, int], population: int, examples: tuple[int, int],
               batch: int) -> str:
    """What process `i` logs about the part of the population and batches it builds."""
    return (f"process {i} of {PROCESSES}: population members [{members[0]}, {members[1]}) "
            f"of {population}, examples [{examples[0]}, {examples[1]}) of each batch "
            f"of {batch}")


def test_two_processes_train_l2t_dlf_as_one_each_feeding_half_of_every_batch(tmp_path,
                                                                             launch):
    run = launch(DLF_CONFIG, DLF_OVERRIDES, "logs")
    config = reference_run(l2t_dlf, "digits,noisy,smoke", DLF_OVERRIDES, tmp_path / "one")
    run.wait()
    batch, half = config.train.batch_size, config.train.batch_size // PROCESSES
    for i in range(PROCESSES):
        assert host_share(i, (0, 2), 2, (i * half, (i + 1) * half), batch) in run.log(i)
    for phase in (dlf.TEACHER_DIR, ""):
        assert_same_metrics(tmp_path / "run" / phase, tmp_path / "one" / phase)
    # Process 0 wrote the run's files, all of them.
    assert sorted(os.listdir(tmp_path / "run")) == sorted(os.listdir(tmp_path / "one"))
    assert_same_state(config, tmp_path / "run", tmp_path / "one")


def test_a_lost_process_stops_the_other_and_both_resume_to_the_same_l2t_dln_run(tmp_path,
                                                                                launch):
    workdir = tmp_path / "run"
    run = launch(DLN_CONFIG, DLN_OVERRIDES, "first")
    first_checkpoint = workdir / train.CHECKPOINT_DIR / "5"
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists():
        assert time.monotonic() < deadline and run.processes[0].poll() is None, run.log(0)
        time.sleep(0.05)
    run.processes[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert run.processes[0].wait(timeout=HEARTBEAT + 60) != 0, run.log(0)[-3000:]
    assert time.monotonic() - killed < HEARTBEAT + 60
    # JAX's words when the heartbeat stops, or ours when a collective fails first.
    assert ("another task died" in run.log(0)
            or "another process of this multi-host run" in run.log(0)), run.log(0)[-3000:]
    assert not (workdir / "summary.json").exists()  # stopped mid-run

    run = launch(DLN_CONFIG, DLN_OVERRIDES, "rerun")
    config = reference_run(l2t_dln, "digits,noisy,smoke", DLN_OVERRIDES, tmp_path / "one")
    run.wait()
    for i in range(PROCESSES):
        assert "resumed" in run.log(i), run.log(i)[-3000:]
        assert host_share(i, (4 * i, 4 * i + 4), 8, (0, 25), 25) in run.log(i)
    assert_same_metrics(workdir, tmp_path / "one")
    assert_same_state(config, workdir, tmp_path / "one")
