import json

import pytest

from noiseprop.empirical.checkpoint import save_checkpoint
from noiseprop.empirical.cli import main
from noiseprop.empirical.models import build_model


@pytest.fixture
def checkpoint(tmp_path):
    model = build_model("mlp", (1, 8, 8), 10, width=16, depth=1, seed=0)
    return str(save_checkpoint(tmp_path / "m.pt", model, model.spec, {"dataset": "digits"}))


def test_predict_json(checkpoint, capsys):
    rc = main(["predict", "--model", checkpoint, "--noise", "relative:0.05", "--json", "--n-inputs", "40",
               "--accuracy-draws", "8", "--loss-probes", "4"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "linear" and out["noise"] == "relative:0.05" and out["n_inputs"] == 40
    assert 0 <= out["accuracy_lower"] <= out["accuracy"] <= out["accuracy_upper"] <= 1
    assert out["loss_probes"] == 4 and out["mean_logit_var"] > 0


def test_predict_moments_with_monte_carlo_beside(checkpoint, capsys):
    rc = main(["predict", "--model", checkpoint, "--noise", "relative:0.3", "--method", "moments",
               "--compare-mc", "10", "--n-inputs", "30", "--no-progress", "--accuracy-draws", "0", "--loss-probes", "0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Prediction (moments)" in text and "Monte-Carlo (10 draws" in text and "accuracy" in text
    rc = main(["predict", "--model", checkpoint, "--noise", "relative:0.3", "--compare-mc", "10", "--json",
               "--n-inputs", "30", "--no-progress", "--accuracy-draws", "0", "--loss-probes", "0"])
    out = json.loads(capsys.readouterr().out)
    assert out["mc"]["draws"] == 10 and len(out["mc"]["accuracy_ci"]) == 2


def test_predict_user_errors(checkpoint, capsys):
    assert main(["predict", "--model", checkpoint, "--noise", "loud:1"]) == 2
    assert "unknown noise" in capsys.readouterr().err
    assert main(["predict", "--model", checkpoint, "--noise", "relative:0.1", "--compare-mc", "1"]) == 2
    assert "at least 2 draws" in capsys.readouterr().err
    assert main(["predict", "--model", checkpoint + ".missing", "--noise", "relative:0.1"]) == 2
    assert "does not exist" in capsys.readouterr().err
