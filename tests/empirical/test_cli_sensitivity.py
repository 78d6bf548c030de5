import json

import pytest

from noiseprop.empirical.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from noiseprop.empirical.train import train

    res = train({"name": "mlp", "norm": "none", "width": 16, "depth": 2}, "digits", seed=0, cache=False, epochs=3,
                lr=0.05, batch_size=32)
    return str(res.save(tmp_path_factory.mktemp("ck") / "m.pt"))


def test_sensitivity_json_with_budget_keep_digital_and_plot(checkpoint, tmp_path, capsys):
    png = tmp_path / "bars.png"
    rc = main(["sensitivity", "--model", checkpoint, "--noise", "relative:0.3", "--budget", "0.02",
               "--keep-digital", "1", "--keep-method", "moments", "--plot", str(png), "--json", "--n-inputs", "60"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["noise"] == "relative:0.3" and out["n_inputs"] == 60
    assert [r["layer"] for r in out["layers"]] == ["fc1", "fc2", "fc"]
    assert abs(sum(r["share_logit_var"] for r in out["layers"]) - 1) < 1e-9
    assert out["budget"]["max_drop"] == 0.02 and out["budget"]["level"] > 0
    assert out["budget"]["noise"].startswith("relative:")
    assert len(out["keep_digital"]["layers"]) == 1
    assert out["budget"]["refine"] == "moments" and out["budget"]["first_order_level"] > 0
    assert out["keep_digital"]["method"] == "moments" and len(out["keep_digital"]["accuracy_first_order"]) == 1
    assert png.stat().st_size > 1000


def test_sensitivity_budget_calibrated_by_monte_carlo(checkpoint, capsys):
    rc = main(["sensitivity", "--model", checkpoint, "--noise", "relative:0.3", "--budget", "0.03", "--refine", "none",
               "--budget-calibrate", "20", "--budget-mc", "20", "--json", "--n-inputs", "60"])
    assert rc == 0
    b = json.loads(capsys.readouterr().out)["budget"]
    steps = b["calibration"]
    assert b["calibrate_draws"] == 20 and b["mc_draws"] == 20 and steps[0]["level"] == b["analytic_level"]
    assert b["level"] in [st["level"] for st in steps]
    assert b["analytic_level"] == b["first_order_level"]


def test_sensitivity_text(checkpoint, capsys):
    assert main(["sensitivity", "--model", checkpoint, "--noise", "relative:0.3", "--n-inputs", "40",
                 "--keep-digital", "2"]) == 0
    text = capsys.readouterr().out
    assert "Sensitivity under relative:0.3" in text and "Layers to keep digital" in text


@pytest.mark.parametrize("args, message", [
    (["--noise", "relative"], "--noise='relative' has no level"),
    (["--noise", "relative:0.1", "--budget", "1.5"], "--budget is the largest accuracy drop allowed, in (0, 1)"),
    (["--noise", "relative:0.1", "--budget", "0"], "in (0, 1)"),
    (["--noise", "relative:0.1", "--keep-digital", "0"], "--keep-digital takes a number of layers >= 1"),
    (["--noise", "relative:0.1", "--keep-digital", "3"], "--keep-digital must be an integer in [1, 2]"),
    (["--noise", "relative:0.1", "--budget-mc", "10"], "--budget-mc needs --budget"),
    (["--noise", "relative:0.1", "--budget-calibrate", "10"], "--budget-calibrate needs --budget"),
    (["--noise", "relative:0.1", "--budget", "0.02", "--budget-calibrate", "1"], "at least 2 draws per step"),
])
def test_sensitivity_user_errors(checkpoint, capsys, args, message):
    assert main(["sensitivity", "--model", checkpoint, "--n-inputs", "20"] + args) == 2
    assert message in capsys.readouterr().err
