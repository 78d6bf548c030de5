"""Run a grid of tasks in parallel, through any ``concurrent.futures``-style executor.

The only thing asked of an executor is ``submit(fn, *args, **kwargs) -> future`` where
the future has ``result()`` and ``add_done_callback(callback)``: a
:class:`concurrent.futures.ProcessPoolExecutor` (the default, one machine), a
:class:`concurrent.futures.ThreadPoolExecutor`, the in-process :class:`SerialExecutor`,
or a ``dask.distributed.Client`` (whose futures have the same two methods), so the same
grid can be sent to a cluster unchanged. Task functions and their arguments must be
picklable (top-level functions, plain data); results go through the
:class:`~noiseprop.empirical.cells.ResultStore`, which the workers never touch.

:func:`run_tasks` runs a dependency graph of :class:`Task` objects: a task is submitted
as soon as the tasks it depends on are finished (their results are passed to it), a
task whose result is already in the store is not run again (resumable), and every
finished result is written atomically before anything that depends on it starts.

Every task runs with ``torch.set_num_threads(threads)`` (default 1): the workers share
the machine's cores, and a fixed thread count makes floating-point results
reproducible whatever the number of workers.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from noiseprop.theory.validation import check_int, env_int

from .cells import MISSING

__all__ = ["Task", "SerialExecutor", "make_executor", "run_tasks", "TaskError", "RunStats", "default_workers",
           "print_progress", "stop_workers"]


class TaskError(RuntimeError):
    """A task raised: names the task and carries the worker's traceback."""


@dataclass
class Task:
    """One unit of work.

    key: the result store key (a hash of ``config``; see :func:`cells.config_key`).
    fn: a picklable top-level function; it is called as ``fn(**kwargs, deps=...)``
        when ``deps`` is non-empty (``deps``: dict dependency key → result), else
        ``fn(**kwargs)``.
    config: the JSON-able configuration that identifies the result (stored with it).
    label: a human-readable name for progress lines. group: e.g. the study's name.
    """

    key: str
    fn: Callable
    kwargs: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    deps: tuple = ()
    label: str = ""
    group: str = ""


class SerialExecutor:
    """Runs each task at ``submit`` time in this process; returns a completed
    :class:`concurrent.futures.Future` (exceptions are stored in it, as a pool does)."""

    def submit(self, fn, *args, **kwargs) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - stored, re-raised by result()
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


#: Seconds between a worker's checks that its parent is still alive.
PARENT_POLL_SECONDS = 0.25


def _watch_parent(parent_pid: int, period: float) -> None:
    """Exit this worker as soon as the process that started it is gone (killed with
    SIGKILL, crashed): a daemon thread polls the parent pid, whatever the platform.
    Torch releases the GIL in its kernels, so the check runs during long tasks too."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(period)


def _init_worker(threads: int, parent_pid: int | None = None) -> None:
    # Ctrl-C goes to the whole process group: the parent handles it (and stops the
    # workers), so a worker neither prints a traceback nor dies half-way on its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_pid is not None:
        # (not prctl(PR_SET_PDEATHSIG): it fires when the *thread* that started the
        # worker ends, which need not be the main thread)
        if os.getppid() != parent_pid:  # the parent died before we got here
            os._exit(1)
        threading.Thread(target=_watch_parent, args=(parent_pid, PARENT_POLL_SECONDS), daemon=True,
                         name="noiseprop-parent-watch").start()
    torch.set_num_threads(int(threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def default_workers() -> int:
    """``min(2, cores)``, or ``NOISEPROP_WORKERS`` when set (an integer >= 1)."""
    env = env_int("NOISEPROP_WORKERS", None, minimum=1)
    if env is not None:
        return env
    return max(1, min(2, os.cpu_count() or 1))


def close_executor(executor) -> None:
    """Shut ``executor`` down at the end of a run (executors without ``shutdown``, such as
    the in-process one, need nothing)."""
    if hasattr(executor, "shutdown"):
        executor.shutdown()


def stop_workers(executor) -> None:
    """Stop a process pool now: cancel queued tasks and kill its worker processes
    (used on Ctrl-C and errors, so nothing keeps running behind the user's back)."""
    if not isinstance(executor, ProcessPoolExecutor):
        return
    procs = list((getattr(executor, "_processes", None) or {}).values())
    # cancel first, then kill: once a worker is killed the pool's manager thread cleans
    # up under the pool's shutdown lock, and can block there (joining its queue feeder),
    # which would block a shutdown call made after the kill
    try:
        executor.shutdown(wait=False, cancel_futures=True)
    except Exception:  # noqa: BLE001 - a broken pool is what we want here
        pass
    for p in procs:
        try:
            p.kill()
        except (OSError, AttributeError, ValueError):
            pass
    for p in procs:
        try:
            p.join(2.0)
        except (OSError, AttributeError, ValueError, AssertionError):
            pass


def _start_method() -> str:
    """``NOISEPROP_START_METHOD`` if set; else ``fork`` where available (Linux: workers
    start in milliseconds; safe for torch because every worker runs with one thread,
    so no OpenMP region is ever entered in a child, the same arrangement as
    ``torch.utils.data.DataLoader`` workers), else ``spawn``."""
    env = os.environ.get("NOISEPROP_START_METHOD")
    methods = mp.get_all_start_methods()
    if env:
        if env not in methods:
            raise ValueError(f"NOISEPROP_START_METHOD={env!r} is not available here; accepted: {methods}")
        return env
    return "fork" if "fork" in methods and sys.platform.startswith("linux") else "spawn"


def check_workers(workers, name: str = "workers"):
    """A number of worker processes: an integer >= 1 (1: in-process) or ``None`` (the
    default, :func:`default_workers`); 0 is refused like ``NOISEPROP_WORKERS=0``."""
    return check_int(name, workers, 1, allow_none=True, what="an integer >= 1 (1: in-process)")


def make_executor(workers=None, threads: int = 1, start_method: str | None = None):
    """An executor for :func:`run_tasks`.

    ``workers``: ``None`` → :func:`default_workers`; ``1`` (or ``"serial"``) →
    :class:`SerialExecutor` (in-process); ``n > 1`` → a ``ProcessPoolExecutor`` with ``n`` worker
    processes (``start_method``: see :func:`_start_method`), each with
    ``torch.set_num_threads(threads)``; any object with a ``submit`` method (a pool, a
    ``dask.distributed.Client``) is returned unchanged.
    """
    if workers is not None and not isinstance(workers, (int, str)) and callable(getattr(workers, "submit", None)):
        return workers
    if workers is None:
        workers = default_workers()
    if isinstance(workers, str):
        if workers == "serial":
            return SerialExecutor()
        try:
            workers = int(workers)
        except ValueError:
            raise ValueError(f"workers must be an integer, 'serial' or an executor with submit(); got {workers!r}") from None
    # 0 is refused like NOISEPROP_WORKERS=0 (default_workers): 1 is the in-process executor
    workers = check_int("workers", workers, 1, wrong_type=ValueError,
                        what="an integer >= 1 (1: in-process), 'serial' or an executor with submit()")
    if workers == 1:
        return SerialExecutor()
    ctx = mp.get_context(start_method or _start_method())
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(threads, os.getpid()))


def _call(fn, kwargs, threads):
    """Run one task with a fixed torch thread count (restored afterwards)."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    try:
        return fn(**kwargs), time.perf_counter() - t0
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise TaskError(f"{getattr(fn, '__name__', fn)} failed: {type(e).__name__}: {e}\n"
                        + "".join(traceback.format_exception(e))) from None
    finally:
        if threads and torch.get_num_threads() != old:
            torch.set_num_threads(old)


@dataclass
class RunStats:
    """What :func:`run_tasks` did: tasks loaded from the store, computed, and the
    seconds spent computing (summed over workers) per group."""

    loaded: int = 0
    computed: int = 0
    compute_seconds: dict = field(default_factory=dict)
    wall_seconds: float = 0.0


def run_tasks(tasks: Iterable[Task], store, executor=None, threads: int = 1, progress: Callable | None = None,
              stop_after: int | None = None) -> tuple[dict, RunStats]:
    """Run ``tasks`` (a dependency graph) through ``executor``; return
    ``(results, stats)`` with ``results[key]`` for every task.

    Results already in ``store`` are loaded, not recomputed. Each computed result is
    saved atomically and then *re-loaded from the store*, so a resumed run and an
    uninterrupted one see bit-identical data. ``progress(event, task, info)`` is called
    with ``event`` in ``{"cached", "start", "done"}``. ``stop_after``: raise
    ``KeyboardInterrupt`` after that many tasks were computed in this call (fault
    injection for tests of resumption).
    """
    t_start = time.perf_counter()
    tasks = list(tasks)
    by_key: dict[str, Task] = {}
    for t in tasks:
        if t.key in by_key:
            continue  # the same configuration requested twice (e.g. shared by two studies)
        by_key[t.key] = t
    for t in by_key.values():
        missing = [d for d in t.deps if d not in by_key]
        if missing:
            raise ValueError(f"task {t.label or t.key!r} depends on unknown task(s) {missing}")
    own = not callable(getattr(executor, "submit", None))
    executor = make_executor(executor, threads) if own else executor
    stats = RunStats()
    totals: dict[str, int] = {}
    for t in by_key.values():
        totals[t.group] = totals.get(t.group, 0) + 1
    counts: dict[str, int] = {}
    results: dict[str, Any] = {}
    done_q: queue.Queue = queue.Queue()
    pending = dict(by_key)
    running: set[str] = set()
    lock = threading.Lock()
    claims: dict = {}  # key -> Claim held while this run computes the cell
    waiting: dict[str, Task] = {}  # ready cells another run is computing now
    can_claim = callable(getattr(store, "claim", None))

    def note(event, task, info=None):
        info = dict(info or {})
        if event != "start":
            counts[task.group] = counts.get(task.group, 0) + 1
        info.update(index=counts.get(task.group, 0), total=totals[task.group])
        if progress is not None:
            progress(event, task, info)

    def ready(t: Task) -> bool:
        return all(d in results for d in t.deps)

    def try_start(key, t) -> bool:
        """Load the cell, or claim and submit it; False when another run holds it."""
        cached = store.get(key)
        if cached is MISSING and can_claim:
            c = store.claim(key)
            if c is None:
                return False
            cached = store.get(key)  # finished by another run just before we claimed it
            if cached is not MISSING:
                c.release()
            else:
                claims[key] = c
        if cached is not MISSING:
            results[key] = cached
            stats.loaded += 1
            note("cached", t)
            return True
        kwargs = dict(t.kwargs)
        if t.deps:
            kwargs["deps"] = {d: results[d] for d in t.deps}
        running.add(key)
        note("start", t)
        fut = executor.submit(_call, t.fn, kwargs, threads)
        fut.add_done_callback(lambda f, k=key: done_q.put((k, f)))
        return True

    def submit_ready():
        for key in list(waiting):
            if try_start(key, waiting[key]):
                del waiting[key]
        for key in list(pending):
            t = pending[key]
            if not ready(t):
                continue
            del pending[key]
            if not try_start(key, t):
                waiting[key] = t

    interrupted = False
    try:
        while True:
            before = -1
            while before != len(results):  # loading cached results can make more tasks ready
                before = len(results)
                submit_ready()
            if not running and not waiting:
                break
            try:  # while another run computes cells we need, look again every 0.2 s
                key, fut = done_q.get(timeout=0.2) if waiting else done_q.get()
            except queue.Empty:
                continue
            with lock:
                running.discard(key)
            t = by_key[key]
            value, seconds = fut.result()  # re-raises TaskError
            store.save(key, value, t.config)
            if key in claims:
                claims.pop(key).release()
            results[key] = store.load(key)
            stats.computed += 1
            stats.compute_seconds[t.group] = stats.compute_seconds.get(t.group, 0.0) + seconds
            note("done", t, {"seconds": seconds})
            if stop_after is not None and stats.computed >= stop_after:
                raise KeyboardInterrupt(f"stopped after {stats.computed} computed tasks (fault injection)")
        if pending:
            raise RuntimeError(f"tasks never became ready (dependency cycle?): {sorted(pending)}")
    except BaseException as e:
        # leave nothing behind: on Ctrl-C stop the workers now (finished cells are
        # stored; running ones are recomputed on resume); on an error cancel the queue
        if isinstance(e, KeyboardInterrupt):
            interrupted = True
            stop_workers(executor)
        elif isinstance(executor, ProcessPoolExecutor):
            executor.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        for c in claims.values():
            c.release()
        if own and not interrupted:
            # (after Ctrl-C, stop_workers has shut the pool down and killed its workers:
            # a second shutdown could wait on the pool's lock while its manager thread
            # cleans up, see stop_workers)
            executor.shutdown(wait=True)
    stats.wall_seconds = time.perf_counter() - t_start
    return results, stats


def print_progress(stream=None):
    """A ``progress`` callback for :func:`run_tasks` printing one line per finished
    (or loaded) cell: ``[group] i/n label: done in s`` to ``stream`` (stderr)."""
    stream = stream or sys.stderr

    def cb(event, task, info):
        if event == "start":
            return
        what = "loaded from store" if event == "cached" else f"done in {info.get('seconds', 0):.1f} s"
        print(f"[{task.group}] cell {info['index']}/{info['total']} {task.label}: {what}", file=stream, flush=True)

    return cb


def probe(value=None, fail: bool = False, deps: dict | None = None, seconds: float = 0.0) -> dict:
    """A trivial task (used by tests and to check a new executor): returns the value,
    the process id, torch's thread count and the dependency results it received, after
    sleeping ``seconds``."""
    if seconds:
        time.sleep(seconds)
    if fail:
        raise ValueError(f"probe asked to fail (value={value!r})")
    return {"value": value, "pid": os.getpid(), "threads": torch.get_num_threads(),
            "deps": sorted((deps or {}).keys())}
