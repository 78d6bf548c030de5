import copy

import pytest
import torch
from torch import nn

from noiseprop.theory.targets import Targets, find_fold_pairs, fold_bn, folding_affine, fuse_weights, resolve_targets


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.05)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def _cnn():
    torch.manual_seed(0)
    return _randomise_bn(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), Block(6), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 5)))


def test_default_targets_are_conv_linear_weights():
    m = _cnn()
    plan = resolve_targets(m)
    assert plan.model is m
    assert plan.names == ("0.weight", "3.conv1.weight", "3.conv2.weight", "6.weight", "9.weight")
    plan = resolve_targets(m, "weights,biases")
    assert "0.bias" in plan.names and "6.bias" in plan.names and "1.weight" not in plan.names
    plan = resolve_targets(m, Targets(norm=True))
    assert "1.weight" in plan.names and "1.bias" in plan.names and "3.bn1.weight" in plan.names
    plan = resolve_targets(m, Targets(layers=("3",)))
    assert plan.names == ("3.conv1.weight", "3.conv2.weight")


def test_fold_bn_exact_and_user_model_untouched():
    m = _cnn()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(7, 3, 8, 8)
    folded = fold_bn(m)
    assert not any(isinstance(mm, nn.modules.batchnorm._BatchNorm) for mm in folded.modules())
    ref, out = m(x), folded(x)
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert find_fold_pairs(m) == [("0", "1"), ("3.conv1", "3.bn1"), ("3.conv2", "3.bn2"), ("6", "7")]
    plan = resolve_targets(m, Targets(fold_bn=True, biases=True))
    assert plan.model is not m and "0.bias" in plan.names and "3.conv1.bias" in plan.names


def test_folding_affine_matches_batchnorm():
    bn = _randomise_bn(nn.BatchNorm2d(4))
    a, c = folding_affine(bn)
    x = torch.randn(3, 4, 5, 5)
    assert torch.allclose(bn(x), a[None, :, None, None] * x + c[None, :, None, None], atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_fuse_weights_equals_torch_fusion(bias):
    """The one folding function equals torch.nn.utils.fusion for Conv2d and Linear."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    torch.manual_seed(1)
    for layer, bn, fuse in [(nn.Conv2d(3, 5, 3, bias=bias), nn.BatchNorm2d(5), fuse_conv_bn_eval),
                            (nn.Linear(7, 4, bias=bias), nn.BatchNorm1d(4), fuse_linear_bn_eval)]:
        layer.eval()
        bn = _randomise_bn(bn, seed=3)
        ref = fuse(layer, bn)
        w, b = fuse_weights(layer.weight, layer.bias, *folding_affine(bn))
        assert torch.allclose(w, ref.weight, rtol=1e-6, atol=1e-7)
        assert torch.allclose(b, ref.bias, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="one entry per output channel"):
        fuse_weights(torch.ones(3, 2), None, torch.ones(2), torch.ones(2))


def test_fold_errors_name_the_layer():
    pre = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match="'0'.*not fed directly"):
        fold_bn(pre)

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            h = self.lin(x)
            return self.bn(h) + h

    with pytest.raises(ValueError, match="'bn'"):
        fold_bn(Branchy().eval())

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            if x.sum() > 0:
                return self.bn(self.lin(x))
            return x

    with pytest.raises(ValueError, match="could not trace"):
        fold_bn(Dynamic().eval())


def test_no_targets_error():
    with pytest.raises(ValueError, match="no parameters to perturb"):
        resolve_targets(nn.Sequential(nn.ReLU(), nn.Flatten()))
    with pytest.raises(ValueError, match="unknown targets"):
        resolve_targets(_cnn(), "weights,gains")
    with pytest.raises(ValueError, match="norm=True cannot be combined"):
        Targets(norm=True, fold_bn=True)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        resolve_targets("model")
