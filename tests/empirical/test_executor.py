"""The executor (pluggable, parallel, resumable) and the result store (atomic cells)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from noiseprop.empirical.cells import MISSING, ResultStore, config_key, decode, encode
from noiseprop.empirical.executor import (
    SerialExecutor,
    Task,
    TaskError,
    make_executor,
    probe,
    run_tasks,
)


# ----------------------------------------------------------------------------- store
def test_config_key_is_canonical():
    a = config_key({"b": 1, "a": (1.0, 2), "c": {"y": None, "x": "s"}})
    assert a == config_key({"c": {"x": "s", "y": None}, "a": [1.0, 2], "b": 1})
    assert a != config_key({"b": 2, "a": (1.0, 2), "c": {"y": None, "x": "s"}})
    assert config_key({"lr": 0.1}) != config_key({"lr": 0.1 + 1e-12})
    with pytest.raises(TypeError, match="plain data"):
        config_key({"f": object()})


def test_encode_decode_round_trip_is_bit_exact():
    rng = np.random.default_rng(0)
    v = {"a": rng.normal(size=(3, 4)), "f32": rng.normal(size=5).astype(np.float32), "i": np.arange(6).reshape(2, 3),
         "t": torch.randn(2, 2, dtype=torch.float64), "nan": float("nan"), "x": [1, 2.5, "s", None, True],
         "np": np.float64(1 / 3)}
    back = decode(json.loads(json.dumps(encode(v))))
    np.testing.assert_array_equal(back["a"], v["a"])
    assert back["f32"].dtype == np.float32 and np.array_equal(back["f32"], v["f32"])
    assert back["i"].dtype == v["i"].dtype and back["i"].shape == (2, 3)
    np.testing.assert_array_equal(back["t"], v["t"].numpy())
    assert np.isnan(back["nan"]) and back["x"] == [1, 2.5, "s", None, True] and back["np"] == 1 / 3
    with pytest.raises(TypeError, match="plain data"):
        encode({"m": object()})


def test_store_saves_loads_and_rejects_bad_files(tmp_path):
    store = ResultStore(tmp_path)
    cfg = {"kind": "probe", "x": 1}
    key = config_key(cfg)
    assert store.get(key) is MISSING and key not in store
    store.save(key, {"y": np.arange(3.0)}, cfg)
    assert key in store and np.array_equal(store.load(key)["y"], np.arange(3.0))
    assert store.keys() == [key] and store.config(key) == cfg
    with pytest.raises(ValueError, match="hash"):
        store.save(config_key({"other": 1}), {}, cfg)
    # a truncated file: warned about, moved aside, reported missing
    path = store.path(key)
    path.write_text(path.read_text()[:20])
    with pytest.warns(UserWarning, match="unreadable"):
        assert store.get(key) is MISSING
    assert not path.exists() and list(path.parent.glob("*.corrupt"))
    with pytest.raises(KeyError, match=key):
        store.load(key)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    key = config_key({"a": 1})
    import noiseprop.empirical.cells as cells

    def boom(path, write):
        def failing(tmp):
            write(tmp)
            raise OSError("disk full (injected)")
        return cells.atomic_write.__wrapped__(path, failing) if hasattr(cells.atomic_write, "__wrapped__") else \
            _real_atomic(path, failing)

    from noiseprop.empirical.checkpoint import atomic_write as _real_atomic

    monkeypatch.setattr(cells, "atomic_write", boom)
    with pytest.raises(OSError, match="injected"):
        store.save(key, {"v": 1}, {"a": 1})
    assert store.get(key) is MISSING
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.json"))


def test_killed_writer_never_leaves_a_partial_cell(tmp_path):
    """A process saving large cells in a loop is killed with SIGKILL; every cell file
    left behind loads completely."""
    script = textwrap.dedent(f"""
        import numpy as np, sys
        from noiseprop.empirical.cells import ResultStore, config_key
        s = ResultStore({str(tmp_path)!r})
        for i in range(100000):
            cfg = {{"i": i}}
            s.save(config_key(cfg), {{"a": np.full(200_000, float(i))}}, cfg)
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # let it write a few cells, then kill it mid-write
        proc.stdout.readline()
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = ResultStore(tmp_path)
    keys = store.keys()
    assert len(keys) >= 3
    for k in keys:
        v = store.get(k)
        assert v is not MISSING and v["a"].shape == (200_000,)
        assert np.all(v["a"] == v["a"][0])


# ----------------------------------------------------------------------------- executor
def _grid(n=4):
    tasks = []
    for i in range(n):
        cfg = {"kind": "probe", "i": i}
        tasks.append(Task(config_key(cfg), probe, {"value": i}, cfg, label=f"probe {i}", group="a"))
    # one task that depends on all of the above
    cfg = {"kind": "probe", "sum": n}
    tasks.append(Task(config_key(cfg), probe, {"value": "sum"}, cfg, deps=tuple(t.key for t in tasks),
                      label="sum", group="b"))
    return tasks


def test_run_tasks_serial_resumes_and_passes_dependencies(tmp_path):
    store = ResultStore(tmp_path)
    tasks = _grid()
    events = []
    res, stats = run_tasks(tasks, store, SerialExecutor(), progress=lambda e, t, i: events.append((e, t.label, i["index"], i["total"])))
    assert stats.computed == 5 and stats.loaded == 0
    assert res[tasks[-1].key]["deps"] == sorted(t.key for t in tasks[:-1])
    assert res[tasks[0].key]["threads"] == 1
    assert ("done", "sum", 1, 1) in events and ("done", "probe 3", 4, 4) in events
    res2, stats2 = run_tasks(tasks, store, SerialExecutor())
    assert stats2.computed == 0 and stats2.loaded == 5
    assert res2 == res


def test_run_tasks_interrupted_then_resumed_computes_only_the_rest(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(KeyboardInterrupt, match="fault injection"):
        run_tasks(_grid(), store, SerialExecutor(), stop_after=2)
    assert len(store.keys()) == 2
    _, stats = run_tasks(_grid(), store, SerialExecutor())
    assert stats.loaded == 2 and stats.computed == 3


def test_process_pool_matches_serial_and_uses_one_thread(tmp_path):
    serial, _ = run_tasks(_grid(), ResultStore(tmp_path / "s"), SerialExecutor())
    ex = make_executor(2)
    try:
        par, stats = run_tasks(_grid(), ResultStore(tmp_path / "p"), ex)
    finally:
        ex.shutdown()
    assert stats.computed == 5
    for k in serial:
        assert par[k]["value"] == serial[k]["value"] and par[k]["deps"] == serial[k]["deps"]
        assert par[k]["threads"] == 1
    assert len({v["pid"] for v in par.values()} - {os.getpid()}) >= 1  # ran in worker processes


class _DuckFuture:
    """A future with only what a Dask future shares with concurrent.futures."""

    def __init__(self, inner):
        self._inner = inner

    def result(self):
        return self._inner.result()

    def add_done_callback(self, cb):
        self._inner.add_done_callback(lambda _f: cb(self))


class _DuckExecutor:
    """Only ``submit`` (like dask.distributed.Client)."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(2)
        self.submitted = 0

    def submit(self, fn, *args, **kwargs):
        self.submitted += 1
        return _DuckFuture(self.pool.submit(fn, *args, **kwargs))


def test_any_object_with_submit_is_accepted(tmp_path):
    ex = _DuckExecutor()
    assert make_executor(ex) is ex
    res, stats = run_tasks(_grid(), ResultStore(tmp_path), ex)
    ex.pool.shutdown()
    assert ex.submitted == 5 and stats.computed == 5


def test_failing_task_is_named(tmp_path):
    cfg = {"kind": "probe", "fail": True}
    t = Task(config_key(cfg), probe, {"value": 7, "fail": True}, cfg, label="bad")
    with pytest.raises(TaskError, match="probe asked to fail"):
        run_tasks([t], ResultStore(tmp_path), SerialExecutor())
    assert ResultStore(tmp_path).keys() == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="workers"):
        make_executor(-1)
    with pytest.raises(ValueError, match="workers"):
        make_executor("many")
    assert isinstance(make_executor(1), SerialExecutor)
    t = Task("ab", probe, deps=("cd",))
    with pytest.raises(ValueError, match="unknown task"):
        run_tasks([t], ResultStore("/nonexistent"), SerialExecutor())
