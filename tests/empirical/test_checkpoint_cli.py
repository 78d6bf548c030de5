"""Checkpoint I/O and the `noiseprop mc` / `noiseprop sweep` commands."""
import json

import pytest
import torch

from noiseprop.empirical.checkpoint import CheckpointError, load_checkpoint, load_state_dict_file, save_checkpoint
from noiseprop.empirical.cli import main
from noiseprop.empirical.models import build_model, model_spec


@pytest.fixture
def ckpt(tmp_path):
    spec = model_spec("mlp", (1, 8, 8), 10, norm="bn", width=16, depth=1)
    model = build_model(**spec, seed=3)
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, spec, {"dataset": "digits"})
    return path, model


def test_roundtrip(ckpt):
    path, model = ckpt
    c = load_checkpoint(path)
    assert not c.model.training and c.meta["dataset"] == "digits"
    for (k, a), (_, b) in zip(model.state_dict().items(), c.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert set(load_state_dict_file(path)) == set(model.state_dict())


def test_bad_checkpoints(tmp_path, ckpt):
    path, model = ckpt
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(trunc)
    notsd = tmp_path / "list.pt"
    torch.save([1, 2, 3], notsd)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(notsd)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_state_dict_file(notsd)
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(CheckpointError, match="bare state dict with no model spec"):
        load_checkpoint(bare)
    assert set(load_state_dict_file(bare)) == set(model.state_dict())


def test_cli_mc_json(ckpt, capsys):
    path, _ = ckpt
    assert main(["mc", "--model", str(path), "--noise", "relative:0.1", "--draws", "5", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["draws"] == 5 and out["noise"] == "relative:0.1" and out["n_inputs"] > 300
    assert out["accuracy_ci"][0] <= out["accuracy"] <= out["accuracy_ci"][1]
    assert main(["mc", "--model", str(path), "--noise", "relative:0.1", "--draws", "5", "--no-progress"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_cli_sweep(ckpt, capsys):
    path, _ = ckpt
    assert main(["sweep", "--model", str(path), "--levels", "0,0.5", "--draws", "4", "--json", "--no-progress"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["level"] for r in rows] == [0.0, 0.5] and rows[0]["accuracy_ci_low"] == rows[0]["accuracy"]


@pytest.mark.parametrize("argv,msg", [
    (["mc", "--model", "/nonexistent.pt", "--noise", "relative:0.1"], "does not exist"),
    (["mc", "--model", "CKPT", "--noise", "gauss:0.1"], "unknown noise"),
    (["mc", "--model", "CKPT", "--noise", "relative:-1"], ">= 0"),
    (["sweep", "--model", "CKPT", "--levels", "0,x"], "comma-separated"),
    (["mc", "--model", "CKPT", "--noise", "relative:0.1", "--draws", "1"], "draws must be"),
])
def test_cli_errors(ckpt, capsys, argv, msg):
    path, _ = ckpt
    argv = [str(path) if a == "CKPT" else a for a in argv]
    assert main(argv + ["--no-progress"]) == 2
    assert msg in capsys.readouterr().err
