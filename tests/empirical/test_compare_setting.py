"""compare() on real results: a Prediction and an MCResult carry their noise model,
targets and inputs fingerprint, and compare() refuses a pair that differs in any of them
with an error naming the difference (issue 15)."""
import pytest

from noiseprop.empirical import compare, monte_carlo, sweep
from noiseprop.theory import Multiplicative, PCMLike, RelativeGaussian, Targets, predict, predict_sweep
from noiseprop.theory.examples import tiny_problem
from noiseprop.theory.predict import Predictor

NET, X, Y = tiny_problem()
NOISE = RelativeGaussian(0.1)


@pytest.fixture(scope="module")
def pred():
    return predict(NET, X, Y, NOISE, diagnostic=False)


def _mc(noise=NOISE, targets=None, x=X, draws=4):
    return monte_carlo(NET, x, Y, noise, targets, draws=draws, seed=0, progress=False)


def test_results_carry_the_objects(pred):
    mc = _mc()
    assert pred.noise_model == NOISE and mc.noise_model == NOISE
    assert pred.targets_spec == Targets() == mc.targets_spec
    assert pred.inputs_fingerprint == mc.inputs_fingerprint and len(pred.inputs_fingerprint) == 32
    assert pred.level == mc.level == 0.1


def test_accepts_the_same_setting(pred):
    c = compare(pred, _mc(draws=30), calibrate=False)
    assert c.draws == 30
    # two spellings of the same noise and targets are the same setting
    c = compare(pred, _mc(noise="relative:0.1", targets="weights", draws=30), calibrate=False)
    assert c.draws == 30


@pytest.mark.parametrize("other, message", [
    (RelativeGaussian(0.3), r"different noise: prediction relative:0.1, Monte-Carlo relative:0.3 \(level 0.1 vs 0.3\)"),
    (Multiplicative(0.1), r"different noise: .*\(family RelativeGaussian vs Multiplicative\)"),
    (RelativeGaussian(0.1, per="channel"), r"different noise: .*\(family settings: per 'layer' vs 'channel'\)"),
    (RelativeGaussian(0.1, reference="max"), r"different noise: .*\(family settings: reference 'std' vs 'max'\)"),
])
def test_refuses_other_noise(pred, other, message):
    with pytest.raises(ValueError, match=message):
        compare(pred, _mc(noise=other))


def test_refuses_other_targets(pred):
    with pytest.raises(ValueError, match=r"different targets \(biases False vs True\): prediction weights, "
                                         r"Monte-Carlo weights\+biases"):
        compare(pred, _mc(targets=Targets(biases=True)))
    with pytest.raises(ValueError, match=r"different targets \(layers None vs \('0',\)\)"):
        compare(pred, _mc(targets=Targets(layers=["0"])))


def test_refuses_other_inputs(pred):
    with pytest.raises(ValueError, match="different inputs"):  # same shape, other values
        compare(pred, _mc(x=X + 1e-3))
    with pytest.raises(ValueError, match="different inputs"):
        compare(pred, _mc(x=X.flip(0)))


def test_curves_and_predictor_carry_the_setting():
    curve = predict_sweep(NET, X, Y, "relative", [0.05, 0.2], diagnostic=False)
    sw = sweep(NET, X, Y, "relative", [0.05, 0.2], draws=30, seed=0, keep_logits=True, progress=False)
    assert curve.noise_model == RelativeGaussian(1.0) == sw.noise_model
    assert curve.targets_spec == sw.targets_spec and curve.inputs_fingerprint == sw.inputs_fingerprint
    compare(curve.predictions[1], sw.result(1), calibrate=False)
    with pytest.raises(ValueError, match=r"level 0.05 vs 0.2"):
        compare(curve.predictions[0], sw.result(1))
    pr = Predictor(NET, X, Y, diagnostic=False)
    p = pr.predict("relative:0.2")
    assert p.noise_model == RelativeGaussian(0.2) and p.inputs_fingerprint == sw.inputs_fingerprint
    assert pr.sweep("relative", [0.2]).predictions[0].noise_model == RelativeGaussian(0.2)


def test_hardware_predictions_carry_the_setting():
    p = predict(NET, X, Y, PCMLike(t=3600.0), accuracy_draws=0)
    assert p.noise_model == PCMLike(t=3600.0) and p.inputs_fingerprint
    compare(p, _mc(noise=PCMLike(t=3600.0), draws=8), calibrate=False)
    with pytest.raises(ValueError, match=r"level 3600 vs 7200"):
        compare(p, _mc(noise=PCMLike(t=7200.0)))
    with pytest.raises(ValueError, match=r"compensation True vs False"):
        compare(p, _mc(noise=PCMLike(t=3600.0, compensation=False)))


def test_names_the_difference_of_stuck_at_faults():
    """StuckAt with p_max > 0 has no level-1 form: the difference is named field by field."""
    from noiseprop.theory import StuckAt
    from noiseprop.theory.drift import predict_hardware

    p = predict_hardware(NET, X, Y, StuckAt(p_zero=0.01, p_max=0.01), accuracy_draws=0)
    with pytest.raises(ValueError, match=r"different noise: .*\(p_zero 0.01 vs 0.02\)"):
        compare(p, _mc(noise=StuckAt(p_zero=0.02, p_max=0.01)))
