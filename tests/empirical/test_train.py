"""Training: determinism, the checkpoint cache (atomic, corruption-safe), divergence, CLI."""
import copy
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from noiseprop.empirical import checkpoint as ckmod
from noiseprop.empirical.checkpoint import load_checkpoint
from noiseprop.empirical.data import load_dataset
from noiseprop.empirical.models import build_model
from noiseprop.empirical.train import (
    TrainingDivergedError,
    _lr_at,
    default_cache_dir,
    default_train_config,
    train,
)

SMALL = {"name": "resnet8", "norm": "bn", "width": 4}
MLP = {"name": "mlp", "norm": "bn", "width": 16}
HP = dict(lr=0.05, epochs=2, batch_size=32, momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=0)


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("digits", subset_train=192, subset_test=64)


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_configuration_twice_gives_bit_identical_weights(tiny):
    rng_state = torch.get_rng_state()
    det = torch.are_deterministic_algorithms_enabled()
    r1 = train(SMALL, tiny, seed=3, cache=False, **HP)
    r2 = train(SMALL, tiny, seed=3, cache=False, **HP)
    assert _same_weights(r1.model, r2.model)
    for k in ("loss", "train_accuracy", "test_loss", "test_accuracy", "lr"):
        assert getattr(r1.history, k) == getattr(r2.history, k)
    assert r1.cache_key == r2.cache_key and not r1.from_cache
    threads = torch.get_num_threads()
    r3 = train(SMALL, tiny, seed=4, cache=False, num_threads=2, **HP)
    assert torch.get_num_threads() == threads and r3.config["threads"] == 2 and r1.config["threads"] == 1
    assert not _same_weights(r1.model, r3.model) and r3.cache_key != r1.cache_key
    # the caller's thread setting does not matter (training runs with num_threads=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2 if before == 1 else 1)
    try:
        r4 = train(SMALL, tiny, seed=3, cache=False, **HP)
    finally:
        torch.set_num_threads(before)
    assert _same_weights(r1.model, r4.model) and r4.cache_key == r1.cache_key
    # no global state left behind
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.are_deterministic_algorithms_enabled() == det
    assert not r1.model.training
    assert len(r1.history.loss) == 2 and r1.history.epoch == (1, 2)
    assert 0.0 <= r1.test_accuracy <= 1.0 and r1.train_seconds > 0


def test_training_learns_on_digits_quickly(tiny):
    r = train({"name": "mlp", "norm": "bn", "width": 32}, tiny, seed=0, cache=False, lr=0.05, epochs=8,
              batch_size=32)
    assert r.history.loss[-1] < r.history.loss[0] / 3
    # 64 test digits, chance 10%: a trained MLP gets well above 80%
    assert r.test_accuracy > 0.8


def test_cache_hit_loads_the_same_model(tiny, tmp_path):
    r1 = train(SMALL, tiny, seed=0, cache_dir=tmp_path, **HP)
    assert not r1.from_cache and Path(r1.cache_path).is_file()
    assert Path(r1.cache_path).parent == tmp_path / "checkpoints"
    r2 = train(SMALL, tiny, seed=0, cache_dir=tmp_path, progress=lambda rec: pytest.fail("trained again"), **HP)
    assert r2.from_cache and r2.cache_key == r1.cache_key
    assert _same_weights(r1.model, r2.model)
    assert r2.history.loss == r1.history.loss and r2.final == r1.final
    assert r2.train_seconds == pytest.approx(r1.train_seconds)
    # any change of configuration is a miss
    r3 = train(SMALL, tiny, seed=0, cache_dir=tmp_path, **{**HP, "weight_decay": 0.0})
    assert not r3.from_cache and r3.cache_key != r1.cache_key
    assert len(_files(tmp_path)) == 2
    # the cache entry is an ordinary noiseprop checkpoint
    ck = load_checkpoint(r1.cache_path)
    assert ck.spec == r1.spec and ck.meta["dataset"] == "digits" and ck.meta["cache_key"] == r1.cache_key


def test_cache_dir_default_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NOISEPROP_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NOISEPROP_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "noiseprop"


def test_corrupted_cache_entry_is_reported_and_retrained(tiny, tmp_path):
    r1 = train(SMALL, tiny, seed=1, cache_dir=tmp_path, **HP)
    path = Path(r1.cache_path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.warns(RuntimeWarning, match="unusable.*retraining"):
        r2 = train(SMALL, tiny, seed=1, cache_dir=tmp_path, **HP)
    assert not r2.from_cache and _same_weights(r1.model, r2.model)
    assert path.read_bytes() != good[: len(good) // 2]  # overwritten with a good entry
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train(SMALL, tiny, seed=1, cache_dir=tmp_path, **HP).from_cache
    # a readable checkpoint of another configuration at this path is not used either
    other = train(SMALL, tiny, seed=2, cache_dir=tmp_path, **HP)
    path.write_bytes(Path(other.cache_path).read_bytes())
    with pytest.warns(RuntimeWarning, match="does not match"):
        r3 = train(SMALL, tiny, seed=1, cache_dir=tmp_path, **HP)
    assert not r3.from_cache and _same_weights(r1.model, r3.model)


def test_exception_during_save_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    real_save = torch.save

    def broken_save(obj, f, *a, **k):  # writes half a file, then the process is "interrupted"
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(ckmod.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        train(SMALL, tiny, seed=5, cache_dir=tmp_path, **HP)
    assert _files(tmp_path) == []
    monkeypatch.setattr(ckmod.torch, "save", real_save)
    # interrupted mid-training: nothing written either
    def stop(rec):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(SMALL, tiny, seed=5, cache_dir=tmp_path, progress=stop, **HP)
    assert _files(tmp_path) == []
    assert not train(SMALL, tiny, seed=5, cache_dir=tmp_path, **HP).from_cache


def test_killed_process_leaves_no_cache_entry(tmp_path):
    """SIGKILL in the middle of writing the checkpoint (the worst moment): no entry
    appears; at most a hidden temp file, which lookups ignore; the next run retrains."""
    code = textwrap.dedent(f"""
        import os, signal, torch
        from noiseprop.empirical import checkpoint
        from noiseprop.empirical.data import load_dataset
        from noiseprop.empirical.train import train
        real = torch.save
        def save_then_die(obj, f, *a, **k):
            real(obj, f, *a, **k)
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.torch.save = save_then_die
        data = load_dataset("teacher", n_train=128, n_test=32)
        train({MLP!r}, data, seed=6, cache_dir={str(tmp_path)!r}, **{HP!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    left = _files(tmp_path)
    assert all(Path(f).name.startswith(".") and f.endswith(".tmp") for f in left), left
    assert not any(f.endswith(".pt") for f in left)
    data = load_dataset("teacher", n_train=128, n_test=32)
    r = train(MLP, data, seed=6, cache_dir=tmp_path, **HP)
    assert not r.from_cache
    assert train(MLP, data, seed=6, cache_dir=tmp_path, **HP).from_cache


def test_divergence_raises_a_clear_error_and_caches_nothing(tiny, tmp_path):
    with pytest.raises(TrainingDivergedError, match=r"diverged.*mlp \(norm=none.*lr=1e\+30.*seed=0"):
        train({"name": "mlp", "norm": "none", "width": 16}, tiny, seed=0, cache_dir=tmp_path, lr=1e30,
              epochs=2, batch_size=32)
    assert _files(tmp_path) == []


def test_user_module_is_copied_and_keyed_by_its_initial_state(tiny, tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    before = copy.deepcopy(net.state_dict())
    r1 = train(net, tiny, seed=0, cache_dir=tmp_path, lr=0.05, epochs=2, batch_size=32)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # not mutated
    assert r1.model is not net and not _same_weights(r1.model, net)
    r2 = train(net, tiny, seed=0, cache_dir=tmp_path, lr=0.05, epochs=2, batch_size=32)
    assert r2.from_cache and _same_weights(r1.model, r2.model) and type(r2.model) is type(net)
    with torch.no_grad():
        net[1].weight.mul_(0.5)
    r3 = train(net, tiny, seed=0, cache_dir=tmp_path, lr=0.05, epochs=2, batch_size=32)
    assert not r3.from_cache and r3.cache_key != r1.cache_key


def test_spec_forms_and_defaults(tiny):
    cfg = default_train_config("resnet20")
    assert {"width", "depth", "lr", "epochs", "batch_size", "momentum", "weight_decay", "schedule",
            "warmup_epochs"} <= set(cfg)
    assert cfg["depth"] == 20 and default_train_config("vgg16")["depth"] == 16
    assert default_train_config("mlp", norm="none")["lr"] <= default_train_config("mlp", norm="bn")["lr"]
    # a family name takes the default width; in_shape/num_classes come from the data
    r = train("mlp", tiny, cache=False, epochs=1)
    assert r.spec["width"] == default_train_config("mlp")["width"] and r.spec["in_shape"] == [1, 8, 8]
    assert r.config["lr"] == default_train_config("mlp", norm="none")["lr"]
    r2 = train({"name": "vgg", "norm": "bn"}, tiny, cache=False, epochs=1, batch_size=64)
    assert r2.spec["width"] == default_train_config("vgg")["width"] and r2.spec["depth"] == 11
    assert r2.config["lr"] == default_train_config("vgg", norm="bn")["lr"]
    built = build_model(**r.spec)
    assert built.state_dict().keys() == r.model.state_dict().keys()


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "lr must be"),
    ({"lr": float("nan")}, "lr must be"),
    ({"epochs": 0}, "epochs must be"),
    ({"batch_size": 2.5}, "batch_size must be"),
    ({"momentum": 1.5}, "momentum must be"),
    ({"schedule": "linear"}, "unknown schedule"),
    ({"seed": "a"}, "seed must be"),
])
def test_invalid_hyper_parameters(tiny, kwargs, match):
    # theory/validation.py: a value of the wrong type is a TypeError, one out of range a ValueError
    with pytest.raises((TypeError, ValueError), match=match):
        train(SMALL, tiny, cache=False, **{**HP, **kwargs})


def test_spec_must_match_the_data(tiny):
    with pytest.raises(ValueError, match="does not match dataset"):
        train({**SMALL, "in_shape": [3, 32, 32]}, tiny, cache=False, **HP)
    with pytest.raises(TypeError, match="model_or_spec"):
        train(42, tiny)
    with pytest.raises(ValueError, match="pass seed= to train"):
        train({**SMALL, "seed": 1}, tiny, cache=False, **HP)


def test_schedules():
    base = {"lr": 1.0, "epochs": 4, "warmup_epochs": 0}
    step = {**base, "schedule": "step"}
    assert [_lr_at(step, e, 0, 10) for e in range(4)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    cos = {**base, "schedule": "cosine"}
    assert _lr_at(cos, 0, 0, 10) == 1.0
    assert _lr_at(cos, 2, 0, 10) == pytest.approx(0.5)
    assert _lr_at(cos, 3, 9, 10) == pytest.approx(0.5 * (1 + __import__("math").cos(__import__("math").pi * 39 / 40)))
    const = {**base, "schedule": "constant", "warmup_epochs": 1}
    assert _lr_at(const, 0, 0, 10) == pytest.approx(0.1)
    assert _lr_at(const, 0, 4, 10) == pytest.approx(0.5)
    assert _lr_at(const, 1, 0, 10) == 1.0


# ----------------------------------------------------------------------------- CLI
def test_cli_train_end_to_end(tmp_path, capsys):
    from noiseprop.empirical.cli import main

    out = tmp_path / "m.pt"
    argv = ["train", "--model", "resnet8", "--norm", "l1", "--dataset", "digits", "--width", "4",
            "--lr", "0.05", "--epochs", "1", "--seed", "0", "--batch-size", "64", "--momentum", "0.9",
            "--weight-decay", "0", "--schedule", "constant", "--threads", "1", "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "resnet8" in text and "checkpoint written" in text
    ck = load_checkpoint(out)
    assert ck.spec["name"] == "resnet8" and ck.spec["norm"] == "l1" and ck.spec["width"] == 4
    assert ck.meta["dataset"] == "digits" and "data_dir" in ck.meta
    assert load_dataset(**{k: v for k, v in ck.meta["dataset_spec"].items() if k != "fingerprint"}).fingerprint \
        == ck.meta["dataset_spec"]["fingerprint"]
    assert ck.meta["config"]["lr"] == 0.05 and ck.meta["config"]["schedule"] == "constant"
    assert len(ck.meta["history"]["loss"]) == 1
    # second run: from the cache, same weights
    out2 = tmp_path / "m2.pt"
    assert main(argv[:-4] + ["--out", str(out2), "--cache-dir", str(tmp_path / "c")]) == 0
    assert "loaded from cache" in capsys.readouterr().out
    assert _same_weights(load_checkpoint(out2).model, ck.model)
    # user errors: exit status 2 with a message
    assert main(["train", "--model", "resnet21", "--quiet", "--no-cache"]) == 2
    assert "6n+2" in capsys.readouterr().err
    assert main(["train", "--model", "mlp", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none")]) == 2
    assert "data_batch_1" in capsys.readouterr().err
    assert main(["train", "--model", "mlp", "--width", "8", "--lr", "1e30", "--epochs", "1", "--quiet",
                 "--no-cache"]) == 2
    assert "diverged" in capsys.readouterr().err


def test_user_module_with_batchnorm_hashes_its_state(tmp_path):
    """A user's module with BatchNorm (0-d num_batches_tracked buffer) trains and caches."""
    from torch import nn

    from noiseprop.empirical.data import load_dataset
    from noiseprop.empirical.train import train

    data = load_dataset("digits").subset(n_train=64, n_test=32)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    a = train(net, data, lr=0.05, epochs=1, batch_size=32, seed=0, cache_dir=tmp_path)
    b = train(net, data, lr=0.05, epochs=1, batch_size=32, seed=0, cache_dir=tmp_path)
    assert b.from_cache and a.cache_key == b.cache_key
