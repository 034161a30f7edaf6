"""Many scans on a Dask cluster: a LocalCluster by default, or any scheduler address.

Each scan is one task running the caller's per-scan function (the pipeline passes
:func:`dipid.pipeline.process_scan`) on a worker, which loads the predictor once per process and
writes the scan's results itself; only the small summary comes back. This module knows nothing
of the pipeline: it is handed the function, so the dependency points one way (pipeline -> cluster). Beamline HPC users start a cluster with dask-jobqueue on SLURM and pass its address
(see the README's recipe).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dipid.errors import DipidError

logger = logging.getLogger(__name__)

__all__ = ["run_on_dask"]

Summary = TypeVar("Summary")

#: Loggers of Dask itself: their INFO lines (scheduler and nanny start-up, every connection) are
#: noise to a dipid user, so they are shown from WARNING up unless dipid logs at DEBUG (``--verbose``).
DASK_LOGGERS = ("distributed", "dask")


def dask_log_level() -> int:
    """The level Dask's loggers should use: INFO when dipid logs debug messages (``dipid -v``), else WARNING."""
    return logging.INFO if logging.getLogger("dipid").isEnabledFor(logging.DEBUG) else logging.WARNING


@contextmanager
def _dask_logging(level: int) -> Iterator[None]:
    """Set Dask's loggers in this process to ``level`` (importing distributed resets "distributed" to
    INFO), restoring their levels on exit. Worker processes get the level from ``silence_logs``."""
    loggers = [logging.getLogger(name) for name in DASK_LOGGERS]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old):
            lg.setLevel(lvl)


def run_on_dask(
    process_scan: Callable[[str, str, Any], Summary],
    scans: Sequence[str | Path],
    out_dir: str | Path,
    options: Any,
    *,
    failed: Callable[[str, str], Summary],
    workers: int = 2,
    scheduler: str | None = None,
    threads_per_worker: int = 1,
    progress: bool = True,
    log_level: int | None = None,
) -> list:
    """Run ``process_scan(scan, out_dir, options)`` for every scan on Dask; returns the summaries
    in input order. A scan whose worker died is reported as ``failed(scan, message)``.

    ``log_level`` is the level of Dask's own loggers, here and in the LocalCluster's worker
    processes (default :func:`dask_log_level`: WARNING, or INFO under ``dipid --verbose``).
    """
    try:
        import dask.distributed  # noqa: F401  (importing it sets "distributed" to INFO: set the levels after)
    except ImportError as exc:
        raise DipidError(
            "running on several workers needs dask.distributed: pip install 'dipid[cluster]' (or dask[distributed])"
        ) from exc
    level = dask_log_level() if log_level is None else int(log_level)
    with _dask_logging(level):
        return _run(process_scan, scans, out_dir, options, failed=failed, workers=workers, scheduler=scheduler,
                    threads_per_worker=threads_per_worker, progress=progress, log_level=level)


def _run(process_scan, scans, out_dir, options, *, failed, workers: int, scheduler: str | None, threads_per_worker: int, progress: bool,
         log_level: int) -> list:
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    scans = [str(Path(s).resolve()) for s in scans]
    out_dir = str(Path(out_dir).resolve())
    cluster = None
    if scheduler is None:
        # Processes, one thread each: torch and h5py work best with one Python process per core.
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=None, silence_logs=log_level)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise DipidError(f"cannot reach the Dask scheduler at {scheduler}: {exc}; check the address "
                             "(tcp://HOST:PORT) and that the cluster is running") from exc
    try:
        futures = {client.submit(process_scan, s, out_dir, options, key=f"dipid-scan-{i}", pure=False): i
                   for i, s in enumerate(scans)}
        summaries: list = [None] * len(scans)
        with tqdm(total=len(scans), desc="scans", unit="scan", disable=not progress) as bar:
            for future in as_completed(futures):
                i = futures[future]
                try:
                    summaries[i] = future.result()
                except Exception as exc:  # a worker died: report the scan, keep the others
                    summaries[i] = failed(scans[i], f"{scans[i]}: worker failed: {exc}")
                bar.update(1)
        return summaries
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
