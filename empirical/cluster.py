"""Distributed execution of the study cells on a ``dask.distributed`` cluster
(``noiseprop report --scheduler ADDRESS``, ``noiseprop study NAME --scheduler ADDRESS``).

:func:`noiseprop.empirical.executor.run_tasks` asks one thing of an executor:
``submit(fn, *args, **kwargs) -> future`` whose future has ``result()`` and
``add_done_callback``. :class:`DaskExecutor` wraps a ``dask.distributed.Client`` so
that:

- every submission is *impure* (``pure=False``): two identical cells are never merged
  by dask's key hashing (the result store already deduplicates by configuration);
- the store stays in this process: workers only compute and return a value, which the
  client saves atomically and re-loads (exactly as with a local process pool), so a
  worker killed mid-cell loses nothing but its unfinished work; the scheduler re-runs
  that cell on another worker and it is written to the store once;
- the workers need the same ``noiseprop`` and torch installed, and the cache folder
  (checkpoints) reachable under the same path (on one machine: always; on several: a
  shared file system).

Dask is an optional extra: ``pip install noiseprop[cluster]``.

>>> try:
...     make_dask_executor("")
... except ValueError as e:
...     print(str(e).split(";")[0])
scheduler must be a dask scheduler address such as 'tcp://10.0.0.5:8786' or a dask.distributed.Client
"""
from __future__ import annotations

__all__ = ["DaskExecutor", "make_dask_executor", "require_dask"]


def require_dask():
    """Import ``dask.distributed``, or raise an ImportError saying how to install it."""
    try:
        import dask.distributed as dd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("--scheduler needs dask.distributed: pip install 'noiseprop[cluster]' "
                          f"(or pip install 'dask[distributed]'); import failed: {e}") from None
    return dd


class DaskExecutor:
    """An executor over a ``dask.distributed.Client`` (see the module doc).

    ``client``: a connected Client; ``own``: close it on :meth:`shutdown`.
    ``retries``: how many times the scheduler re-runs a cell whose worker died
    (dask's ``allowed_failures`` also applies).
    """

    def __init__(self, client, own: bool = False, retries: int = 2):
        self.client = client
        self._own = bool(own)
        self.retries = int(retries)
        self._max_workers = max(1, len(client.scheduler_info().get("workers", {})))

    @property
    def address(self) -> str:
        return self.client.scheduler.address

    def submit(self, fn, *args, **kwargs):
        return self.client.submit(fn, *args, pure=False, retries=self.retries, **kwargs)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        if self._own:
            self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def make_dask_executor(scheduler, timeout: float = 30.0) -> DaskExecutor:
    """A :class:`DaskExecutor` for ``scheduler``: an address (``tcp://host:8786``, the
    form ``dask scheduler`` prints) or an existing ``dask.distributed.Client`` (not
    closed on shutdown)."""
    if not isinstance(scheduler, str) and callable(getattr(scheduler, "submit", None)) and \
            hasattr(scheduler, "scheduler_info"):
        return DaskExecutor(scheduler, own=False)
    if not isinstance(scheduler, str) or not scheduler.strip():
        raise ValueError("scheduler must be a dask scheduler address such as 'tcp://10.0.0.5:8786' or a "
                         f"dask.distributed.Client; got {scheduler!r}")
    dd = require_dask()
    try:
        client = dd.Client(scheduler.strip(), timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise ValueError(f"scheduler {scheduler!r}: could not connect to a dask scheduler there "
                         f"within {timeout:g} s ({type(e).__name__}: {e})") from None
    return DaskExecutor(client, own=True)
