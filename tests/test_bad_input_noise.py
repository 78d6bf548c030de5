"""Bad input to the noise models (theory/noise.py, theory/hardware.py) and to the
noise-scaled Hessian (theory/flatness.py): a clear ValueError/TypeError naming the
argument, never a raw error from torch/numpy/Python, a hang or a silent wrong result.
And every noise model's ``to_string`` reads back with ``parse_noise`` (what noise-aware
training stores)."""
import math

import pytest
import torch

from noiseprop.theory import (AdditiveGaussian, Multiplicative, PCMLike, Quantized, RelativeGaussian, StuckAt,
                              hessian_top_eigenvalue, hessian_trace, parse_noise)
from noiseprop.theory.examples import tiny_problem
from noiseprop.theory.hardware import MAX_BITS


@pytest.fixture
def w():
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- N1-N3: Quantized bits
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), "x", None, True, 2.5, 0, 1e6, 2000,
                                 MAX_BITS + 1, 1e30])
def test_quantized_with_level_bad_bits(bad):
    with pytest.raises(ValueError, match=f"bits must be an integer >= 1 and <= {MAX_BITS}"):
        Quantized(4).with_level(bad)


@pytest.mark.parametrize("spec", ["quantized:inf", "quantized:nan", "quantized:1e30", "quantized:54", "quantized:0",
                                  "quantized:-3", "quantized:1e400"])
def test_parse_quantized_bad_bits(spec):
    with pytest.raises(ValueError, match=f"noise '{spec}': bits must be an integer >= 1 and <= {MAX_BITS}"):
        parse_noise(spec)


def test_quantized_bits_upper_bound(w):
    for bad in (2000, MAX_BITS + 1, 10**30):
        with pytest.raises(ValueError, match="bits"):
            Quantized(bits=bad)
    # the largest accepted width works and leaves the weights (almost) unchanged
    q = Quantized(bits=MAX_BITS)
    assert torch.allclose(q.mean(w), w, atol=1e-6) and q.with_level(4.0).bits == 4
    assert parse_noise("quantized:53").bits == MAX_BITS and parse_noise("quantized:4.0").bits == 4


def test_sweep_refuses_too_many_bits():
    from noiseprop.empirical import sweep

    net, x, y = tiny_problem(16)
    with pytest.raises(ValueError, match="bits must be an integer"):
        sweep(net, x, y, "quantized", [2, 1e6], draws=2)


# ---------------------------------------------------------------- N4: to_string reads back
ROUND_TRIP = [
    PCMLike(), PCMLike(t=3600.0, drift_scale=2.0), PCMLike(t=3600.0, per="channel"),
    PCMLike(t=3600.0, compensation=False, read_noise_scale=0.5),
    PCMLike(t=1234567.0, compensation=False, prog_noise_scale=1.3, drift_scale=0.1 + 0.2, read_noise_scale=0.0,
            per="channel"),
    PCMLike(t=0.1 + 0.2),  # '{:g}' would lose digits
    Quantized(4, per="channel"), Quantized(MAX_BITS), Quantized(1),
    StuckAt(0.01, p_max=0.02), StuckAt(0.123456789, p_max=0.2, per="channel"), StuckAt(0.0), StuckAt(0.0, p_max=0.5),
    RelativeGaussian(0.1234567, reference="max", per="channel"), AdditiveGaussian(1 / 3), Multiplicative(0.05),
]


@pytest.mark.parametrize("model", ROUND_TRIP, ids=lambda m: m.to_string())
def test_to_string_reads_back(model):
    back = parse_noise(model.to_string())
    assert back == model and type(back) is type(model)
    assert back.to_string() == model.to_string()


def test_parse_settings_forms():
    assert parse_noise("pcm-nocomp:1,drift=2") == PCMLike(t=1.0, compensation=False, drift_scale=2.0)
    assert parse_noise(" pcm:10, per=channel , prog=0.5") == PCMLike(t=10.0, per="channel", prog_noise_scale=0.5)
    assert parse_noise("stuck:0.1,per=layer") == StuckAt(0.1)


@pytest.mark.parametrize("spec,msg", [
    ("pcm:1,foo=2", r"unknown setting 'foo=2'; accepted settings for 'pcm:LEVEL': nocomp, prog=NUMBER, drift=NUMBER"),
    ("pcm:1,drift=abc", r"drift='abc' is not a number"),
    ("pcm:1,drift=-1", r"drift_scale must be a finite number >= 0"),
    ("pcm:1,read=inf", r"read_noise_scale must be a finite number >= 0"),
    ("pcm:1,per=row", r"per must be one of 'layer', 'channel', got 'row'"),
    ("pcm:1,nocomp=1", r"setting 'nocomp' takes no value"),
    ("pcm:1,drift", r"setting 'drift' needs a value"),
    ("pcm:1,drift=2,drift=3", r"setting 'drift' is given twice"),
    ("pcm:1,", r"unknown setting ''"),
    ("quantized:4,max=1", r"unknown setting 'max=1'; accepted settings for 'quantized:LEVEL': per=layer\|channel"),
    ("stuck:0.5,max=0.6", r"p_zero \+ p_max must be a fraction"),
    ("relative:0.1,per=channel", r"'relative:LEVEL' takes no settings"),
    ("pcm:abc,drift=2", r"level 'abc' is not a number"),
])
def test_parse_bad_settings(spec, msg):
    with pytest.raises(ValueError, match=f"noise '{spec}'.*{msg}"):
        parse_noise(spec)


def test_train_with_non_default_hardware_noise(tmp_path):
    """Noise-aware training stores the noise by its string form and reads it back."""
    from noiseprop.empirical import load_dataset, train

    torch.set_num_threads(1)
    nm = PCMLike(t=3600.0, drift_scale=2.0, per="channel")
    r = train({"name": "mlp", "norm": "none"}, load_dataset("digits"), seed=0, epochs=1, cache_dir=tmp_path,
              noise=nm)
    assert r.config["noise"] == "pcm:3600,drift=2,per=channel" and parse_noise(r.config["noise"]) == nm


def test_train_refuses_noise_whose_string_does_not_read_back(tmp_path):
    from dataclasses import dataclass

    from noiseprop.empirical import load_dataset, train

    @dataclass(frozen=True)
    class Custom(AdditiveGaussian):  # twice the noise, but additive's to_string: would train with the wrong noise
        def unit_scale(self, w):
            return 2 * torch.ones_like(w)

    with pytest.raises(ValueError, match="noise .*does not read back from its string form 'additive:0.1'"):
        train({"name": "mlp", "norm": "none"}, load_dataset("digits"), seed=0, epochs=1, cache_dir=tmp_path,
              noise=Custom(0.1))


# ---------------------------------------------------------------- N5: device-table points
@pytest.mark.parametrize("bad,exc", [(0, ValueError), (1, ValueError), (-4, ValueError), (2**40, ValueError),
                                     (2.5, TypeError), (True, TypeError), ("9", TypeError)])
def test_pcm_table_points(w, bad, exc):
    pat = "points must be an integer >= 2"
    with pytest.raises(exc, match=pat):
        PCMLike.raw_moments_over_times(w, [PCMLike(t=3600.0)], points=bad)
    with pytest.raises(exc, match=pat):
        PCMLike(t=3.0).device_table(points=bad)
    with pytest.raises(exc, match=pat):
        PCMLike(t=5.0).table_moments(torch.ones(3), points=bad)
    with pytest.raises(exc, match=pat):
        PCMLike.device_tables_over_times([PCMLike(t=1.0), PCMLike(t=2.0)], points=bad)


# ---------------------------------------------------------------- N6: models / times
def test_models_and_times_sequences(w):
    with pytest.raises(TypeError, match=r"models must be a sequence of PCMLike models.*\[model\]"):
        PCMLike.raw_moments_over_times(w, PCMLike())
    with pytest.raises(TypeError, match="models must be a sequence"):
        PCMLike.raw_moments_over_times(w, "pcm:1")
    with pytest.raises(TypeError, match="models must be a sequence"):
        PCMLike.device_tables_over_times(PCMLike(t=1.0))
    for bad in ("abc", [1.0, "x"], [-1.0], [float("nan")], [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="times must be seconds since programming"):
            PCMLike().alpha_over_times(w, bad, draws=1)
    assert PCMLike().alpha_over_times(w, []) == []


# ---------------------------------------------------------------- N7: z shape, generator
def test_stuck_apply_wrong_draws(w):
    nz = StuckAt(0.1)
    for z in (torch.rand(3), torch.rand(6, 5), torch.rand(1, 2, 6, 5)):
        with pytest.raises(ValueError, match=r"stuck-at draws z must be a tensor of shape \(2, 6, 5\)"):
            nz.apply(w, z)
    with pytest.raises(TypeError, match="stuck-at draws z must be a tensor"):
        nz.apply(w, [0.5] * 60)
    with pytest.raises(TypeError, match="PCM draws z must be a tensor"):
        PCMLike(t=1.0).apply(w, 0)
    z = nz.draw(w, torch.Generator().manual_seed(0))
    assert nz.apply(w, z).shape == w.shape


@pytest.mark.parametrize("model", [PCMLike(t=1.0), StuckAt(0.1), Quantized(4), RelativeGaussian(0.1),
                                   AdditiveGaussian(0.1)], ids=lambda m: m.to_string())
def test_sample_generator_type(w, model):
    for bad in (0, "seed", torch.Generator):
        with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
            model.sample(w, generator=bad)
    if hasattr(model, "draw"):
        with pytest.raises(TypeError, match="generator must be a torch.Generator or None"):
            model.draw(w, 0)
    a = model.sample(w, torch.Generator().manual_seed(0))
    assert torch.equal(a, model.sample(w, torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------- N8: non-finite weights
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("model", [PCMLike(t=3600.0), PCMLike(t=3600.0, compensation=False), StuckAt(0.1),
                                   Quantized(4), RelativeGaussian(0.1), Multiplicative(0.1)],
                         ids=lambda m: m.to_string())
def test_non_finite_weight(model, bad):
    wb = torch.tensor([[1.0, bad], [0.5, -0.5]])
    for method in (model.mean, model.variance):
        with pytest.raises(ValueError, match="weight w contains NaN or infinite values"):
            method(wb)
    if isinstance(model, PCMLike):
        with pytest.raises(ValueError, match="weight w contains NaN or infinite values"):
            PCMLike.raw_moments_over_times(wb, [model])
        with pytest.raises(ValueError, match="weight w contains NaN or infinite values"):
            model.raw_moments(wb, exact=True)


# ---------------------------------------------------------------- P7, P8: flatness
@pytest.mark.parametrize("noise", ["quantized:4", "pcm:3600", "stuck:0.01", PCMLike(t=3600.0), Quantized(4)],
                         ids=str)
def test_hessian_refuses_non_zero_mean_noise(noise):
    net, x, y = tiny_problem(16)
    with pytest.raises(ValueError, match="noise: .* has a non-zero mean.*zero-mean Gaussian noise"):
        hessian_trace(net, x, y, noise=noise, probes=4)
    with pytest.raises(ValueError, match="noise: .* has a non-zero mean"):
        hessian_top_eigenvalue(net, x, y, noise=noise)


def test_hessian_top_eigenvalue_flags():
    net, x, y = tiny_problem(16)
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="return_vector must be True or False"):
            hessian_top_eigenvalue(net, x, y, return_vector=bad)
    for bad in (True, "1e-3", None):
        with pytest.raises(TypeError, match="tol must be a finite number >= 0"):
            hessian_top_eigenvalue(net, x, y, tol=bad)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="tol must be a finite number >= 0"):
            hessian_top_eigenvalue(net, x, y, tol=bad)


@pytest.mark.parametrize("spec", ["relative:1_0", "additive:0_5", "pcm:36_00", "pcm:3600,drift=1_5"])
def test_noise_numbers_without_underscores(spec):
    """Python's float reads ``1_0`` as 10: a typo for 1.0 would become a level ten times
    larger; a noise string refuses it, naming the value."""
    with pytest.raises(ValueError, match="underscore"):
        parse_noise(spec)


def test_cli_numbers_without_underscores(capsys):
    from noiseprop.empirical.cli import main

    for argv in (["train", "--model", "mlp", "--lr", "1_0"], ["drift", "--model", "x.pt", "--times", "1,3_600"]):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own exit
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and argv[-1] in err and "Traceback" not in err, err
