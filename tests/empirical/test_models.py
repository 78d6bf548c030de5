"""Model zoo: every family and norm builds and runs; specs rebuild; norm placement."""
import json

import pytest
import torch
from torch import nn

from noiseprop.empirical.models import (
    BasicBlock,
    build_model,
    count_norm_layers,
    model_spec,
    norm_places,
)
from noiseprop.empirical.norms import L1BatchNorm1d, L1BatchNorm2d, TopKBatchNorm1d, TopKBatchNorm2d
from noiseprop.theory.targets import WEIGHT_LAYERS, find_fold_pairs, fold_bn

FAMILIES = ["mlp", "vgg", "vgg16", "resnet20", "resnet32", "resnet44", "resnet56"]
NORMS = ["none", "bn", "l1", "topk"]
NORM_TYPES = {
    "bn": (nn.BatchNorm1d, nn.BatchNorm2d),
    "l1": (L1BatchNorm1d, L1BatchNorm2d),
    "topk": (TopKBatchNorm1d, TopKBatchNorm2d),
}
SHAPES = [(1, 8, 8), (3, 32, 32)]


def _x(shape, n=4, seed=0):
    return torch.randn((n,) + tuple(shape), generator=torch.Generator().manual_seed(seed))


def _forward_order(model, x):
    """Names of the Conv/Linear modules in the order forward calls them."""
    order, hooks = [], []
    for name, m in model.named_modules():
        if isinstance(m, WEIGHT_LAYERS):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: order.append(name)))
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return order


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_builds_and_runs(name, norm, shape):
    model = build_model(name, shape, 7, norm=norm, width=4 if name != "mlp" else 16)
    x = _x(shape)
    model.train()
    y = model(x)
    assert y.shape == (4, 7) and torch.isfinite(y).all()
    y.sum().backward()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (4, 7)
    n_norm = count_norm_layers(model)
    expected = 0 if norm == "none" else norm_places(name)
    assert n_norm == expected
    if norm != "none":
        assert all(isinstance(m, NORM_TYPES[norm]) for m in model.modules()
                   if isinstance(m, tuple(c for p in NORM_TYPES.values() for c in p)))
    # BN folding (used by the noise targets) finds every norm layer and keeps outputs.
    pairs = find_fold_pairs(model)
    assert len(pairs) == n_norm
    with torch.no_grad():
        y0, y1 = model(x), fold_bn(model)(x)
    assert torch.allclose(y1, y0, rtol=1e-4, atol=1e-4 * y0.abs().max().item() + 1e-6)


def test_eligible_place_counts():
    assert norm_places("mlp", depth=3) == 3
    assert norm_places("vgg") == 8 and norm_places("vgg16") == 13 and norm_places("vgg", depth=19) == 16
    # stem + 2 per block (3n blocks) + 2 projection shortcuts
    for d in (20, 32, 44, 56):
        assert norm_places(f"resnet{d}") == 1 + 2 * 3 * ((d - 2) // 6) + 2
    assert norm_places("resnet20") == 21


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet20"])
def test_norm_layers_k_normalises_the_first_k_places_in_forward_order(name):
    shape = (1, 8, 8)
    full = build_model(name, shape, 10, norm="bn", width=4 if name != "mlp" else 8, depth=3 if name == "mlp" else None)
    x = _x(shape)
    # eligible places = the Conv/Linear layers that carry a norm in the full model,
    # listed in the order forward calls them
    normed = {c for c, _ in find_fold_pairs(full)}
    places = [c for c in _forward_order(full, x) if c in normed]
    total = len(places)
    assert total == norm_places(name, depth=3 if name == "mlp" else None)
    for k in sorted({0, 1, 2, total // 2, total - 1, total}):
        m = build_model(name, shape, 10, norm="bn", norm_layers=k, width=4 if name != "mlp" else 8,
                        depth=3 if name == "mlp" else None)
        assert count_norm_layers(m) == k
        got = [c for c, _ in find_fold_pairs(m)]
        order = _forward_order(m, x)
        assert sorted(got, key=order.index) == places[:k]
        # a normalised layer has no bias; an un-normalised one has
        for c in order[:-1]:
            assert (m.get_submodule(c).bias is None) == (c in got)


def test_resnet_shortcut_norm_counts_as_a_place():
    m = build_model("resnet20", (1, 8, 8), 10, norm="bn", width=4)
    assert isinstance(m.layer2[0].shortcut, nn.Sequential)
    assert isinstance(m.layer2[0].shortcut[1], nn.BatchNorm2d)
    assert isinstance(m.layer1[0].shortcut, nn.Identity)
    # places in forward order: stem(1), layer1: 3 blocks × 2 = 6 → 7, layer2[0]: bn1, bn2, shortcut → 10
    m9 = build_model("resnet20", (1, 8, 8), 10, norm="bn", norm_layers=9, width=4)
    blk = m9.layer2[0]
    assert isinstance(blk.bn1, nn.BatchNorm2d) and isinstance(blk.bn2, nn.BatchNorm2d)
    assert len(blk.shortcut) == 1 and blk.shortcut[0].bias is not None


def test_basic_block_structure_and_forward_formula():
    m = build_model("resnet20", (3, 32, 32), 10, norm="bn", width=4)
    blk = m.layer2[0]
    assert isinstance(blk, BasicBlock)
    for attr in ("conv1", "bn1", "relu1", "conv2", "bn2", "shortcut", "relu2"):
        assert hasattr(blk, attr)
    m.eval()
    with torch.no_grad():
        x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
        ref = torch.relu(blk.bn2(blk.conv2(torch.relu(blk.bn1(blk.conv1(x))))) + blk.shortcut(x))
        assert torch.equal(blk(x), ref)
    nn_none = build_model("resnet20", (1, 8, 8), 10, norm="none", width=4)
    assert isinstance(nn_none.layer1[0].bn1, nn.Identity) and isinstance(nn_none.layer1[0].bn2, nn.Identity)
    assert nn_none.layer1[0].conv1.bias is not None


def test_structure_is_sequential_and_uses_modules():
    for name in ("mlp", "vgg", "resnet20"):
        m = build_model(name, (1, 8, 8), 10, norm="bn", width=4)
        assert isinstance(m, nn.Sequential)
        kinds = {type(c) for c in m.modules()}
        assert nn.ReLU in kinds and nn.Flatten in kinds and nn.Linear in kinds
        assert all(not isinstance(c, nn.ReLU) or not c.inplace for c in m.modules())


def test_vgg_never_runs_a_3x3_conv_on_a_1x1_map():
    for shape in SHAPES + [(1, 28, 28)]:
        m = build_model("vgg16", shape, 10, width=4)
        sizes = {}
        hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: sizes.__setitem__(n, i[0].shape[-1]))
                 for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
        with torch.no_grad():
            m.eval()(_x(shape, n=1))
        for h in hooks:
            h.remove()
        assert min(sizes.values()) >= 2, sizes
    assert sum(isinstance(c, nn.MaxPool2d) for c in build_model("vgg", (1, 8, 8), 10).modules()) == 3
    assert sum(isinstance(c, nn.MaxPool2d) for c in build_model("vgg", (3, 32, 32), 10).modules()) == 5


def test_spec_round_trip_and_seeded_init_without_global_rng():
    state = torch.get_rng_state()
    m = build_model("resnet20", (1, 8, 8), 10, norm="topk", norm_layers=5, width=4, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    spec = m.spec
    assert json.loads(json.dumps(spec)) == spec
    m2 = build_model(**spec, seed=3)
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    m3 = build_model(**spec, seed=4)
    assert not torch.equal(m3.conv1.weight, m.conv1.weight)
    assert build_model(**spec).spec == spec
    # build_model(**spec) from JSON (lists instead of tuples)
    assert build_model(**json.loads(json.dumps(spec))).spec == spec


def test_canonical_specs():
    s = model_spec("vgg16", (1, 8, 8), 10, norm="bn")
    assert s["name"] == "vgg" and s["depth"] == 16
    assert model_spec("resnet", [1, 8, 8], 10, depth=32)["name"] == "resnet32"
    assert model_spec("resnet20", (1, 8, 8), 10, norm="bn", norm_layers=21)["norm_layers"] is None
    s0 = model_spec("resnet20", (1, 8, 8), 10, norm="bn", norm_layers=0)
    assert s0["norm"] == "none" and s0["norm_layers"] is None
    assert model_spec("mlp", (1, 8, 8), 10, norm="topk")["topk_k"] == 10
    assert "topk_k" not in model_spec("mlp", (1, 8, 8), 10, norm="l1")
    m = build_model("mlp", (1, 8, 8), 10, norm="topk", topk_k=3, width=8)
    assert m.bn1.k == 3


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "alexnet"}, "unknown model"),
    ({"name": "resnet21"}, "6n\\+2"),
    ({"name": "vgg12"}, "VGG depth"),
    ({"name": "resnet20", "depth": 32}, "depth 20"),
    ({"name": "resnet20", "norm": "ln"}, "unknown norm"),
    ({"name": "resnet20", "norm": "bn", "norm_layers": 22}, "\\[0, 21\\]"),
    ({"name": "mlp", "norm": "none", "norm_layers": 1}, "needs a norm"),
    ({"name": "mlp", "width": 0}, "width"),
    ({"name": "mlp", "in_shape": (8, 8)}, "in_shape"),
    ({"name": "mlp", "num_classes": 1}, "num_classes"),
    ({"name": "mlp", "norm": "bn", "topk_k": 3}, "topk_k"),
])
def test_invalid_specs_are_rejected_with_a_message(kwargs, match):
    args = {"in_shape": (1, 8, 8), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(**args)
