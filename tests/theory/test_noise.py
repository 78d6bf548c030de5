import math

import numpy as np
import pytest
import torch

from noiseprop.theory.noise import AdditiveGaussian, Multiplicative, RelativeGaussian, parse_noise


def _w(seed=0, shape=(16, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 0.3 + 0.05


def test_variance_formulas():
    w = _w()
    assert torch.allclose(AdditiveGaussian(0.1).variance(w), torch.full_like(w, 0.01))
    std = w.std(correction=0)
    assert torch.allclose(RelativeGaussian(0.2).variance(w), torch.full_like(w, (0.2 * std) ** 2))
    mx = w.abs().max()
    assert torch.allclose(RelativeGaussian(0.2, reference="max").variance(w), torch.full_like(w, (0.2 * mx) ** 2))
    assert torch.allclose(Multiplicative(0.3).variance(w), 0.09 * w**2)
    ch = RelativeGaussian(0.5, per="channel").variance(w)
    for c in range(w.shape[0]):
        assert torch.allclose(ch[c], torch.full_like(ch[c], (0.5 * w[c].std(correction=0)) ** 2))
    chm = RelativeGaussian(0.5, reference="max", per="channel").variance(w)
    assert torch.allclose(chm[:, 0], (0.5 * w.abs().amax(dim=1)) ** 2)
    # one element per channel (a bias): no spread of its own, the whole vector's std (was 0:
    # no noise at all); the max reference keeps each element's magnitude
    b = torch.tensor([0.5, -1.0, 2.0, 0.0])
    assert torch.allclose(RelativeGaussian(0.5, per="channel").variance(b), (0.5 * b.std(correction=0)) ** 2
                          * torch.ones(4))
    assert torch.allclose(RelativeGaussian(0.5, per="channel").variance(b[:, None]),
                          RelativeGaussian(0.5).variance(b[:, None]))
    assert torch.allclose(RelativeGaussian(0.5, reference="max", per="channel").variance(b), (0.5 * b.abs()) ** 2)


@pytest.mark.parametrize("noise", [AdditiveGaussian(0.05), RelativeGaussian(0.3), RelativeGaussian(0.3, reference="max"),
                                   RelativeGaussian(0.3, per="channel"), Multiplicative(0.2)])
def test_sample_matches_variance(noise):
    """The empirical per-element variance of sample() over n draws matches variance():
    pooled over elements, the ratio's s.e. is sqrt(2/(n-1))/sqrt(elements)."""
    w = _w(1)
    g = torch.Generator().manual_seed(0)
    n = 400
    d = torch.stack([noise.sample(w, g) - w for _ in range(n)])
    assert abs(float(d.mean())) < 5 * math.sqrt(float(noise.variance(w).mean()) / (n * w.numel()))
    ratio = float((d.var(dim=0) / noise.variance(w)).mean())
    se = math.sqrt(2 / (n - 1)) / math.sqrt(w.numel())
    assert abs(ratio - 1) < 5 * se


def test_sample_reproducible_and_leaves_global_rng_alone():
    w = _w()
    state = torch.get_rng_state()
    a = RelativeGaussian(0.1).sample(w, torch.Generator().manual_seed(3))
    b = RelativeGaussian(0.1).sample(w, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(state, torch.get_rng_state())


def test_perturb_is_linear_in_level():
    w = _w()
    z = torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=w.dtype)
    for noise in (AdditiveGaussian(1.0), RelativeGaussian(1.0), Multiplicative(1.0)):
        d1 = noise.with_level(0.1).perturb(w, z) - w
        d2 = noise.with_level(0.3).perturb(w, z) - w
        assert torch.allclose(d2, 3 * d1)
    # multiplicative is w (1 + eta z)
    assert torch.allclose(Multiplicative(0.2).perturb(w, z), w * (1 + 0.2 * z))


def test_parse_noise_forms():
    assert parse_noise("relative:0.05") == RelativeGaussian(0.05)
    assert parse_noise("relative-max:0.02") == RelativeGaussian(0.02, reference="max")
    assert parse_noise("additive:0.01") == AdditiveGaussian(0.01)
    assert parse_noise("multiplicative:0.1") == Multiplicative(0.1)
    assert parse_noise("relative-channel:0.1") == RelativeGaussian(0.1, per="channel")
    for n in (RelativeGaussian(0.05), RelativeGaussian(0.02, reference="max"), AdditiveGaussian(0.01), Multiplicative(0.1)):
        assert parse_noise(n.to_string()) == n


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "x", None])
def test_bad_levels(bad):
    with pytest.raises(ValueError, match="finite number >= 0"):
        RelativeGaussian(bad)
    with pytest.raises(ValueError, match="sigma"):
        AdditiveGaussian(bad)


@pytest.mark.parametrize("spec,msg", [("gaussian:0.1", "unknown noise"), ("relative", "unknown noise"),
                                      ("relative:abc", "not a number"), ("relative:-1", ">= 0"),
                                      ("relative:nan", ">= 0")])
def test_bad_noise_strings(spec, msg):
    with pytest.raises(ValueError, match=msg) as e:
        parse_noise(spec)
    if "unknown" in msg:
        assert "relative:LEVEL" in str(e.value)  # says what is accepted


def test_bad_options():
    with pytest.raises(ValueError, match="reference"):
        RelativeGaussian(0.1, reference="mean")
    with pytest.raises(ValueError, match="per"):
        RelativeGaussian(0.1, per="tile")
    with pytest.raises(TypeError):
        RelativeGaussian(0.1).variance(np.zeros(3))
