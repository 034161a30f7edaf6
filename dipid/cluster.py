"""Many scans on a Dask cluster: a LocalCluster by default, or any scheduler address.

Each scan is one task running :func:`dipid.pipeline.process_scan` on a worker, which loads the
predictor once per process and writes the scan's results itself; only the small summary comes
back. Beamline HPC users start a cluster with dask-jobqueue on SLURM and pass its address
(see the README's recipe).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from dipid.errors import DipidError

logger = logging.getLogger(__name__)

__all__ = ["run_on_dask"]


def run_on_dask(
    scans: Sequence[str | Path],
    out_dir: str | Path,
    options,
    *,
    workers: int = 2,
    scheduler: str | None = None,
    threads_per_worker: int = 1,
    progress: bool = True,
) -> list:
    """Run ``process_scan`` for every scan on Dask; returns the summaries in input order."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as exc:
        raise DipidError(
            "running on several workers needs dask.distributed: pip install 'dipid[cluster]' (or dask[distributed])"
        ) from exc
    from tqdm.auto import tqdm

    from dipid.pipeline import ScanSummary, process_scan

    scans = [str(Path(s).resolve()) for s in scans]
    out_dir = str(Path(out_dir).resolve())
    cluster = None
    if scheduler is None:
        # Processes, one thread each: torch and h5py work best with one Python process per core.
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=None)
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
                    summaries[i] = ScanSummary(scan=scans[i], status="failed", error=f"{scans[i]}: worker failed: {exc}")
                bar.update(1)
        return summaries
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
