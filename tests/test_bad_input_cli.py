"""Bad input to sensitivity / noise_budget / keep_digital and to the ``noiseprop``
commands (cases S1-S4, C1-C6 of the bad-input probe): each is refused with a message
that names the argument (for the command line, the flag) and says what is accepted,
before any work; nothing is half-written, and the user's valid input works.

"Before any work" is asserted by replacing the command's work functions with ones that
fail the test if called. Small and seeded: tiny models, the built-in digits."""
import copy
import json
import time
import warnings

import pytest
import torch
from torch import nn

from noiseprop.empirical import cli_drift, cli_mc, cli_predict, cli_sensitivity
from noiseprop.empirical.checkpoint import save_checkpoint
from noiseprop.empirical.models import build_model, model_spec
from noiseprop.theory import Quantized, keep_digital, noise_budget, sensitivity
from noiseprop.theory.examples import tiny_problem
from noiseprop.theory.validation import SEED_MAX
from test_bad_input import _cli, _one_line_error  # the CLI helpers of the bad-input table


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    spec = model_spec("mlp", (1, 8, 8), 10, width=16, depth=2)
    path = tmp_path_factory.mktemp("ck") / "m.pt"
    save_checkpoint(path, build_model(**spec, seed=0), spec, {"dataset": "digits"})
    return str(path)


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A checkpoint that classifies (a noise budget needs accuracy to lose)."""
    from noiseprop.empirical.train import train

    res = train({"name": "mlp", "norm": "none", "width": 16, "depth": 2}, "digits", seed=0, cache=False, epochs=3,
                lr=0.05, batch_size=32)
    return str(res.save(tmp_path_factory.mktemp("ck") / "trained.pt"))


@pytest.fixture(scope="module")
def problem():
    return tiny_problem(32)


def _no_work(monkeypatch, module, *names):
    """Replace the work functions of a command module by ones that fail the test."""
    def forbidden(*a, **k):
        raise AssertionError("the work started before the bad flag was refused")

    for n in names:
        monkeypatch.setattr(module, n, forbidden)


class _TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))), x


# ----------------------------------------------------------------------------
# S1-S4: the library
# ----------------------------------------------------------------------------
_S_CALLS = {
    "sensitivity": lambda net, x, y: sensitivity(net, x, y, "relative:0.1"),
    "keep_digital": lambda net, x, y: keep_digital(net, x, y, "relative:0.3"),
    "noise_budget": lambda net, x, y: noise_budget(net, x, y, "relative", refine=None),
}


@pytest.mark.parametrize("call", sorted(_S_CALLS))
def test_s1_x_not_fitting_the_model(problem, call):
    net, x, y = problem
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="x does not fit the model: .*shapes cannot be multiplied"):
        _S_CALLS[call](net, x[:, :3], y)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the model is untouched


def test_s1_wrong_conv_channels_and_tuple_output(problem):
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    x = torch.randn(8, 3, 8, 8)
    y = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="x does not fit the model: .*channels"):
        sensitivity(conv, x, y, "relative:0.1")
    _, x, y = problem
    with pytest.raises(TypeError, match="must return one tensor of logits.*returned a tuple of 2 items"):
        sensitivity(_TupleNet().eval(), x, y % 3, "relative:0.1")


def test_s2_channels(problem):
    net, x, y = problem
    for bad in (5, 2.5, [0], b"0"):
        with pytest.raises(TypeError, match="channels must be a layer name, a list of layer names, True .* or "
                                            "None / False"):
            sensitivity(net, x, y, "relative:0.1", channels=bad)
    with pytest.raises(ValueError, match=r"channels: \['9'\] are not noisy layers"):
        sensitivity(net, x, y, "relative:0.1", channels=["0", "9"])
    assert sensitivity(net, x, y, "relative:0.1", channels=False).channels is None  # False: none, like None
    ch = sensitivity(net, x, y, "relative:0.1", channels="2").channels
    assert set(ch.layer) == {"2"} and len(ch) == 3


@pytest.mark.parametrize("family", ["pcm", "pcm-nocomp", "stuck", "quantized"])
def test_s3_budget_refuses_hardware_family_strings(problem, family):
    net, x, y = problem
    with pytest.raises(ValueError, match="noise_family: .* non-zero mean.*accepted: additive, relative"):
        noise_budget(net, x, y, family)
    with pytest.raises(ValueError, match="noise_family: Quantized noise has a non-zero mean"):
        noise_budget(net, x, y, Quantized(4))


@pytest.mark.parametrize("rtol, exc", [(-1, ValueError), (0, ValueError), (1, ValueError), (float("nan"), ValueError),
                                       (float("inf"), ValueError), ("x", TypeError), (True, TypeError)])
def test_s4_budget_rtol(problem, rtol, exc):
    net, x, y = problem
    with pytest.raises(exc, match=r"rtol must be a relative tolerance on the level in the open interval \(0, 1\)"):
        noise_budget(net, x, y, "relative", rtol=rtol, refine=None)


# ----------------------------------------------------------------------------
# C1: hardware noise in `noiseprop predict`
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("noise, extra", [("pcm:3600", []), ("pcm:3600", ["--loss-probes", "0"]),
                                          ("stuck:0.01", [])])
def test_c1_predict_hardware_noise(capsys, ckpt, noise, extra):
    rc, out, err = _cli(capsys, "predict", "--model", ckpt, "--noise", noise, "--n-inputs", 30, "--accuracy-draws", 0,
                        "--json", *extra)
    assert rc == 0, err
    res = json.loads(out)
    assert res["noise"].startswith(noise.partition(":")[0]) and 0 <= res["accuracy"] <= 1


def test_c1_predict_hardware_noise_with_loss_probes_is_refused_by_flag(capsys, ckpt, monkeypatch):
    _no_work(monkeypatch, cli_predict, "predict", "load_model_and_data")
    rc, out, err = _cli(capsys, "predict", "--model", ckpt, "--noise", "pcm:3600", "--loss-probes", 4)
    _one_line_error(rc, err, "--loss-probes 4", "hardware noise", "leave --loss-probes out")
    rc, out, err = _cli(capsys, "predict", "--model", ckpt, "--noise", "relative:0.1", "--loss-probes", 1)
    _one_line_error(rc, err, "--loss-probes must be 0 (skip the Hutchinson estimate) or an integer >= 2, got 1")
    rc, out, err = _cli(capsys, "predict", "--model", ckpt, "--noise", "relative:0.1", "--method", "moments",
                        "--loss-probes", 8)
    _one_line_error(rc, err, "--loss-probes 8", "--method moments", "leave --loss-probes out")


def test_c1_gaussian_predict_takes_the_librarys_default(capsys, ckpt):
    """Without --loss-probes the CLI gives the library's default (the exact Gauss-Newton
    form on this piecewise-linear MLP; it forced 16 Hutchinson probes before); with it,
    Hutchinson."""
    args = ("predict", "--model", ckpt, "--noise", "relative:0.1", "--n-inputs", 20, "--accuracy-draws", 0, "--json")
    rc, out, err = _cli(capsys, *args)
    assert rc == 0, err
    assert json.loads(out)["loss_increase_method"].startswith("gauss_newton")
    rc, out, err = _cli(capsys, *args, "--loss-probes", 8)
    assert rc == 0, err
    assert json.loads(out)["loss_probes"] == 8 and json.loads(out)["loss_increase_method"] == "hutchinson"


# ----------------------------------------------------------------------------
# C2, C3: --plot checked first; no folder, no missing extension
# ----------------------------------------------------------------------------
_PLOT_CMDS = {
    "drift": (cli_drift, ("predict_drift", "drift_sweep"), ["drift", "--times", "1,3600", "--draws", 0]),
    "sensitivity": (cli_sensitivity, ("sensitivity", "noise_budget", "keep_digital"),
                    ["sensitivity", "--noise", "relative:0.1"]),
}


@pytest.mark.parametrize("cmd", sorted(_PLOT_CMDS))
@pytest.mark.parametrize("plot, words", [
    ("/proc/nope/x.png", ["--plot '/proc/nope/x.png' cannot be written"]),
    ("{tmp}/fig.xyz", ["--plot", "matplotlib cannot write '.xyz' files", ".png", ".pdf"]),
    ("{tmp}/fig", ["--plot", "has no file extension", ".png"]),
    ("{tmp}", ["--plot", "is a folder", "figure.png"]),
])
def test_c2_c3_plot_checked_before_the_work(capsys, ckpt, tmp_path, monkeypatch, cmd, plot, words):
    module, work, argv = _PLOT_CMDS[cmd]
    _no_work(monkeypatch, module, *work)
    rc, out, err = _cli(capsys, *argv, "--model", ckpt, "--n-inputs", 20, "--json", "--plot",
                        plot.format(tmp=tmp_path))
    _one_line_error(rc, err, *words)
    assert out == "" and list(tmp_path.iterdir()) == []  # nothing written: no 'tmp.png', no 'fig.png'
    assert not (tmp_path.parent / (tmp_path.name + ".png")).exists()


@pytest.mark.parametrize("cmd", sorted(_PLOT_CMDS))
def test_c2_plot_into_a_new_folder_is_written_and_reported(capsys, ckpt, tmp_path, cmd):
    _, _, argv = _PLOT_CMDS[cmd]
    png = tmp_path / "new" / "sub" / "fig.pdf"
    rc, out, err = _cli(capsys, *argv, "--model", ckpt, "--n-inputs", 20, "--json", "--plot", png)
    assert rc == 0, err
    assert json.loads(out)["plot"] == str(png) and png.stat().st_size > 1000
    assert [p.name for p in png.parent.iterdir()] == ["fig.pdf"]  # no temporary file left beside it


def test_c3_library_figures_refuse_folders(problem, tmp_path):
    net, x, y = problem
    s = sensitivity(net, x, y, "relative:0.1")
    with pytest.raises(ValueError, match="path .* is a folder"):
        s.plot(tmp_path)
    with pytest.raises(ValueError, match="path .* has no file extension"):
        s.plot(tmp_path / "bars")
    with pytest.raises(ValueError, match="path .* is a folder"):
        cli_drift.drift_figure([], tmp_path)
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / (tmp_path.name + ".png")).exists()
    s.plot(tmp_path / "bars.svg")
    assert [p.name for p in tmp_path.iterdir()] == ["bars.svg"]


def test_c2_a_failed_figure_write_leaves_nothing(problem, tmp_path, monkeypatch):
    import matplotlib.figure

    net, x, y = problem
    s = sensitivity(net, x, y, "relative:0.1")

    def broken(self, fname, **kw):  # half a file, then the disk is full
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match="No space left"):
        s.plot(tmp_path / "bars.png")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# C4: --batch-size checked at the start of drift
# ----------------------------------------------------------------------------
def test_c4_drift_batch_size_checked_first(capsys, ckpt, monkeypatch):
    _no_work(monkeypatch, cli_drift, "load_model_and_data", "predict_drift", "drift_sweep")
    rc, out, err = _cli(capsys, "drift", "--model", ckpt, "--batch-size", 0, "--draws", 0, "--times", 1)
    _one_line_error(rc, err, "--batch-size must be an integer >= 1, got 0")


# ----------------------------------------------------------------------------
# C5: the largest valid --seed works with --budget-calibrate
# ----------------------------------------------------------------------------
def test_c5_calibrate_seed_is_derived_within_range():
    assert cli_sensitivity.calibrate_seed(0) == 1 and cli_sensitivity.calibrate_seed(41) == 42
    assert cli_sensitivity.calibrate_seed(SEED_MAX) == 0


def test_c5_largest_seed_with_budget_calibrate(capsys, trained_ckpt):
    rc, out, err = _cli(capsys, "sensitivity", "--model", trained_ckpt, "--n-inputs", 30, "--noise", "relative:0.1",
                        "--budget", 0.05, "--budget-calibrate", 4, "--seed", SEED_MAX, "--refine", "none", "--json")
    assert rc == 0, err
    b = json.loads(out)["budget"]
    assert b["calibrate_draws"] == 4 and b["level"] > 0


def test_c5_seed_out_of_range_refused_with_the_users_value(capsys, ckpt, monkeypatch):
    _no_work(monkeypatch, cli_sensitivity, "load_model_and_data", "sensitivity", "noise_budget")
    rc, out, err = _cli(capsys, "sensitivity", "--model", ckpt, "--noise", "relative:0.1", "--budget", 0.05,
                        "--budget-calibrate", 4, "--seed", SEED_MAX + 1)
    _one_line_error(rc, err, f"--seed must be an integer >= 0 and <= {SEED_MAX}, got {SEED_MAX + 1}")


# ----------------------------------------------------------------------------
# C6: messages name the flags, not the library's Python arguments
# ----------------------------------------------------------------------------
_C6 = [
    (["drift", "--prog-scale", -1, "--draws", 0], cli_drift, ("load_model_and_data", "predict_drift"),
     ["--prog-scale (PCMLike's prog_noise_scale) must be a finite number >= 0, got -1.0"]),
    (["drift", "--read-scale", "nan", "--draws", 0], cli_drift, ("load_model_and_data", "predict_drift"),
     ["--read-scale (PCMLike's read_noise_scale) must be a finite number >= 0, got nan"]),
    (["drift", "--drift-scale", "-0.5", "--draws", 0], cli_drift, ("load_model_and_data", "predict_drift"),
     ["--drift-scale (PCMLike's drift_scale) must be"]),
    (["drift", "--accuracy-draws", 1, "--draws", 0], cli_drift, ("load_model_and_data", "predict_drift"),
     ["--accuracy-draws must be 0 (no chip-to-chip spread) or an integer >= 2, got 1"]),
    (["drift", "--n-inputs", 0, "--draws", 0], cli_drift, ("load_model_and_data", "predict_drift"),
     ["--n-inputs must be an integer >= 1"]),
    (["predict", "--noise", "relative:0.1", "--accuracy-draws", 1], cli_predict, ("load_model_and_data", "predict"),
     ["--accuracy-draws must be"]),
    (["predict", "--noise", "relative:0.1", "--accuracy-draws", -3], cli_predict, ("load_model_and_data", "predict"),
     ["--accuracy-draws must be", "got -3"]),
    (["sensitivity", "--noise", "relative:0.1", "--keep-digital", 9], cli_sensitivity,
     ("sensitivity", "noise_budget", "keep_digital"),
     ["--keep-digital must be an integer in [1, 2]", "got 9", "3 noisy layers"]),
    (["sweep", "--noise", "stuck", "--levels", "0.1,2", "--draws", 2], cli_mc, ("load_model_and_data", "sweep"),
     ["--levels: 2 is not a level of 'stuck' noise", "p_zero", ">= 0 and <= 1, got 2.0"]),
    (["sweep", "--noise", "relative", "--levels", "0.1,-1", "--draws", 2], cli_mc, ("load_model_and_data", "sweep"),
     ["--levels must be finite and >= 0"]),
    (["sweep", "--noise", "relative", "--levels", "0.1", "--draws", 1], cli_mc, ("load_model_and_data", "sweep"),
     ["--draws must be an integer >= 2"]),
    (["mc", "--noise", "relative:0.1", "--draws", 1], cli_mc, ("load_model_and_data", "monte_carlo"),
     ["--draws must be an integer >= 2"]),
    (["mc", "--noise", "relative:0.1", "--draws", 2, "--targets", "bogus"], cli_mc, ("monte_carlo",),
     ["--targets 'bogus':", "accepted words"]),
]


@pytest.mark.parametrize("argv, module, work, words", _C6, ids=lambda v: " ".join(map(str, v))
                         if isinstance(v, list) and v and isinstance(v[0], str) and v[0][0] != "-" else None)
def test_c6_messages_name_the_flags(capsys, ckpt, monkeypatch, argv, module, work, words):
    _no_work(monkeypatch, module, *work)
    t0 = time.perf_counter()
    rc, out, err = _cli(capsys, argv[0], "--model", ckpt, *argv[1:])
    _one_line_error(rc, err, *words)
    assert err.startswith(f"noiseprop: error: {words[0].split()[0]}")  # the flag comes first
    for python_name in ("accuracy_draws", "np.float64", "got 9223"):
        assert python_name not in err
    assert time.perf_counter() - t0 < 30


def test_dataset_other_than_the_checkpoints_warns(capsys, ckpt):
    """--dataset naming another data set than the checkpoint's (whose inputs happen to fit
    the model) runs, but says so: the accuracy then measures nothing the model learned."""
    with pytest.warns(UserWarning, match="trained on 'digits'"):
        rc, out, err = _cli(capsys, "mc", "--model", ckpt, "--noise", "relative:0.1", "--draws", "2", "--dataset",
                            "teacher", "--no-progress")
    assert rc == 0
    # its own name, in any case: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        rc, out, err = _cli(capsys, "mc", "--model", ckpt, "--noise", "relative:0.1", "--draws", "2", "--dataset",
                            "DIGITS", "--no-progress")
    assert rc == 0
