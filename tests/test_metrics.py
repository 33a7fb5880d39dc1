"""metrics.jsonl: whole-line appends, repaired on resume, read past torn lines."""

import json

import pytest

from l2t_jax import metrics


def records_to(step):
    return [{"step": s, "train/loss": 1.0 / s} for s in range(1, step + 1)]


def lines_of(records):
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelname == "WARNING" and r.pathname == metrics.__file__]


def test_writes_are_whole_lines_and_kept_in_memory(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write(1, {"train/loss": 1})
    writer.write(2, {"train/loss": 0.5})
    writer.close()
    assert writer.records == records_to(2)
    assert (tmp_path / metrics.METRICS_FILE).read_bytes() == lines_of(records_to(2))
    assert any((tmp_path / "tensorboard").iterdir())


def test_a_resume_drops_the_records_after_the_checkpoint_silently(tmp_path, caplog):
    # What a killed run leaves: records past its last checkpoint, to be recomputed.
    (tmp_path / metrics.METRICS_FILE).write_bytes(lines_of(records_to(5)))
    writer = metrics.MetricWriter(str(tmp_path), resume_step=3, records=records_to(3))
    writer.write(4, {"train/loss": 0.25})
    writer.close()
    assert writer.records == records_to(4)
    assert metrics.read_metrics(str(tmp_path)) == records_to(4)
    assert not warnings_of(caplog)


@pytest.mark.parametrize("on_disk, problem", [
    (lines_of(records_to(5)) + b'{"step": 6, "train/lo', "unreadable line(s) 6"),
    # Bytes that are not even UTF-8.
    (lines_of(records_to(1)) + b"\x00\xff garbage\n" + lines_of(records_to(5)[1:]),
     "unreadable line(s) 2"),
    (lines_of(records_to(3)[:1] + records_to(5)[2:]), "differed from the checkpoint's"),
    (None, "it was missing"),
], ids=["torn-last-line", "garbage-line", "lost-record", "deleted-file"])
def test_a_resume_rewrites_a_damaged_file_from_the_checkpoint(tmp_path, caplog, on_disk, problem):
    path = tmp_path / metrics.METRICS_FILE
    if on_disk is not None:
        path.write_bytes(on_disk)
    writer = metrics.MetricWriter(str(tmp_path), resume_step=3, records=records_to(3))
    writer.close()
    assert path.read_bytes() == lines_of(records_to(3))
    assert writer.records == records_to(3)
    [warning] = warnings_of(caplog)
    assert problem in warning and "step 3" in warning and "\n" not in warning
    assert not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_without_records_resumes_from_the_file(tmp_path, caplog):
    (tmp_path / metrics.METRICS_FILE).write_bytes(lines_of(records_to(5)) + b'{"ste')
    writer = metrics.MetricWriter(str(tmp_path), resume_step=3, records=None)
    writer.close()
    assert writer.records == records_to(3) == metrics.read_metrics(str(tmp_path))
    [warning] = warnings_of(caplog)
    assert "unreadable line(s) 6" in warning


def test_read_metrics_skips_torn_and_garbage_lines_with_one_warning(tmp_path, caplog):
    (tmp_path / metrics.METRICS_FILE).write_bytes(
        lines_of(records_to(2)) + b"[1, 2]\nnot json\n" + lines_of(records_to(4)[2:]) + b'{"st')
    assert metrics.read_metrics(str(tmp_path)) == records_to(4)
    assert metrics.read_metrics(str(tmp_path), max_step=3) == records_to(3)
    warning = warnings_of(caplog)[0]
    assert metrics.METRICS_FILE in warning and "3, 4, 7" in warning
    assert len(warnings_of(caplog)) == 2  # once per read


def test_read_metrics_of_a_run_without_metrics_is_empty(tmp_path):
    assert metrics.read_metrics(str(tmp_path)) == []
