"""predict's calling convention (issue 15): the method knobs grouped in PredictOptions
(old keywords still accepted, never both ways), and to_frame() with one meaning on
sibling results (one row per noise setting; per_input_frame() per input and class)."""
import inspect
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from noiseprop.empirical import monte_carlo, sweep
from noiseprop.theory import Prediction, predict, predict_sweep
from noiseprop.theory.examples import tiny_problem
from noiseprop.theory import PredictOptions
from noiseprop.theory.hardware import Quantized
from noiseprop.theory.predict import OPTION_NAMES, Predictor

NET, X, Y = tiny_problem()
KNOBS = dict(accuracy_draws=8, loss_probes=4, n_points=512, chunk_size=16, batch_size=32)


def test_signature_reads_at_a_glance():
    sig = inspect.signature(predict)
    named = [n for n, p in sig.parameters.items() if p.kind is not p.VAR_KEYWORD]
    assert named == ["model", "x", "y", "noise", "targets", "method", "options", "cov", "seed", "classes",
                     "per_layer", "diagnostic", "cache"]
    assert all(sig.parameters[n].kind is inspect.Parameter.KEYWORD_ONLY for n in named[5:])
    assert set(OPTION_NAMES) == {"accuracy_draws", "loss_increase", "loss_probes", "n_points", "chunk_size",
                                 "batch_size", "rank", "spatial_rank", "h2_rank", "moment_chunk"}


def _same(a: Prediction, b: Prediction):
    torch.testing.assert_close(a.logit_var, b.logit_var, rtol=0, atol=0)
    assert (a.accuracy, a.accuracy_std, a.loss_increase, a.loss_increase_se, a.loss_probes) == \
        (b.accuracy, b.accuracy_std, b.loss_increase, b.loss_increase_se, b.loss_probes)
    assert a.accuracy_std_draws == 8 and a.loss_probes == 4


def test_options_object_and_old_keywords_give_the_same_result():
    opts = PredictOptions(**KNOBS)
    _same(predict(NET, X, Y, "relative:0.1", options=opts, seed=3, cache=False),
          predict(NET, X, Y, "relative:0.1", seed=3, cache=False, **KNOBS))
    _same(predict(NET, X, Y, "relative:0.1", options=dict(KNOBS), seed=3, cache=False),  # a dict of its fields
          predict(NET, X, Y, "relative:0.1", seed=3, cache=False, **KNOBS))
    a = predict_sweep(NET, X, Y, "relative", [0.1, 0.2], options=opts, seed=3, cache=False)
    b = predict_sweep(NET, X, Y, "relative", [0.1, 0.2], seed=3, cache=False, **KNOBS)
    for p, q in zip(a.predictions, b.predictions):
        _same(p, q)
    _same(Predictor(NET, X, Y, options=opts, seed=3).predict("relative:0.2"), b.predictions[1])
    _same(Predictor(NET, X, Y, seed=3, **KNOBS).predict("relative:0.2"), b.predictions[1])
    assert Predictor(NET, X, Y, **KNOBS).options == opts


def test_options_conflicts_and_bad_values_are_named():
    with pytest.raises(ValueError, match=r"predict\(\): accuracy_draws given both in options= and as keyword"):
        predict(NET, X, Y, "relative:0.1", options=PredictOptions(), accuracy_draws=8)
    with pytest.raises(ValueError, match=r"predict_sweep\(\): n_points given both"):
        predict_sweep(NET, X, Y, "relative", [0.1], options=PredictOptions(), n_points=64)
    with pytest.raises(ValueError, match=r"Predictor\(\): rank given both"):
        Predictor(NET, X, Y, options=PredictOptions(), rank=4)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['n_point'\]; the method options are"):
        predict(NET, X, Y, "relative:0.1", n_point=64)
    with pytest.raises(TypeError, match="options must be a PredictOptions, a dict of its fields, or None; got str"):
        predict(NET, X, Y, "relative:0.1", options="fast")
    with pytest.raises(ValueError, match="n_points must be an integer >= 16 and <= 16384, got 8"):
        PredictOptions(n_points=8)
    with pytest.raises(TypeError, match="chunk_size must be an integer >= 1 or None, got float 2.0"):
        PredictOptions(chunk_size=2.0)
    with pytest.raises(ValueError, match="loss_increase must be one of"):
        PredictOptions(loss_increase="exact")
    with pytest.raises(TypeError, match="cache must be True or False"):
        predict(NET, X, Y, "relative:0.1", cache="yes")
    with pytest.raises(TypeError):  # keyword-only after targets
        predict(NET, X, Y, "relative:0.1", None, "linear")


def test_h2_rank_reaches_the_moment_propagation_and_is_checked():
    p = predict(NET, X, Y, "relative:0.2", method="moments", h2_rank=0, cache=False)
    assert p.diagnostics["h2_rank"] == 0
    c = predict_sweep(NET, X, Y, "relative", [0.1, 0.2], method="moments", options=PredictOptions(h2_rank=3),
                      cache=False)
    assert [q.diagnostics["h2_rank"] for q in c.predictions] == [3, 3]
    with pytest.raises(ValueError, match="h2_rank must be an integer >= 0, got -1"):
        PredictOptions(h2_rank=-1)
    with pytest.raises(ValueError, match="h2_rank not available for non-zero-mean hardware noise"):
        predict(NET, X, Y, Quantized(bits=8), h2_rank=0)


SHARED = {"level", "accuracy", "clean_accuracy", "loss", "clean_loss", "loss_increase", "mean_logit_var",
          "mean_abs_logit_shift"}


def test_to_frame_has_one_meaning_on_siblings():
    p = predict(NET, X, Y, "relative:0.1", diagnostic=False)
    mc = monte_carlo(NET, X, Y, "relative:0.1", draws=6, seed=0, progress=False)
    fp, fm = p.to_frame(), mc.to_frame()
    assert len(fp) == len(fm) == 1 and SHARED <= set(fp.columns) & set(fm.columns)
    assert fp.level[0] == fm.level[0] == 0.1
    assert fp.accuracy[0] == p.accuracy and fm.accuracy[0] == mc.accuracy
    assert fm.loss_increase[0] == pytest.approx(mc.loss - mc.clean_loss)
    assert fp.loss[0] == pytest.approx(p.clean_loss + p.loss_increase)
    # per input and class: the shared per-element columns, aligned row by row
    ep, em = p.per_input_frame(), mc.per_input_frame()
    assert len(ep) == len(em) == 64 * 3
    common = ["input", "cls", "clean_logit", "logit_mean", "logit_var", "logit_shift"]
    assert set(common) <= set(ep.columns) & set(em.columns)
    pd.testing.assert_frame_equal(ep[["input", "cls"]], em[["input", "cls"]])
    np.testing.assert_allclose(ep.clean_logit, em.clean_logit, rtol=1e-5, atol=1e-6)

    curve = predict_sweep(NET, X, Y, "relative", [0.1, 0.3], diagnostic=False)
    sw = sweep(NET, X, Y, "relative", [0.1, 0.3], draws=6, seed=0, keep_logits=True, progress=False)
    fc, fs = curve.to_frame(), sw.to_frame()
    assert list(fc.level) == list(fs.level) == [0.1, 0.3]
    assert SHARED <= set(fc.columns) & set(fs.columns)
    # a curve's row is its prediction's row; a sweep's row is its MCResult's row
    pd.testing.assert_frame_equal(fc.iloc[[1]].reset_index(drop=True)[sorted(SHARED)],
                                  curve.predictions[1].to_frame()[sorted(SHARED)])
    row = sw.result(0).to_frame()
    for c in SHARED:
        assert fs[c][0] == pytest.approx(row[c][0]), c
    # a drift curve and its simulation: one row per time, the same names (and time_s)
    from noiseprop.empirical import drift_sweep
    from noiseprop.theory import PCMLike, predict_drift

    d = predict_drift(NET, X, Y, PCMLike(), [1.0, 3600.0], diagnostic=False)
    ds = drift_sweep(NET, X, Y, PCMLike(), [1.0, 3600.0], draws=4, seed=0, keep_logits=True, progress=False)
    fd, fds = d.to_frame(), ds.to_frame()
    assert SHARED | {"time_s"} <= set(fd.columns) & set(fds.columns)
    assert list(fd.level) == list(fds.level) == list(fd.time_s) == [1.0, 3600.0]
    assert fd.loss[0] == pytest.approx(fd.clean_loss[0] + fd.loss_increase[0])


def test_logit_loss_is_computed_when_first_read(monkeypatch):
    """``loss_increase_logits`` (an extra: a QMC integral per level) is not paid for by a
    ``predict`` call that does not read it; read, it is the Gaussian-logit value, and the
    levels of a sweep share its level-independent projections."""
    import importlib

    P = importlib.import_module("noiseprop.theory.predict")  # the module, not the function
    net, x, y = tiny_problem()
    made, evaluated = [], []
    init, at = P._LogitLoss.__init__, P._LogitLoss.at
    monkeypatch.setattr(P._LogitLoss, "__init__", lambda self, *a, **k: (made.append(1), init(self, *a, **k))[1])
    monkeypatch.setattr(P._LogitLoss, "at", lambda self, *a, **k: (evaluated.append(1), at(self, *a, **k))[1])
    curve = predict_sweep(net, x, y, "relative", [0.1, 0.3], cache=False)
    assert made == [] and evaluated == []
    got = [p.loss_increase_logits for p in curve.predictions]
    assert len(made) == 1 and len(evaluated) == 2
    curve.to_frame()
    assert len(evaluated) == 2  # kept once read
    pred = predict(net, x, y, "relative:0.3", cov=True, cache=False)
    want = P._gaussian_logit_loss(pred.logit_mean, pred.logit_cov, y) - pred.clean_loss
    assert got[1] == pytest.approx(want, rel=1e-6)
    assert predict(net, x, y, "relative:0.0", cache=False).loss_increase_logits == 0.0


def test_hutchinson_probes_run_when_the_loss_is_first_read(monkeypatch):
    """On a smooth network the default loss increase is Hutchinson's: its probes (most of
    such a call) run when ``loss_increase`` or its s.e. is first read, once for all the
    levels of a sweep, and never for ``method="moments"`` (its loss is its own)."""
    import importlib

    P = importlib.import_module("noiseprop.theory.predict")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 3)).eval()
    x = torch.randn(32, 4)
    y = net(x).argmax(1)
    calls = []
    real = P._trace_probes
    monkeypatch.setattr(P, "_trace_probes", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    curve = predict_sweep(net, x, y, "relative", [0.1, 0.3], cache=False)
    assert calls == [] and curve.predictions[0].loss_increase_method == "hutchinson"
    se = curve.predictions[1].loss_increase_se
    vals = [p.loss_increase for p in curve.predictions]
    assert len(calls) == 1 and vals[1] == pytest.approx(9 * vals[0]) and se > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = predict(net, x, y, "relative:0.3", method="moments", cache=False)
    m.loss_increase, m.to_frame(), m.summary()
    assert len(calls) == 1 and m.loss_increase_method == "gaussian logits (moment method)"
    # the value is the call's, whatever happens to the model before it is read
    now = predict(net, x, y, "relative:0.3", seed=3, cache=False)
    now_li = now.loss_increase
    later = predict(net, x, y, "relative:0.3", seed=3, cache=True)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)
    assert later.loss_increase == now_li and later.loss_increase_se == now.loss_increase_se
    assert predict(net, x, y, "relative:0", cache=False).loss_increase == 0.0


def test_predictions_pickle_and_deep_copy():
    """A Prediction (and a curve of them) survives pickle and ``copy.deepcopy``: its
    read-only mappings come back read-only with the same contents (they made both fail),
    a deferred value comes back as its value."""
    import copy
    import pickle
    import types

    net, x, y = tiny_problem()
    p = predict(net, x, y, "relative:0.3", per_layer=True, cache=False)
    for q in (pickle.loads(pickle.dumps(p)), copy.deepcopy(p)):
        assert isinstance(q.diagnostics, types.MappingProxyType)
        assert isinstance(q.loss_increase_by_layer, types.MappingProxyType)
        assert dict(q.loss_increase_by_layer) == dict(p.loss_increase_by_layer)
        assert q.diagnostics["preact_frac"] == p.diagnostics["preact_frac"]
        assert torch.equal(q.logit_var, p.logit_var) and q.accuracy == p.accuracy
        assert q.loss_increase_logits == p.loss_increase_logits
        assert q.noise_model.to_string() == "relative:0.3"
    curve = predict_sweep(net, x, y, "relative", [0.1, 0.3])
    again = pickle.loads(pickle.dumps(curve))
    pd.testing.assert_frame_equal(again.to_frame(), curve.to_frame())
