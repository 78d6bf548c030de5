"""Noise-aware training (train(..., noise=...)): a fresh draw of the noise model in the
target weights at every mini-batch, deterministic, part of the cache key only when set."""
import numpy as np
import pytest
import torch
from torch import nn

from noiseprop.empirical.data import load_dataset
from noiseprop.empirical.train import cache_key, train

MLP = {"name": "mlp", "norm": "none", "width": 16}
HP = dict(lr=0.05, epochs=2, batch_size=32, momentum=0.9, weight_decay=5e-4, schedule="cosine", warmup_epochs=0)


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("digits", subset_train=192, subset_test=64)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_noise_aware_training_is_deterministic_and_keyed(tiny, tmp_path):
    std = train(MLP, tiny, seed=0, cache=False, **HP)
    a = train(MLP, tiny, seed=0, cache=False, noise="relative:0.3", **HP)
    b = train(MLP, tiny, seed=0, cache=False, noise="relative:0.3", **HP)
    assert _same(a.model, b.model) and a.cache_key == b.cache_key
    assert not _same(a.model, std.model) and a.cache_key != std.cache_key
    assert a.config["noise"] == "relative:0.3" and "noise" not in std.config
    # runs without noise keep their configuration, hence their cache key
    assert std.cache_key == cache_key(std.model_id, tiny.fingerprint, std.config)
    assert set(std.config) == {"lr", "epochs", "batch_size", "momentum", "weight_decay", "warmup_epochs", "schedule",
                               "seed", "threads"}
    # the level, the targets and the seed are part of the key
    c = train(MLP, tiny, seed=0, cache=False, noise="relative:0.2", **HP)
    d = train(MLP, tiny, seed=0, cache=False, noise="relative:0.3", noise_targets="weights,biases", **HP)
    assert len({a.cache_key, c.cache_key, d.cache_key}) == 3
    # cached like every run
    e = train(MLP, tiny, seed=0, cache_dir=tmp_path, noise="relative:0.3", **HP)
    f = train(MLP, tiny, seed=0, cache_dir=tmp_path, noise="relative:0.3", **HP)
    assert f.from_cache and _same(e.model, f.model) and _same(e.model, a.model)


def test_zero_noise_gives_the_standard_weights(tiny):
    """Level 0: the draw is the clean weight, so noise-aware training is standard
    training bit for bit (same mini-batches: the noise has its own generator)."""
    std = train(MLP, tiny, seed=1, cache=False, **HP)
    zero = train(MLP, tiny, seed=1, cache=False, noise="relative:0", **HP)
    assert _same(std.model, zero.model) and std.history.loss == zero.history.loss


class _Recorder(nn.Module):
    seen = []  # class attribute: shared by the deep copy that train() trains

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        if self.training:
            _Recorder.seen.append(self.fc.weight.detach().clone())
        return self.fc(x.flatten(1))


def test_each_mini_batch_sees_a_fresh_draw_of_the_right_size(tiny):
    """With a negligible learning rate the clean weight stays put, so the weights seen in
    each forward pass are ``w + η std(w) z``: the deviations must be independent across
    steps with variance η² std(w)² (chi-square tolerance)."""
    _Recorder.seen = []
    torch.manual_seed(0)
    model = _Recorder()
    w0 = model.fc.weight.detach().clone()
    eta = 0.5
    train(model, tiny, seed=0, cache=False, lr=1e-12, epochs=1, batch_size=32, momentum=0.0, weight_decay=0.0,
          schedule="constant", warmup_epochs=0, noise=f"relative:{eta}")
    seen = _Recorder.seen
    assert len(seen) == 192 // 32
    dev = torch.stack([s - w0 for s in seen]).double()  # [steps, 10, 64]
    sd = float(w0.std())
    z = dev / (eta * sd)
    n = z.numel()
    var = float((z ** 2).mean())
    assert abs(var - 1.0) <= 4 * np.sqrt(2.0 / n)  # Var(mean z²) = 2/n
    corr = float((z[0] * z[1]).mean())
    assert abs(corr) <= 4 / np.sqrt(z[0].numel())  # fresh draw at each step
    assert torch.equal(model.fc.weight.detach(), w0)  # the user's module is untouched


def test_noise_aware_training_bad_input(tiny):
    with pytest.raises(ValueError, match="noise \\(noise-aware training\\)"):
        train(MLP, tiny, seed=0, cache=False, noise="relative", **HP)
    with pytest.raises(ValueError, match="noise_targets is given without noise"):
        train(MLP, tiny, seed=0, cache=False, noise_targets="weights", **HP)
    with pytest.raises(ValueError, match="fold_bn=True is not accepted"):
        train(MLP, tiny, seed=0, cache=False, noise="relative:0.1", noise_targets="weights,fold_bn", **HP)
