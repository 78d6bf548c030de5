"""The report on a real dask.distributed cluster (scheduler and worker processes on
localhost): the same CSVs, byte for byte, as the local run, and a worker killed
mid-run costs nothing: the report completes, no cell is lost, none is computed twice
into the store.

CI size: the quick report's architecture study (NOISEPROP_FULL=1: all four studies)."""
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from noiseprop.empirical.cells import ResultStore
from noiseprop.empirical.cluster import DaskExecutor, make_dask_executor
from noiseprop.empirical.report import ReportConfig, make_report

distributed = pytest.importorskip("dask.distributed", reason="the cluster extra: pip install 'noiseprop[cluster]'")

FULL = os.environ.get("NOISEPROP_FULL") == "1"
STUDIES = ("architecture", "batchnorm", "learning_rate", "norm_type") if FULL else ("architecture",)


def _outputs(root: Path) -> dict:
    files = sorted((root / "csv").glob("*.csv")) + [root / "report.md"]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _kill_a_busy_worker(client, store_root: Path, done: dict, stop: threading.Event):
    """Once the first cell is in the store, SIGKILL a worker that is computing one."""
    while not stop.is_set():
        if any(store_root.glob("*/*.json")):
            busy = [w for w, keys in client.processing().items() if keys]
            if busy:
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                done["pid"] = pid
                return
        time.sleep(0.05)


def test_make_dask_executor_rejects_bad_addresses():
    with pytest.raises(ValueError, match="scheduler"):
        make_dask_executor("")
    with pytest.raises(ValueError, match="scheduler"):
        make_dask_executor(42)
    with pytest.raises(ValueError, match="could not connect"):
        make_dask_executor("tcp://127.0.0.1:9", timeout=1)


@pytest.mark.slow
def test_report_on_a_local_cluster_is_identical_and_survives_a_killed_worker(tmp_path):
    local = tmp_path / "local"
    make_report(ReportConfig(out_dir=str(local / "report"), cache_dir=str(local / "cache"), quick=True, workers=1,
                             studies=STUDIES, progress=False))

    remote = tmp_path / "dask"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_class=distributed.Nanny) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        stop, killed = threading.Event(), {}
        watcher = threading.Thread(target=_kill_a_busy_worker,
                                   args=(client, remote / "cache" / "cells", killed, stop), daemon=True)
        watcher.start()
        try:
            make_report(ReportConfig(out_dir=str(remote / "report"), cache_dir=str(remote / "cache"), quick=True,
                                     scheduler=cluster.scheduler_address, studies=STUDIES, progress=False))
        finally:
            stop.set()
            watcher.join(5)
        assert killed.get("pid"), "no worker was killed mid-run: the test did not exercise a failure"
        # the executor over an existing client leaves it open
        ex = make_dask_executor(client)
        assert isinstance(ex, DaskExecutor) and ex.submit(sum, [1, 2]).result() == 3
        ex.shutdown()
        assert client.submit(sum, [3, 4]).result() == 7

    a, b = _outputs(local / "report"), _outputs(remote / "report")
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k] != b[k]]
    assert not different, f"files differ between the local and the dask run: {different}"
    # no cell lost, none computed twice: every cell stored once, each computed exactly once
    import json

    t_local = json.loads((local / "report" / "timings.json").read_text())
    t_dask = json.loads((remote / "report" / "timings.json").read_text())
    keys_local = ResultStore(local / "cache" / "cells").keys()
    keys_dask = ResultStore(remote / "cache" / "cells").keys()
    assert keys_dask == keys_local
    assert t_dask["cells_computed"] == len(keys_dask) == t_local["cells_computed"]
    assert t_dask["cells_loaded"] == 0
