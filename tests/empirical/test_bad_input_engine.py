"""Bad input to the Monte-Carlo entry points, train and load_dataset (found by a fuzz of the API):
each is refused with a TypeError/ValueError that names the argument and says what is
accepted, before any work, and the user's model is left as it was.

"Before any work" is asserted by replacing the work (the evaluator that copies and runs
the network, the control variate's linearisation) with functions that fail the test.
Small and seeded: the tiny network of ``noiseprop.theory.examples``."""
import copy
import threading

import pytest
import torch
from torch import nn

from noiseprop.empirical import drift_sweep, load_dataset, monte_carlo, sweep, train
from noiseprop.empirical import montecarlo as mc_module
from noiseprop.theory import PCMLike, RelativeGaussian
from noiseprop.theory.examples import tiny_problem


@pytest.fixture
def problem():
    return tiny_problem(32, seed=0)


def _forbid(monkeypatch, *names):
    def forbidden(*a, **k):
        raise AssertionError("the work started before the bad argument was refused")

    for n in names:
        monkeypatch.setattr(mc_module, n, forbidden)


class _Locked(nn.Module):
    """A model with an attribute that copy.deepcopy cannot copy; counts its forward calls."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.lock = threading.Lock()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------
# 1. a model that cannot be deep-copied
# ----------------------------------------------------------------------------
_COPY_CALLS = {
    "monte_carlo": lambda m, x, y: monte_carlo(m, x, y, RelativeGaussian(0.1), draws=2, progress=False),
    "monte_carlo_cv": lambda m, x, y: monte_carlo(m, x, y, RelativeGaussian(0.1), draws=3, progress=False,
                                                  control_variate=True),
    "sweep": lambda m, x, y: sweep(m, x, y, "relative", [0.0, 0.1], draws=2, progress=False),
    "drift_sweep": lambda m, x, y: drift_sweep(m, x, y, PCMLike(), [1.0, 3600.0], draws=2, progress=False),
}


@pytest.mark.parametrize("call", sorted(_COPY_CALLS))
def test_model_that_cannot_be_copied(problem, monkeypatch, call):
    net, x, y = problem
    model = _Locked(net).eval()
    before = _state(model)
    _forbid(monkeypatch, "LinearControlVariate")  # the control variate's linearisation is work
    who = "monte_carlo" if call.startswith("monte_carlo") else call
    with pytest.raises(TypeError) as info:
        _COPY_CALLS[call](model, x, y)
    msg = str(info.value)
    assert msg.startswith("model (_Locked):"), msg
    assert f"{who} copies the model with copy.deepcopy so that the user's model is never changed" in msg
    assert "this model cannot be copied: cannot pickle '_thread.lock' object" in msg
    assert model.calls == 0  # refused before any forward pass
    assert _same(before, _state(model)) and not model.training
    # the same model without the attribute runs
    monkeypatch.undo()
    del model.lock
    _COPY_CALLS[call](model, x, y)


def test_train_model_that_cannot_be_copied(tmp_path):
    torch.manual_seed(0)
    model = _Locked(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    before = _state(model)
    with pytest.raises(TypeError, match=r"model \(_Locked\): train copies the model with copy\.deepcopy .*"
                                        r"cannot be copied: cannot pickle '_thread\.lock' object"):
        train(model, "digits", epochs=1, cache_dir=tmp_path)
    assert model.calls == 0 and _same(before, _state(model))
    assert not list(tmp_path.rglob("*.pt"))  # nothing written to the cache


def test_copy_model_is_a_deep_copy(problem):
    net, _, _ = problem
    twin = mc_module.copy_model(net, "monte_carlo")
    assert twin is not net and _same(_state(net), _state(twin))
    assert all(p is not q for p, q in zip(net.parameters(), twin.parameters()))


# ----------------------------------------------------------------------------
# 2. control variate with fewer than 3 draws: refused up front
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("draws", [2])
def test_control_variate_needs_three_draws(problem, monkeypatch, draws):
    net, x, y = problem
    before = _state(net)
    _forbid(monkeypatch, "LinearControlVariate", "NoisyEvaluator", "copy_model")
    with pytest.raises(ValueError, match=r"draws must be an integer >= 3 with control_variate=True .*got 2; use "
                                         r"draws >= 3 or control_variate=False"):
        monte_carlo(net, x, y, RelativeGaussian(0.1), draws=draws, control_variate=True, progress=False)
    assert _same(before, _state(net))


def test_control_variate_three_draws_runs(problem):
    net, x, y = problem
    r = monte_carlo(net, x, y, RelativeGaussian(0.1), draws=3, seed=0, control_variate=True, progress=False)
    assert r.accuracies.shape == (3,) and "cv_accuracy" in r.extras
    r2 = monte_carlo(net, x, y, RelativeGaussian(0.1), draws=3, seed=0, control_variate=True, progress=False)
    assert r.extras["cv_accuracy"] == r2.extras["cv_accuracy"]  # seeded, deterministic
    plain = monte_carlo(net, x, y, RelativeGaussian(0.1), draws=3, seed=0, progress=False)
    assert (plain.accuracies == r.accuracies).all()  # the plain estimates are unchanged by the control variate


# ----------------------------------------------------------------------------
# 3. drift_sweep: times beyond the largest level, named as times
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("times", [[1e20], [1.0, 1e300]])
def test_drift_sweep_huge_time_names_times(problem, monkeypatch, times):
    net, x, y = problem
    _forbid(monkeypatch, "NoisyEvaluator", "copy_model")
    with pytest.raises(ValueError) as info:
        drift_sweep(net, x, y, PCMLike(), times, draws=2, progress=False)
    msg = str(info.value)
    assert msg.startswith("times must be seconds since programming"), msg
    assert "<= 1.84e+19" in msg and "levels" not in msg and "variance" not in msg


def test_drift_sweep_largest_time_still_accepted(problem):
    net, x, y = problem
    s = drift_sweep(net, x, y, PCMLike(), [1.0, 1.8e19], draws=2, progress=False)
    assert s.levels.tolist() == [1.0, 1.8e19]


# ----------------------------------------------------------------------------
# 5. a noise string with a level where the levels are given: ambiguous
# ----------------------------------------------------------------------------
def test_sweep_noise_with_level_is_refused(problem, monkeypatch):
    net, x, y = problem
    _forbid(monkeypatch, "NoisyEvaluator", "copy_model")
    with pytest.raises(ValueError, match=r"noise 'relative:0\.3' gives a level \(0\.3\) and levels gives the levels: "
                                         r"ambiguous .*Give the family alone \('relative'\) with levels"):
        sweep(net, x, y, "relative:0.3", [0.1], draws=2, progress=False)
    with pytest.raises(ValueError, match=r"noise 'pcm:1' gives a level \(1\) and times gives the levels: .*'pcm'"):
        drift_sweep(net, x, y, "pcm:1", [1.0], draws=2, progress=False)


def test_sweep_noise_with_settings_keeps_them_and_warns(problem):
    """A string with settings after its level (the string form has no other place for
    them): the settings are kept, the level replaced by each of the levels, with a
    warning; the same curve as the noise model object."""
    from noiseprop.theory import Quantized

    net, x, y = problem
    with pytest.warns(UserWarning, match=r"its level \(8\) is replaced by each of levels; its settings are kept"):
        s = sweep(net, x, y, "quantized:8,per=channel", [4, 6], draws=2, seed=1, progress=False)
    o = sweep(net, x, y, Quantized(8, per="channel"), [4, 6], draws=2, seed=1, progress=False)
    assert (s.accuracies == o.accuracies).all()


def test_sweep_family_alone_runs(problem):
    net, x, y = problem
    s = sweep(net, x, y, "relative", [0.0, 0.1], draws=2, seed=0, progress=False)
    assert s.levels.tolist() == [0.0, 0.1] and s.noise == "relative"
    o = sweep(net, x, y, RelativeGaussian(0.3), [0.0, 0.1], draws=2, seed=0, progress=False)  # object: documented
    assert (o.accuracies == s.accuracies).all()
    d = drift_sweep(net, x, y, "pcm", [1.0, 10.0], draws=2, seed=0, progress=False)
    e = drift_sweep(net, x, y, PCMLike(), [1.0, 10.0], draws=2, seed=0, progress=False)
    assert (d.accuracies == e.accuracies).all() and (d.losses == e.losses).all()


# ----------------------------------------------------------------------------
# 6. progress must be True, False or None
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("progress", ["no", "yes", 1, 0.0])
def test_progress_must_be_a_bool(problem, monkeypatch, capsys, progress):
    net, x, y = problem
    _forbid(monkeypatch, "NoisyEvaluator", "copy_model", "tqdm")
    for call in (lambda: monte_carlo(net, x, y, RelativeGaussian(0.1), draws=2, progress=progress),
                 lambda: sweep(net, x, y, "relative", [0.1], draws=2, progress=progress),
                 lambda: drift_sweep(net, x, y, PCMLike(), [1.0], draws=2, progress=progress)):
        with pytest.raises(TypeError, match=r"progress must be True, False or None .*got "
                                            + type(progress).__name__):
            call()
    assert capsys.readouterr().err == ""  # no bar was drawn


def test_progress_bools_accepted(problem):
    net, x, y = problem
    import numpy as np

    for p in (None, False, np.bool_(False)):
        assert monte_carlo(net, x, y, RelativeGaussian(0.1), draws=2, progress=p).draws == 2


def test_train_progress_must_be_accepted_value(tmp_path):
    with pytest.raises(TypeError, match=r"progress must be None or False \(silent\), True \(a bar\), 'auto' .*"
                                        r"got str 'no'"):
        train("mlp", "digits", epochs=1, cache_dir=tmp_path, progress="no")
    assert not list(tmp_path.rglob("*.pt"))  # refused before training: nothing written to the cache


# ----------------------------------------------------------------------------
# 7. load_dataset: unknown keyword arguments named by load_dataset, not its loader
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("name, accepted", [
    ("digits", "test_fraction, split_seed, subset_train, subset_test"),
    ("teacher", "n_train, n_test, in_shape, num_classes, teacher_width, seed, subset_train, subset_test"),
    ("mnist", "data_dir, subset_train, subset_test"),
])
def test_load_dataset_unknown_keyword(name, accepted):
    with pytest.raises(ValueError) as info:  # ValueError: load_dataset's contract (tests/empirical/test_data.py)
        load_dataset(name, foo=1)
    msg = str(info.value)
    assert msg.startswith(f"load_dataset({name!r}) got unexpected keyword argument(s) 'foo'"), msg
    assert f"accepted keyword arguments for {name!r}: {accepted}" in msg
    assert "_load_" not in msg


def test_load_dataset_known_keywords_still_work():
    d = load_dataset("digits", split_seed=1, subset_train=10, subset_test=5)
    assert d.n_train == 10 and d.x_test.shape[0] == 5
    assert copy.deepcopy(d.spec) == d.spec
