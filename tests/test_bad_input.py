"""The bad-input table (issue 16): one test per row. Each asserts that the input is
refused (or, for absurd noise levels, flagged) with a message that names the argument,
file, layer or variable and what is accepted, before any long work starts; nothing is
silently wrong and nothing comes out as a traceback from deep inside.

Rows are grouped as the issue grouped them: silent results, tracebacks, unclear
messages, late failures. Every test is small (tiny models, the built-in digits)."""
import gzip
import json
import os
import pickle
import struct
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from noiseprop.empirical import monte_carlo, sweep
from noiseprop.empirical.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from noiseprop.empirical.cli import dumps, main
from noiseprop.empirical.data import DatasetFormatError, load_dataset, make_dataset
from noiseprop.empirical.executor import default_workers
from noiseprop.empirical.models import build_model, model_spec
from noiseprop.theory import (AdditiveGaussian, Multiplicative, PCMLike, RelativeGaussian, fold_bn, hessian_trace,
                              parse_noise, predict, predict_drift, predict_sweep, sensitivity)
from noiseprop.theory.targets import Targets
from noiseprop.theory.validation import (check_int, check_number, check_output_dir, check_output_file,
                                         check_probability, check_seed, env_int)

G = torch.Generator().manual_seed(0)
X = torch.randn(24, 1, 8, 8, generator=G)
Y = torch.randint(0, 4, (24,), generator=G)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _deep_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4)).eval()


def _conv_bn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 4))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture
def ckpt(tmp_path):
    spec = model_spec("mlp", (1, 8, 8), 10, width=16, depth=1)
    model = build_model(**spec, seed=0)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, spec, {"dataset": "digits"})
    return path


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err, *words):
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("noiseprop: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


# ----------------------------------------------------------------------------
# Silent wrong results
# ----------------------------------------------------------------------------
def test_mc_relative_1e30_is_refused():
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 0 and <= 1.84e\+19.*got 1e\+30"):
        monte_carlo(_mlp(), X, Y, "relative:1e30", draws=2)


def test_mc_nonfinite_results_are_flagged():
    with pytest.warns(RuntimeWarning, match="non-finite results.*level 1e\\+15: 2/2 draws"):
        r = monte_carlo(_deep_mlp(), X, Y, "additive:1e15", draws=2)
    assert r.extras["nonfinite_draws"] == 2
    # no accuracy from the argmax of NaN logits (it gave a number with a zero-width interval)
    assert np.isnan(r.accuracy) and np.isnan(r.accuracies).all() and np.isnan(r.accuracy_ci).all()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        s = sweep(_deep_mlp(), X, Y, "additive", [0.0, 1e15], draws=2, keep_logits=True)
    assert s.nonfinite_draws.tolist() == [0, 2]
    assert s.result(1).extras == {"nonfinite_draws": 2} and s.result(0).extras == {}
    assert np.isnan(s.to_frame()["accuracy"][1]) and not np.isnan(s.to_frame()["accuracy"][0])


def test_json_never_prints_bare_nan(capsys, tmp_path):
    spec = model_spec("mlp", (1, 8, 8), 10, width=16, depth=3)
    ckpt = tmp_path / "deep.pt"
    save_checkpoint(ckpt, build_model(**spec, seed=0), spec, {"dataset": "digits"})
    assert dumps({"a": float("nan"), "b": [float("inf"), 1.0], "c": np.float64("nan")}) == \
        '{"a": null, "b": [null, 1.0], "c": null}'
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc, out, err = _cli(capsys, "mc", "--model", ckpt, "--noise", "additive:1e18", "--draws", 2, "--json",
                            "--no-progress")
    assert rc == 0, err
    res = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert res["nonfinite_draws"] == 2 and res["loss"] is None


def test_batchnorm_negative_running_var_is_refused():
    m = _conv_bn()
    with torch.no_grad():
        m[1].running_var[2] = -0.5
    for call in (lambda: monte_carlo(m, X, Y, "relative:0.1", draws=2),
                 lambda: predict(m, X, Y, "relative:0.1", accuracy_draws=0, loss_probes=0)):
        with pytest.raises(ValueError, match="BatchNorm layer '1' has 1 negative running_var"):
            call()
    with pytest.raises(ValueError, match="fold_bn: layer '1'.*negative running_var"):
        fold_bn(m)


def _cifar_dir(tmp_path, labels):
    d = tmp_path / "cifar"
    d.mkdir()
    data = np.zeros((2, 3072), dtype=np.uint8)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / f, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels}, fh)
    return d


def test_cifar_float_labels_are_refused(tmp_path):
    d = _cifar_dir(tmp_path, np.array([0.7, 1.9]))
    with pytest.raises(DatasetFormatError, match=r"data_batch_1.*must hold integer class labels, got dtype float64"):
        load_dataset("cifar10", data_dir=d)


def _idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">i", s) for s in arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _mnist_dir(tmp_path, n_train=3, n_test=2, test_hw=28):
    d = tmp_path / "mnist"
    d.mkdir()
    _idx(d / "train-images-idx3-ubyte", np.zeros((n_train, 28, 28)))
    _idx(d / "train-labels-idx1-ubyte", np.zeros(n_train))
    _idx(d / "t10k-images-idx3-ubyte", np.zeros((n_test, test_hw, test_hw)))
    _idx(d / "t10k-labels-idx1-ubyte", np.zeros(n_test))
    return d


def test_mnist_mismatched_image_sizes_are_refused(tmp_path):
    d = _mnist_dir(tmp_path, test_hw=20)
    with pytest.raises(DatasetFormatError, match="training images are 1×28×28 but test images are 1×20×20"):
        load_dataset("mnist", data_dir=d)


@pytest.mark.parametrize("bad", [True, False, np.bool_(True), "0.1", b"1"])
def test_noise_level_bool_or_string_is_refused(bad):
    for cls, name in ((RelativeGaussian, "eta"), (AdditiveGaussian, "sigma"), (Multiplicative, "eta")):
        with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
            cls(bad)


def test_mc_follows_hooks_on_batchnorm():
    """Monte-Carlo evaluates what model(x) computes, hooks included: the BatchNorm of a
    hooked model is not folded (the fold would skip the hook)."""
    m = _conv_bn()
    h = m[1].register_forward_hook(lambda mod, inp, out: -3 * out)
    try:
        with torch.no_grad():
            ref = m(X).double()
        r = monte_carlo(m, X, Y, "relative:0.05", draws=2)
        torch.testing.assert_close(r.clean_logits, ref, rtol=1e-5, atol=1e-5)
        # and the noisy draws too: level 0 reproduces model(x) in every draw
        s = sweep(m, X, Y, "relative", [0.0, 0.05], draws=2, keep_logits=True)
        torch.testing.assert_close(s.logit_mean[0], ref, rtol=1e-5, atol=1e-5)
    finally:
        h.remove()
    # without hooks the folded fast path gives the same clean logits
    r2 = monte_carlo(m, X, Y, "relative:0.05", draws=2)
    with torch.no_grad():
        torch.testing.assert_close(r2.clean_logits, m(X).double(), rtol=1e-5, atol=1e-5)


def test_mc_follows_global_and_pre_hooks():
    m = _conv_bn()
    h = m[1].register_forward_pre_hook(lambda mod, inp: (inp[0] * 2,))
    try:
        with torch.no_grad():
            ref = m(X).double()
        r = monte_carlo(m, X, Y, "relative:0.05", draws=2)
        torch.testing.assert_close(r.clean_logits, ref, rtol=1e-5, atol=1e-5)
    finally:
        h.remove()


def test_hardware_noise_refused_where_a_level_scales_one_pass():
    """Predictor and predict_sweep rescale one derivative pass by the level: a PCM model's
    time is no such scale (this once gave 0.33 where predict gave 0.93); and predict's
    knobs that hardware noise cannot honour are refused, not ignored."""
    from noiseprop.theory import PCMLike, Predictor, predict_sweep

    m = _mlp()
    nz = PCMLike(t=3600.0)
    with pytest.raises(ValueError, match="PCMLike noise has a non-zero mean.*predict_drift"):
        Predictor(m, X, Y).predict(nz)
    with pytest.raises(TypeError, match="predict_sweep needs a Gaussian noise family.*predict_drift"):
        predict_sweep(m, X, Y, nz, [1.0, 10.0])
    with pytest.raises(ValueError, match="non-zero mean"):
        Predictor(m, X, Y).sweep(nz, [1.0, 10.0])
    for kw in ({"classes": 2}, {"per_layer": True}, {"loss_probes": 4}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} not available for non-zero-mean hardware noise"):
            predict(m, X, Y, nz, **kw)
    assert 0 <= predict(m, X, Y, nz).accuracy <= 1


# ----------------------------------------------------------------------------
# Tracebacks from deep inside
# ----------------------------------------------------------------------------
def test_cli_noise_relative_1e300(capsys, ckpt):
    rc, out, err = _cli(capsys, "mc", "--model", ckpt, "--noise", "relative:1e300", "--draws", 2)
    _one_line_error(rc, err, "noise 'relative:1e300'", "eta must be a finite number")


def test_predict_additive_1e200():
    with pytest.raises(ValueError, match=r"noise 'additive:1e200': sigma must be a finite number >= 0 and <= 1.84e\+19"):
        predict(_mlp(), X, Y, "additive:1e200")


def test_cli_predict_additive_1e200(capsys, ckpt):
    rc, out, err = _cli(capsys, "predict", "--model", ckpt, "--noise", "additive:1e200")
    _one_line_error(rc, err, "sigma must be")


def test_noise_level_overflowing_float_is_refused():
    with pytest.raises(ValueError, match="noise 'relative:1e400'.*got inf"):
        parse_noise("relative:1e400")


def test_study_etas_1e30_refused_before_work(capsys, tmp_path):
    t0 = time.perf_counter()
    rc, out, err = _cli(capsys, "study", "batchnorm", "--quick", "--etas", 0, 1e30, "--cache-dir", tmp_path / "c")
    _one_line_error(rc, err, "etas must be <=")
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "c" / "cells").exists() or not any((tmp_path / "c" / "cells").rglob("*.json"))


@pytest.mark.parametrize("text", ["hello, this is not a checkpoint\n", "101", ""])
def test_text_file_checkpoint(tmp_path, capsys, text):
    p = tmp_path / "notes.pt"
    p.write_text(text)
    with pytest.raises(CheckpointError, match="could not be read.*not a torch.save file"):
        load_checkpoint(p)
    rc, out, err = _cli(capsys, "mc", "--model", p, "--noise", "relative:0.1", "--draws", 2)
    _one_line_error(rc, err, "notes.pt", "could not be read")


def test_corrupt_mnist_gz(tmp_path):
    d = _mnist_dir(tmp_path)
    (d / "t10k-labels-idx1-ubyte").unlink()
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 10)
    with pytest.raises(DatasetFormatError, match="t10k-labels-idx1-ubyte.gz.*not a valid gzip-compressed idx file"):
        load_dataset("mnist", data_dir=d)


def test_mnist_zero_images(tmp_path):
    d = _mnist_dir(tmp_path, n_test=0)
    with pytest.raises(DatasetFormatError, match="mnist: the test set has 0 images"):
        load_dataset("mnist", data_dir=d)


def test_make_dataset_zero_images():
    with pytest.raises(DatasetFormatError, match="training set has 0 images"):
        make_dataset(np.zeros((0, 1, 2, 2)), np.zeros(0, dtype=int), np.zeros((1, 1, 2, 2)), np.zeros(1, dtype=int),
                     num_classes=2)


def test_checkpoint_spec_width_2_40(tmp_path, capsys, ckpt):
    obj = torch.load(ckpt, weights_only=True)
    obj["spec"]["width"] = 2 ** 40
    bad = tmp_path / "huge.pt"
    torch.save(obj, bad)
    with pytest.raises(CheckpointError, match=r"huge.pt.*(does not match its spec|does not build)"):
        load_checkpoint(bad)
    rc, out, err = _cli(capsys, "mc", "--model", bad, "--noise", "relative:0.1", "--draws", 2)
    _one_line_error(rc, err, "huge.pt")


def test_checkpoint_spec_that_does_not_build(tmp_path):
    spec = model_spec("mlp", (1, 8, 8), 10, width=16, depth=1)
    bad = tmp_path / "bad.pt"
    with pytest.raises(ValueError, match="spec does not build a model"):  # refused before writing
        save_checkpoint(bad, build_model(**spec), dict(spec, name="nonsense"), {})
    assert not bad.exists()
    save_checkpoint(bad, build_model(**spec), spec, {})  # a file written elsewhere, its spec edited
    payload = torch.load(bad, weights_only=True)
    payload["spec"]["name"] = "nonsense"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match="bad.pt.*spec that does not build"):
        load_checkpoint(bad)


class _Returns(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.lin = nn.Linear(64, 4)
        self.kind = kind

    def forward(self, x):
        z = self.lin(x.flatten(1))
        return (z, z.sum()) if self.kind == "tuple" else {"logits": z}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_model_returning_tuple_or_dict(kind):
    with pytest.raises(TypeError, match=f"must return one tensor of logits shaped \\[N, C\\]; it returned a {kind}"):
        monte_carlo(_Returns(kind), X, Y, "relative:0.1", draws=2)
    from noiseprop.theory import hessian_top_eigenvalue, hessian_trace

    for curvature in (hessian_trace, hessian_top_eigenvalue):  # a raw AttributeError before
        with pytest.raises(TypeError, match=f"must return one tensor of logits.*returned a {kind}"):
            curvature(_Returns(kind), X, Y)


# ----------------------------------------------------------------------------
# Unclear messages
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("x, what", [
    (torch.randn(24, 50), "shapes cannot be multiplied"),
    (torch.randn(24, 3, 8, 8), "shapes cannot be multiplied"),
])
def test_x_wrong_shape_for_model(x, what):
    with pytest.raises(ValueError, match=f"x does not fit the model: .*{what}"):
        monte_carlo(_mlp(), x, Y, "relative:0.1", draws=2)


def test_x_wrong_channels_for_conv_model():
    with pytest.raises(ValueError, match="x does not fit the model: .*expected input.*to have 1 channels"):
        monte_carlo(_conv_bn(), torch.randn(24, 3, 8, 8), Y, "relative:0.1", draws=2)


def test_x_wrong_dtype_for_model():
    for call in (lambda: monte_carlo(_mlp(), X.double(), Y, "relative:0.1", draws=2),
                 lambda: predict(_mlp(), X.double(), Y, "relative:0.1")):
        with pytest.raises(TypeError, match="x does not fit the model: x has dtype torch.float64 but the model's "
                                            "parameters are torch.float32"):
            call()


def test_model_on_meta_device():
    m = _mlp().to("meta")
    for call in (lambda: monte_carlo(m, X, Y, "relative:0.1", draws=2),
                 lambda: predict(m, X, Y, "relative:0.1")):
        with pytest.raises(ValueError, match="model parameter '1.weight' is on the 'meta' device"):
            call()


def test_seed_2_70():
    with pytest.raises(ValueError, match="seed must be an integer >= 0 and <= 9223372036854775807, got "
                                         "1180591620717411303424"):
        monte_carlo(_mlp(), X, Y, "relative:0.1", draws=2, seed=2 ** 70)


@pytest.mark.parametrize("bad", ["0.9", 1.5, 0, float("nan"), True])
def test_confidence_not_a_probability(bad):
    with pytest.raises((TypeError, ValueError), match="confidence must be a finite number > 0 and < 1"):
        monte_carlo(_mlp(), X, Y, "relative:0.1", draws=2, confidence=bad)


def test_targets_unknown_key():
    with pytest.raises(ValueError, match=r"targets: unknown option\(s\) \['foo'\]; accepted keys: \['weights'"):
        monte_carlo(_mlp(), X, Y, "relative:0.1", draws=2, targets={"foo": 1})
    with pytest.raises(TypeError, match="targets: 'biases' must be True or False"):
        Targets.parse({"biases": "yes"})


def test_fold_bn_of_a_string():
    with pytest.raises(TypeError, match="fold_bn: model must be a torch.nn.Module, got str"):
        fold_bn("model")


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_noiseprop_workers_env(monkeypatch, value):
    monkeypatch.setenv("NOISEPROP_WORKERS", value)
    with pytest.raises(ValueError, match=f"environment variable NOISEPROP_WORKERS='{value}'"):
        default_workers()


def test_draws_not_an_integer():
    with pytest.raises(TypeError, match="draws must be an integer >= 2, got float 3.0"):
        monte_carlo(_mlp(), X, Y, "relative:0.1", draws=3.0)


def test_sweep_levels_not_numbers():
    with pytest.raises(ValueError, match="levels must be a sequence of numbers"):
        sweep(_mlp(), X, Y, "relative", ["a", "b"], draws=2)
    with pytest.raises(ValueError, match="levels must be finite and >= 0 and <= 1.84e\\+19"):
        sweep(_mlp(), X, Y, "relative", [0.0, 1e30], draws=2)


def test_scalar_validators_name_the_argument():
    with pytest.raises(TypeError, match="n must be an integer >= 1, got bool True"):
        check_int("n", True, 1)
    with pytest.raises(ValueError, match="n must be an integer >= 1 and <= 5, got 9"):
        check_int("n", 9, 1, 5)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got inf"):
        check_number("lr", float("inf"), 0, open_min=True)
    with pytest.raises(ValueError, match=r"x must be a finite number, got 1000.*\(too large for a float\)"):
        check_number("x", 10 ** 400)
    with pytest.raises(TypeError, match="p must be a finite number > 0 and < 1, got str"):
        check_probability("p", "0.5")
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        check_seed("seed", -1)
    assert check_probability("p", 0.5) == 0.5 and check_seed("s", 2 ** 63 - 1) == 2 ** 63 - 1


def test_env_int(monkeypatch):
    monkeypatch.delenv("NOISEPROP_TEST_INT", raising=False)
    assert env_int("NOISEPROP_TEST_INT", 7) == 7
    monkeypatch.setenv("NOISEPROP_TEST_INT", " 3 ")
    assert env_int("NOISEPROP_TEST_INT") == 3


# ----------------------------------------------------------------------------
# Late failures: refused before the work starts
# ----------------------------------------------------------------------------
def _train_args(out, cache):
    return ("train", "--model", "mlp", "--epochs", 1, "--out", out, "--cache-dir", cache, "--quiet")


def test_train_out_is_a_folder(tmp_path, capsys):
    rc, out, err = _cli(capsys, *_train_args(tmp_path, tmp_path / "cache"))
    _one_line_error(rc, err, "--out", "is a folder")
    assert not (tmp_path / "cache").exists()  # nothing was trained


def test_train_out_under_a_file(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    rc, out, err = _cli(capsys, *_train_args(f / "m.pt", tmp_path / "cache"))
    _one_line_error(rc, err, "--out", "is a file, not a folder")
    assert not (tmp_path / "cache").exists()


def test_train_out_unwritable(tmp_path, capsys):
    rc, out, err = _cli(capsys, *_train_args("/proc/noiseprop-test/m.pt", tmp_path / "cache"))
    _one_line_error(rc, err, "--out", "cannot be written")
    assert not (tmp_path / "cache").exists()


def test_report_cache_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "cache.txt"
    f.write_text("x")
    rc, out, err = _cli(capsys, "report", "--quick", "--out", tmp_path / "r", "--cache-dir", f, "--no-progress")
    _one_line_error(rc, err, "--cache-dir", "is a file")
    assert not (tmp_path / "r").exists()


def test_report_out_with_foreign_files(tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    rc, out, err = _cli(capsys, "report", "--quick", "--out", d, "--cache-dir", tmp_path / "c", "--no-progress")
    _one_line_error(rc, err, "--out", "thesis.tex", "not part of a report")
    assert (d / "thesis.tex").read_text() == "precious"


def test_study_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "out.txt"
    f.write_text("x")
    rc, out, err = _cli(capsys, "study", "batchnorm", "--quick", "--out", f, "--cache-dir", tmp_path / "c")
    _one_line_error(rc, err, "--out", "is a file")


def test_output_checks_accept_good_paths(tmp_path):
    assert check_output_file(tmp_path / "new" / "m.pt") == tmp_path / "new" / "m.pt"
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert not [p for p in tmp_path.iterdir()]


def test_mc_follows_a_forward_replaced_on_the_instance():
    m = _conv_bn()
    bn = m[1]
    plain = type(bn).forward
    bn.forward = lambda inp: plain(bn, inp) + 1.0  # not BatchNorm any more: must not be folded
    with torch.no_grad():
        ref = m(X).double()
    r = monte_carlo(m, X, Y, "relative:0.05", draws=2)
    torch.testing.assert_close(r.clean_logits, ref, rtol=1e-5, atol=1e-5)


def test_report_out_with_hidden_foreign_files(tmp_path, capsys):
    d = tmp_path / "rep"
    (d / ".git").mkdir(parents=True)
    (d / "report.md").write_text("old")
    rc, out, err = _cli(capsys, "report", "--quick", "--out", d, "--cache-dir", tmp_path / "c", "--no-progress")
    _one_line_error(rc, err, "--out", ".git")
    assert (d / ".git").is_dir()


@pytest.mark.parametrize("cmd", [["mc", "--noise", "relative:0.1"], ["predict", "--noise", "relative:0.1"]])
def test_cli_seed_2_70(capsys, ckpt, cmd):
    rc, out, err = _cli(capsys, *cmd, "--model", ckpt, "--seed", 2 ** 70)
    _one_line_error(rc, err, "--seed must be an integer >= 0 and <= 9223372036854775807")


@pytest.mark.parametrize("bad", [[True], ["10"], [[1.0, 2.0]], [1.0, [2.0]], "3600", None])
def test_times_and_levels_are_flat_numbers(bad):
    """Booleans, strings and nested sequences are neither times nor levels (they were
    converted silently: [True] became one second)."""
    from noiseprop.theory.validation import check_levels, check_times

    with pytest.raises(ValueError, match="times must be seconds since programming"):
        check_times(bad)
    with pytest.raises(ValueError, match="levels must be a sequence of numbers >= 0"):
        check_levels(bad)
    assert check_times((0, 3600.0)).tolist() == [0.0, 3600.0] and check_levels(np.float32(0.5)).tolist() == [0.5]


_PROBABILITY_CALLS = {
    "predict": lambda m: predict(m, X, Y, RelativeGaussian(0.1), accuracy_draws=0),
    "predict_sweep": lambda m: predict_sweep(m, X, Y, "relative", [0.1]),
    "predict_drift": lambda m: predict_drift(m, X, Y, PCMLike(), [1.0], accuracy_draws=0),
    "sensitivity": lambda m: sensitivity(m, X, Y, RelativeGaussian(0.1)),
    "hessian_trace": lambda m: hessian_trace(m, X, Y, probes=4),
    "monte_carlo": lambda m: monte_carlo(m, X, Y, RelativeGaussian(0.1), draws=3, progress=False),
    "sweep": lambda m: sweep(m, X, Y, "relative", [0.1], draws=3, progress=False),
}


@pytest.mark.parametrize("call", sorted(_PROBABILITY_CALLS))
def test_softmax_outputs_are_flagged_once_at_the_callers_line(call):
    """A model ending in Softmax returns probabilities, which every entry point would
    treat as logits (the predicted loss increase on the test net was 11 times too small,
    the accuracy 0.3 points off): one warning per call, pointing at the caller's line; a
    cached pass warns too (predict_sweep after predict); LogSoftmax outputs are logits
    and do not warn."""
    probs = nn.Sequential(_mlp(), nn.Softmax(1)).eval()
    _PROBABILITY_CALLS["predict"](probs)  # fills the derivative cache for predict_sweep
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _PROBABILITY_CALLS[call](probs)
        _PROBABILITY_CALLS[call](nn.Sequential(_mlp(), nn.LogSoftmax(1)).eval())
    hits = [w for w in rec if "probabilities" in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in hits]
    assert hits[0].filename == __file__ and "Remove the final Softmax" in str(hits[0].message)


def test_targets_layers_must_each_select_something():
    """A typo in ``layers`` narrowed the noise silently (``["0", "3"]`` gave the result
    of ``["0"]``); a layer without weights likewise. ``layers=5`` was "'int' object is
    not iterable"; ``"fold_bn"`` alone now means the default weights, folded."""
    net = _mlp()
    with pytest.raises(ValueError, match=r"layers names '9'.*no module of that name.*\['1', '3'\]"):
        predict(net, X, Y, "relative:0.1", targets={"layers": ["1", "9"]})
    with pytest.raises(ValueError, match=r"layers names '2'.*ReLU has no weights"):
        monte_carlo(net, X, Y, RelativeGaussian(0.1), targets=Targets(layers=("1", "2")), draws=2, progress=False)
    with pytest.raises(TypeError, match="layers must be a module name or a non-empty list"):
        Targets(layers=5)
    with pytest.raises(TypeError, match="layers must be"):
        Targets(layers=[])
    assert Targets.parse("fold_bn") == Targets(fold_bn=True)


def test_hardware_noise_checks_its_switches_and_seed():
    """The hardware path took ``cov="no"`` as true, accepted ``cache="no"``, and passed
    seed 2**64 to torch ("Overflow when unpacking long long")."""
    net = _mlp()
    for call in (lambda: predict(net, X, Y, "pcm:3600", cov="no"),
                 lambda: predict_drift(net, X, Y, PCMLike(), [1.0], cov="no")):
        with pytest.raises(TypeError, match="cov must be True or False"):
            call()
    with pytest.raises(TypeError, match="cache must be True or False"):
        predict(net, X, Y, "pcm:3600", cache="no")
    for call in (lambda: predict(net, X, Y, "pcm:3600", seed=2 ** 64),
                 lambda: predict_drift(net, X, Y, PCMLike(), [1.0], seed=2 ** 64)):
        with pytest.raises(ValueError, match="seed must be"):
            call()


class _TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp()

    def forward(self, x):
        return self.body(x), x


def test_hardware_noise_says_when_x_does_not_fit():
    """Inputs that do not fit, and a model returning a tuple, raised torch's errors on
    the hardware path; the Gaussian path's messages now."""
    net = _mlp()
    for call in (lambda: predict(net, X[:, :, :4], Y, "pcm:3600"),
                 lambda: predict_drift(net, X[:, :, :4], Y, PCMLike(), [1.0])):
        with pytest.raises(ValueError, match="x does not fit the model"):
            call()
    with pytest.raises(TypeError, match="returned a tuple of 2 items"):
        predict_drift(_TupleNet().eval(), X, Y, PCMLike(), [1.0])


def test_overflowing_drift_is_refused_not_a_cholesky_error():
    """drift_scale=1000 at 10⁸ s overflows the compensation factor: a LinAlgError from
    the Cholesky factorisation before (and NaN variances from the noise model itself), a
    message naming the noise model now."""
    noise = PCMLike(t=1e8, drift_scale=1e3)
    for call in (lambda: predict(_mlp(), X, Y, noise), lambda: noise.variance(torch.randn(8, 8)),
                 lambda: predict_drift(_mlp(), X, Y, PCMLike(drift_scale=1e3), [1.0, 1e8])):
        with pytest.raises(ValueError, match=r"pcm:1e\+08,drift=1000: the drift-compensation factor overflows"):
            call()


def test_sweep_checks_every_level_before_drawing():
    """A level the family does not take (2.5 bits, a stuck fraction of 2) was refused
    only when the run reached it."""
    for fam, levels, what in (("quantized", [4, 2.5], "bits must be an integer"), ("stuck", [0.1, 2], "p_zero")):
        with pytest.raises(ValueError, match=f"levels: {levels[1]:g} is not a level of '{fam}' noise: {what}"):
            sweep(_mlp(), X, Y, fam, levels, draws=2, progress=False)


def test_predictor_holds_its_own_inputs():
    """A change to the caller's x in place reached a Predictor, which had hashed x once:
    a stale result for the family it had, and a new family's result stamped with the old
    inputs' fingerprint."""
    from noiseprop.theory import Predictor

    x = X.clone()
    pr = Predictor(_mlp(), x, Y)
    a = pr.predict("relative:0.1")
    x.mul_(5)
    b, c = pr.predict("relative:0.1"), pr.predict("additive:0.01")
    assert a.accuracy == b.accuracy
    assert c.inputs_fingerprint == a.inputs_fingerprint
    assert c.accuracy == predict(_mlp(), X, Y, "additive:0.01").accuracy


def test_prediction_sizes_are_bounded():
    """n_points=2**34 and accuracy_draws=10**9 were accepted and ran out of memory inside
    scipy or torch."""
    for kw, name in (({"n_points": 2 ** 34}, "n_points"), ({"accuracy_draws": 10 ** 9}, "accuracy_draws")):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= .* and <= 16384"):
            predict(_mlp(), X, Y, "relative:0.1", **kw)
        with pytest.raises(ValueError, match=f"{name} must be"):
            predict_drift(_mlp(), X, Y, PCMLike(), [1.0], **kw)


def test_one_dimensional_x_and_batch_statistics_norm():
    """1-D x raised torch's IndexError from Flatten; a BatchNorm without running
    statistics raised torch's 'Expected more than 1 value per channel' (predict) or was
    blamed on fold_bn (monte_carlo)."""
    for call in (lambda: predict(_mlp(), X[:4, 0, 0, 0], Y[:4], "relative:0.1"),
                 lambda: monte_carlo(_mlp(), X[:4, 0, 0, 0], Y[:4], RelativeGaussian(0.1), draws=2, progress=False)):
        with pytest.raises(ValueError, match=r"x must be a batch of inputs \[N, ...\].*got shape \(4,\)"):
            call()
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(),
                        nn.Linear(8, 4)).eval()
    for call in (lambda: predict(net, X, Y, "relative:0.1"),
                 lambda: monte_carlo(net, X, Y, RelativeGaussian(0.1), draws=2, progress=False)):
        with pytest.raises(ValueError, match="track_running_stats=False"):
            call()


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat, self.a, self.b = nn.Flatten(), nn.Linear(64, 64), nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(self.flat(x))))))


def test_tied_weights_and_fold_pairs():
    """Tied weights were 'not registered parameters' (and with one of the layers alone
    the tap-based pass would miss the other use); fold_bn(pairs=...) raised torch's
    AttributeError for a missing layer, an unpack error for a string, and silently folded
    into a layer that does not feed the norm; fold_bn on a GroupNorm model was silent."""
    for targets in (None, {"layers": ["a"]}):
        with pytest.raises(ValueError, match="tied weights: a.weight = b.weight"):
            predict(_Tied().eval(), X, Y, "relative:0.1", targets=targets)
    # a weight registered as another module's buffer: the substitute would reach one use only
    tied_buf = _Tied().eval()
    del tied_buf.b.weight
    tied_buf.b.register_buffer("weight", tied_buf.a.weight)
    with pytest.raises(ValueError, match="tied weights: a.weight = b.weight"):
        predict(tied_buf, X, Y, "relative:0.1")
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.ReLU()).eval()
    for pairs, err in (([("9", "2")], ValueError), ([("3", "2")], ValueError), ("1,2", TypeError)):
        with pytest.raises(err, match=r"fold_bn: pairs .*\[\('1', '2'\)\]"):
            fold_bn(net, pairs=pairs)
    gn = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.GroupNorm(2, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with pytest.warns(UserWarning, match="no BatchNorm layer .* to fold .*GroupNorm"):
        monte_carlo(gn, X, Y, RelativeGaussian(0.1), targets="fold_bn", draws=2, progress=False)


def test_predictor_checks_its_inputs_at_construction():
    """x that does not fit, and labels outside the logits, were refused only at the first
    .predict()."""
    from noiseprop.theory import Predictor

    with pytest.raises(ValueError, match="x does not fit the model"):
        Predictor(_mlp(), X[:, :, :4], Y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        Predictor(_mlp(), X, Y + 4)


def test_x_that_does_not_fit_is_quoted_with_the_callers_shape():
    """The entry points probe the model on the first input; the message quoted the probe's
    shape (1, ...) instead of the batch the caller gave."""
    from noiseprop.theory import Predictor, noise_budget

    net, x = _mlp(), X[:, :, :4]
    calls = {
        "predict": lambda: predict(net, x, Y, "relative:0.1"),
        "predict pcm": lambda: predict(net, x, Y, "pcm:3600"),
        "predict_sweep": lambda: predict_sweep(net, x, Y, "relative", [0.1]),
        "predict_drift": lambda: predict_drift(net, x, Y, PCMLike(), [1.0]),
        "hessian_trace": lambda: hessian_trace(net, x, Y, probes=2),
        "sensitivity": lambda: sensitivity(net, x, Y, "relative:0.1"),
        "noise_budget": lambda: noise_budget(net, x, Y, "relative"),
        "Predictor": lambda: Predictor(net, x, Y),
        "monte_carlo": lambda: monte_carlo(net, x, Y, "relative:0.1", draws=2),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match=r"x does not fit the model: .*shape \(24, 1, 4, 8\)"):
            call()


def test_predictor_of_a_softmax_model_warns_once():
    """A Predictor probes the model at construction and warns there; its calls (a fresh
    pass, a cached one, a sweep) warned again each."""
    from noiseprop.theory import Predictor

    probs = nn.Sequential(_mlp(), nn.Softmax(1)).eval()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pr = Predictor(probs, X, Y)
        pr.predict("relative:0.1")
        pr.predict("relative:0.2")
        pr.sweep("relative", [0.1, 0.2])
    hits = [w for w in rec if "probabilities" in str(w.message)]
    assert len(hits) == 1 and hits[0].filename == __file__, [(str(w.message), w.filename) for w in hits]
    with warnings.catch_warnings(record=True) as rec:  # other warnings of the calls still reach the caller
        warnings.simplefilter("always")
        pr.predict("relative:5.0")
    assert any("first order" in str(w.message) for w in rec), [str(w.message) for w in rec]
