"""Checkpoints: exact round trips, and damage caught, moved aside and stepped over."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from l2t_jax import checkpoint
from l2t_jax.checkpoint import Checkpointer
from l2t_jax.errors import ConfigError

# When one array of a damaged checkpoint fails to read, orbax abandons the reads of the
# others, and Python reports their coroutines' exceptions as unraisable on collection.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def make_state(step):
    """A small state whose values differ from step to step."""
    rng = np.random.default_rng(step)
    return {
        # Incompressible and a few KiB: its data file is the largest in the checkpoint.
        "w": jnp.asarray(rng.normal(size=(40, 50)), jnp.float32),
        "opt": {"count": jnp.asarray(step, jnp.int32), "mu": jnp.full((3,), step, jnp.float32)},
    }


def make_records(step):
    return [{"step": s, "train/loss": 1.0 / s, "dev/error": float("nan")}
            for s in range(5, step + 1, 5)]


def save_steps(directory, steps=(10, 20)):
    checkpointer = Checkpointer(str(directory))
    for step in steps:
        checkpointer.save(step, make_state(step), make_records(step))
    checkpointer.close()


def restore(directory):
    checkpointer = Checkpointer(str(directory))
    try:
        return checkpointer.restore_or(jax.tree_util.tree_map(jnp.zeros_like, make_state(0)))
    finally:
        checkpointer.close()


def assert_state_equal(actual, expected):
    jax.tree_util.tree_map(np.testing.assert_array_equal, actual, expected)


def warnings_of(caplog):
    """The warnings l2t_jax logged (orbax logs its own on the way)."""
    return [r.getMessage() for r in caplog.records
            if r.levelname == "WARNING" and r.pathname == checkpoint.__file__]


def largest_data_file(step_dir):
    """The file holding the state's biggest array (OCDBT data files live under ``d/``)."""
    files = glob.glob(os.path.join(step_dir, checkpoint.STATE_ITEM, "**", "d", "*"),
                      recursive=True)
    return max(files, key=os.path.getsize)


def overwrite_middle(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(np.random.default_rng(0).bytes(64))


def truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def test_a_checkpoint_restores_its_state_step_and_records_exactly(tmp_path):
    state, step, records = restore(tmp_path / "none")
    assert (step, records) == (0, [])
    assert_state_equal(state, jax.tree_util.tree_map(jnp.zeros_like, make_state(0)))

    save_steps(tmp_path)
    state, step, records = restore(tmp_path)
    # As JSON: the records hold NaN, which equals nothing.
    assert step == 20 and json.dumps(records) == json.dumps(make_records(20))
    assert_state_equal(state, make_state(20))


@pytest.mark.parametrize("damage, reason", [
    # Orbax reads these bytes without complaint; only the digest tells.
    (lambda d: overwrite_middle(largest_data_file(d)), "differ from what was saved"),
    (lambda d: truncate(largest_data_file(d)), "does not restore"),
    (lambda d: os.remove(os.path.join(d, checkpoint.STATE_ITEM, "_METADATA")),
     "metadata is missing"),
    (lambda d: os.remove(os.path.join(d, checkpoint.RECORDS_ITEM, "metadata")),
     "does not restore"),
    (lambda d: os.rename(os.path.join(d, checkpoint.RECORDS_ITEM), d + "_records"),
     "does not restore"),
], ids=["random-bytes", "truncated-data", "no-state-metadata", "no-records", "no-records-item"])
def test_a_damaged_checkpoint_is_moved_aside_and_the_previous_one_restores(
        tmp_path, caplog, damage, reason):
    directory = tmp_path / "checkpoints"
    save_steps(directory)
    damage(str(directory / "20"))
    state, step, records = restore(directory)
    assert step == 10 and json.dumps(records) == json.dumps(make_records(10))
    assert_state_equal(state, make_state(10))
    [warning] = warnings_of(caplog)
    assert "step 20" in warning and reason in warning and "\n" not in warning
    # Kept for a person to look at, out of orbax's sight.
    assert not (directory / "20").exists()
    assert (tmp_path / checkpoint.DAMAGED_DIR / "20").is_dir()
    assert Checkpointer(str(directory)).latest_step() == 10


def test_edited_records_are_damage_too(tmp_path, caplog):
    path = tmp_path / "20" / checkpoint.RECORDS_ITEM / "metadata"
    save_steps(tmp_path)
    payload = json.loads(path.read_text())
    payload["records"][0]["train/loss"] = 0.0
    path.write_text(json.dumps(payload))
    _, step, _ = restore(tmp_path)
    assert step == 10 and "differ from what was saved" in warnings_of(caplog)[0]


def test_a_lost_step_metadata_file_does_not_matter_when_the_contents_verify(tmp_path, caplog):
    save_steps(tmp_path)
    os.remove(tmp_path / "20" / "_CHECKPOINT_METADATA")
    state, step, _ = restore(tmp_path)
    assert step == 20 and not warnings_of(caplog)
    assert_state_equal(state, make_state(20))


def test_no_intact_checkpoint_stops_with_one_line(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    save_steps(directory)
    for step in ("10", "20"):
        overwrite_middle(largest_data_file(str(directory / step)))
    with pytest.raises(ConfigError, match="no intact checkpoint") as error:
        restore(directory)
    assert "\n" not in str(error.value) and "--workdir" in str(error.value)
    assert len(warnings_of(caplog)) == 2
    assert sorted(os.listdir(tmp_path / checkpoint.DAMAGED_DIR)) == ["10", "20"]


def test_the_same_step_damaged_twice_is_kept_twice(tmp_path):
    directory = tmp_path / "checkpoints"
    save_steps(directory)
    for _ in range(2):
        truncate(largest_data_file(str(directory / "20")))
        assert restore(directory)[1] == 10
        save_steps(directory, steps=(20,))
    assert sorted(os.listdir(tmp_path / checkpoint.DAMAGED_DIR)) == ["20", "20.1"]


@pytest.mark.parametrize("change", [
    lambda s: {**s, "extra": jnp.zeros(2)},
    lambda s: {"w": s["w"]},
    lambda s: {**s, "w": jnp.zeros((40, 51))},
    lambda s: {**s, "w": s["w"].astype(jnp.bfloat16)},
], ids=["extra-leaf", "missing-leaves", "other-shape", "other-dtype"])
def test_a_checkpoint_of_another_layout_is_not_taken_for_damage(tmp_path, caplog, change):
    save_steps(tmp_path)
    checkpointer = Checkpointer(str(tmp_path))
    with pytest.raises(ConfigError, match="holds a state of another layout") as error:
        checkpointer.restore_or(change(make_state(0)))
    checkpointer.close()
    assert "\n" not in str(error.value) and "step 20" in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["10", "20"] and not warnings_of(caplog)


def test_a_checkpoint_written_before_records_restores_unverified(tmp_path, caplog):
    # What the single-item code wrote: orbax's unnamed item, stored as "default".
    manager = ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(
        max_to_keep=2, create=True))
    manager.save(10, args=ocp.args.StandardSave(make_state(10)))
    manager.wait_until_finished()
    manager.close()
    assert sorted(os.listdir(tmp_path / "10")) == [
        "_CHECKPOINT_METADATA", "commit_success.txt", checkpoint.STATE_ITEM]

    state, step, records = restore(tmp_path)
    assert (step, records) == (10, None)
    assert_state_equal(state, make_state(10))
    [warning] = warnings_of(caplog)
    assert "step 10" in warning and "unverified" in warning

    # The run goes on in the new layout, in the same directory.
    save_steps(tmp_path, steps=(20,))
    state, step, records = restore(tmp_path)
    assert step == 20 and json.dumps(records) == json.dumps(make_records(20))
