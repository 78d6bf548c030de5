"""Bad flags of ``noiseprop drift`` and ``noiseprop sweep`` (found by a fuzz of the API): refused in
one line that names the flag, before any work (the work functions are replaced by ones
that fail the test), nothing written. Small and seeded: a tiny untrained MLP checkpoint
and the built-in digits."""
import pytest

from noiseprop.empirical import cli_drift, cli_mc
from noiseprop.empirical.cli import main
from test_bad_input_cli import ckpt  # noqa: F401 - the tiny untrained checkpoint fixture


def _no_work(monkeypatch, module, *names):
    def forbidden(*a, **k):
        raise AssertionError("the work started before the bad flag was refused")

    for n in names:
        monkeypatch.setattr(module, n, forbidden)


def _refused(capsys, argv, *words):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("noiseprop: error:"), err
    assert "Traceback" not in err and out == ""
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------
# 4. empty items of a list flag are refused, not dropped
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("times, where", [("1,,3600", "position 2"), ("1,3600,", "position 3"), (",1", "position 1")])
def test_drift_times_with_empty_item(capsys, monkeypatch, ckpt, times, where):
    _no_work(monkeypatch, cli_drift, "load_model_and_data", "predict_drift", "drift_sweep")
    line = _refused(capsys, ["drift", "--model", ckpt, "--times", times, "--draws", 0, "--no-progress"],
                    f"--times {times!r} has an empty item ({where})", "comma-separated")
    assert line.startswith("noiseprop: error: --times")


def test_drift_times_empty(capsys, monkeypatch, ckpt):
    _no_work(monkeypatch, cli_drift, "load_model_and_data", "predict_drift", "drift_sweep")
    _refused(capsys, ["drift", "--model", ckpt, "--times", "", "--draws", 0], "--times is empty")


@pytest.mark.parametrize("levels, where", [("0,,0.1", "position 2"), ("0,0.1,", "position 3")])
def test_sweep_levels_with_empty_item(capsys, monkeypatch, ckpt, levels, where):
    _no_work(monkeypatch, cli_mc, "load_model_and_data", "sweep")
    _refused(capsys, ["sweep", "--model", ckpt, "--noise", "relative", "--levels", levels, "--draws", 2,
                      "--no-progress"], f"--levels {levels!r} has an empty item ({where})")


# ----------------------------------------------------------------------------
# 3. a time beyond the simulation's largest level: refused before the prediction
# ----------------------------------------------------------------------------
def test_drift_huge_time_with_draws_refused_before_work(capsys, monkeypatch, ckpt):
    _no_work(monkeypatch, cli_drift, "load_model_and_data", "predict_drift", "drift_sweep")
    line = _refused(capsys, ["drift", "--model", ckpt, "--times", "1,1e20", "--draws", 2, "--no-progress"],
                    "--times must be seconds <= 1.84e+19", "--draws 0 for the prediction alone")
    assert "levels" not in line


# ----------------------------------------------------------------------------
# 5. a noise with a level and a list of levels: ambiguous
# ----------------------------------------------------------------------------
def test_sweep_noise_with_level_refused(capsys, monkeypatch, ckpt):
    _no_work(monkeypatch, cli_mc, "load_model_and_data", "sweep")
    _refused(capsys, ["sweep", "--model", ckpt, "--noise", "relative:0.3", "--levels", "0.1", "--draws", 2,
                      "--no-progress"],
             "--noise 'relative:0.3' gives a level (0.3) and --levels gives the levels", "ambiguous",
             "Give the family alone ('relative') with --levels")


def test_sweep_valid_flags_run(capsys, ckpt):
    rc = main(["sweep", "--model", ckpt, "--noise", "relative", "--levels", "0, 0.1", "--draws", "2",
               "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 2
