"""opd.run.metrics_log: JSONL rows, non-finite values, resume truncation, TensorBoard, tqdm."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from opd.run.metrics_log import MetricLogger, read_metrics


def test_jsonl_rows(tmp_path):
    with MetricLogger(tmp_path / "run", progress=False) as log:
        log.log(1, {"loss/rkl": 0.5, "teacher/entropy": torch.tensor(1.25)})
        log.log(2, {"loss/rkl": np.float32(0.25), "rollout/length": 7})
        # flushed per line: readable before close
        assert len(read_metrics(tmp_path / "run")) == 2
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss/rkl"] == 0.5 and rows[0]["teacher/entropy"] == 1.25
    assert rows[1]["loss/rkl"] == 0.25 and rows[1]["rollout/length"] == 7.0
    assert all(isinstance(r["time"], float) for r in rows)
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == rows


def test_values_are_floats(tmp_path):
    with MetricLogger(tmp_path, progress=False) as log:
        log.log(0, {"a": torch.tensor(3, dtype=torch.long), "b": True, "c": np.int64(2)})
    row = read_metrics(tmp_path)[0]
    assert all(type(row[k]) is float for k in "abc")


def test_non_finite_written_as_null(tmp_path):
    with MetricLogger(tmp_path, progress=False) as log:
        log.log(0, {"nan": float("nan"), "inf": torch.tensor(float("inf")), "ok": 1.0})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    row = json.loads(line)
    assert row["nan"] is None and row["inf"] is None and row["ok"] == 1.0


def test_bad_metrics_rejected(tmp_path):
    with MetricLogger(tmp_path, progress=False) as log:
        with pytest.raises(TypeError, match="'x'"):
            log.log(0, {"x": "text"})
        with pytest.raises(TypeError, match="'v'.*scalar"):
            log.log(0, {"v": torch.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            log.log(0, {"step": 1.0})
    with pytest.raises(ValueError, match="after close"):
        log.log(1, {"a": 1.0})
    log.close()  # idempotent


def test_appends_across_loggers(tmp_path):
    for step in (1, 2):
        with MetricLogger(tmp_path, progress=False) as log:
            log.log(step, {"a": float(step)})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_resume_truncates_later_rows(tmp_path):
    with MetricLogger(tmp_path, progress=False) as log:
        for step in range(1, 11):
            log.log(step, {"loss": float(step)})
    before = (tmp_path / "metrics.jsonl").read_text().splitlines()
    with MetricLogger(tmp_path, progress=False, resume_step=6) as log:
        assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 7))
        log.log(7, {"loss": 70.0})
    after = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert after[:6] == before[:6]  # earlier rows byte-for-byte intact
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 8)) and rows[-1]["loss"] == 70.0


def test_resume_without_file_and_beyond_end(tmp_path):
    with MetricLogger(tmp_path / "new", progress=False, resume_step=5) as log:
        log.log(6, {"a": 1.0})
    assert len(read_metrics(tmp_path / "new")) == 1
    with MetricLogger(tmp_path / "new", progress=False, resume_step=100):
        pass
    assert len(read_metrics(tmp_path / "new")) == 1


def test_partial_last_line_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "time": 0.0, "a": 1.0}\n{"step": 2, "ti')  # crash mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    with MetricLogger(tmp_path, progress=False) as log:
        log.log(2, {"a": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_corrupt_middle_line_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('garbage\n{"step": 1}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_metrics(tmp_path)


def test_read_metrics_missing(tmp_path):
    assert read_metrics(tmp_path / "nothing") == []


def test_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricLogger(tmp_path, tensorboard=True, progress=False) as log:
        log.log(1, {"loss/rkl": 0.5, "bad": float("nan")})
    assert list(tmp_path.glob("events.out.tfevents*"))
    assert len(read_metrics(tmp_path)) == 1


def test_tensorboard_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install tensorboard.*opd\[tensorboard\]"):
        MetricLogger(tmp_path, tensorboard=True, progress=False)


def test_progress_bar(tmp_path, capsys):
    with MetricLogger(
        tmp_path, progress_total=10, progress_keys=["loss/rkl", "missing"], resume_step=2
    ) as log:
        assert log._bar.n == 2 and log._bar.total == 10
        log.log(3, {"loss/rkl": 0.123456, "other": 1.0})
        log.log(5, {"other": 2.0})
        assert log._bar.n == 5
        assert "loss/rkl=0.123" in log._bar.postfix  # kept from the earlier step
        assert "other" not in log._bar.postfix and "missing" not in log._bar.postfix
    assert math.isclose(read_metrics(tmp_path)[0]["loss/rkl"], 0.123456)


def test_progress_disabled_prints_nothing(tmp_path, capsys):
    with MetricLogger(tmp_path, progress=False, progress_keys=["a"]) as log:
        log.log(1, {"a": 1.0})
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
