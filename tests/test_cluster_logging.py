"""`dipid predict --workers N` shows Dask's own log lines only from WARNING up, unless --verbose."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("distributed", reason="dask.distributed is a dev dependency")  # installed by .[dev]

from dipid.cluster import DASK_LOGGERS, dask_log_level, run_on_dask  # noqa: E402
from dipid.pipeline import process_scan  # noqa: E402


def _dask_info_records(caplog) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records
            if r.name.split(".")[0] in DASK_LOGGERS and r.levelno < logging.WARNING]


def test_dask_info_lines_hidden_by_default_and_shown_at_info(tmp_path, caplog, capfd):
    before = [logging.getLogger(n).level for n in DASK_LOGGERS]
    assert dask_log_level() == logging.WARNING  # dipid's loggers as `dipid predict` without --verbose leaves them
    assert run_on_dask(process_scan, [], tmp_path, None, failed=print, workers=1, progress=False) == []
    assert _dask_info_records(caplog) == []
    assert " - INFO - " not in capfd.readouterr().err  # nothing from the worker process either
    assert [logging.getLogger(n).level for n in DASK_LOGGERS] == before  # levels restored

    caplog.clear()
    assert run_on_dask(process_scan, [], tmp_path, None, failed=print, workers=1, progress=False, log_level=logging.INFO) == []
    shown = _dask_info_records(caplog)
    assert any(line.startswith("distributed.scheduler") for line in shown), shown
    assert " - INFO - " in capfd.readouterr().err  # the worker process logs at INFO too
    assert [logging.getLogger(n).level for n in DASK_LOGGERS] == before


def test_verbose_means_info(caplog):
    caplog.set_level(logging.DEBUG, logger="dipid")
    assert dask_log_level() == logging.INFO
