"""The studies' statistics and verdicts on synthetic data with known truth, and their
plumbing on a tiny real grid."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from noiseprop.empirical.stats import Effect, paired_effect
from noiseprop.empirical.studies import common
from noiseprop.empirical.studies.common import (
    Finding,
    curve_metrics,
    directional_verdict,
    equivalence_verdict,
    eta_drop,
    finalise_findings,
    folding_factors,
    layer_gains,
)


# ----------------------------------------------------------------------------- metrics
def test_curve_metrics_on_a_known_curve():
    etas = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    acc = 0.9 - 0.4 * etas  # linear: mean over [0, 1] is 0.7
    m = curve_metrics(etas, acc, 0.9)
    assert m["auc"] == pytest.approx(0.7)
    assert m["robustness"] == pytest.approx(np.mean(acc[1:] / 0.9))
    assert m["eta10"] == pytest.approx(0.25)  # 0.9 - 0.4 * 0.25 = 0.8
    assert eta_drop(etas, np.full(5, 0.9), 0.9) == math.inf
    assert eta_drop([0, 1], [0.9, 0.7], 0.9) == pytest.approx(0.5)


def test_folding_factors_equal_the_closed_form():
    """Rows of equal spread and zero mean: std(W')² = mean(a²) var, so the variance
    inflation averaged over channels is mean(a²)·mean(1/a²) (≥ 1, = 1 for equal a)."""
    torch.manual_seed(0)
    C, K = 16, 400
    z = torch.randn(C, K).double()
    z = (z - z.mean(1, keepdim=True)) / z.std(1, correction=0, keepdim=True)
    for a in (torch.full((C,), 2.0), torch.exp(torch.randn(C) * 0.7)):
        lin, bn = nn.Linear(K, C, bias=False).double(), nn.BatchNorm1d(C).double()
        with torch.no_grad():
            lin.weight.copy_(z)
            bn.weight.copy_(a.double())
            bn.running_var.fill_(1.0 - bn.eps)
        model = nn.Sequential(lin, bn).eval()
        f = folding_factors(model)
        a64 = a.double()
        assert list(f) == ["0"]
        assert f["0"]["inflation"] == pytest.approx(float((a64 ** 2).mean() * (a64 ** -2).mean()), rel=1e-9)
        assert f["0"]["log_gain_std"] == pytest.approx(float(torch.log(a64).std()), abs=1e-12)
    assert f["0"]["inflation"] > 1.2
    # log-normal gains of spread 0.7 over 16 channels: the closed form 1/C + (1 - 1/C) e^{4 tau^2}
    tau = f["0"]["log_gain_std"]
    assert f["0"]["lognormal"] == pytest.approx(1 / 16 + (15 / 16) * math.exp(4 * tau ** 2), rel=1e-9)


def test_layer_gains_are_the_single_layer_first_order_variances():
    """The per-layer gains (one Jacobian pass, each layer's exact share) equal, layer by
    layer, a pass with only that layer noisy (weight and bias), over the clean logits'
    spread; a layer the logits do not depend on has gain 0."""
    from noiseprop.theory import RelativeGaussian, Targets
    from noiseprop.theory.linearize import LinearizedNetwork, jacobian_pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(48, 5))
            self.unused = nn.Linear(5, 5)

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.body[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(6, 1, 4, 4)
    y = torch.zeros(6, dtype=torch.int64)
    gains = layer_gains(model, x, y)
    with torch.no_grad():
        clean = model(x).double()
    spread = float(((clean - clean.mean(1, keepdim=True)) ** 2).mean())
    assert gains["unused"] == 0.0
    for layer in ("body.0", "body.4"):
        lin = LinearizedNetwork(model, Targets(layers=(layer,)))
        jp = jacobian_pass(lin, x, lin.unit_scales(RelativeGaussian(1.0)))
        ref = float(torch.diagonal(jp.cov_unit, dim1=-2, dim2=-1).double().mean()) / spread
        assert gains[layer] == pytest.approx(ref, rel=1e-6)
        assert ref > 0


# ----------------------------------------------------------------------------- verdicts
def test_directional_and_equivalence_verdicts():
    assert directional_verdict(0.01, -0.2, -1, 0.05) == "reproduced"
    assert directional_verdict(0.01, +0.2, -1, 0.05) == "contradicted"
    assert directional_verdict(0.20, -0.2, -1, 0.05) == "inconclusive"
    assert directional_verdict(float("nan"), -0.2, -1, 0.05) == "inconclusive"
    tight = Effect("d", 0.001, -0.002, 0.004, 0.5, 10, "t", df=9, se=0.001)
    assert equivalence_verdict(tight, 0.01, 0.05)[0] == "reproduced"
    far = Effect("d", 0.05, 0.04, 0.06, 1e-6, 10, "t", df=9, se=0.004)
    assert equivalence_verdict(far, 0.01, 0.05)[0] == "contradicted"
    wide = Effect("d", 0.0, -0.05, 0.05, 1.0, 3, "t", df=2, se=0.02)
    assert equivalence_verdict(wide, 0.01, 0.05)[0] == "inconclusive"


def _synthetic_bn_effect(rng, effect, n_seeds, noise=0.02):
    seed_level = rng.normal(0, 0.05, n_seeds)
    none = 0.8 + seed_level + rng.normal(0, noise, n_seeds)
    bn = 0.8 + effect + seed_level + rng.normal(0, noise, n_seeds)
    return bn, none


@pytest.mark.parametrize("effect,expected", [(-0.15, "reproduced"), (+0.15, "contradicted"), (0.0, None)])
def test_verdict_rates_on_simulated_studies(effect, expected):
    """Paired BN-vs-none robustness over 5 seeds with a known effect: the computed
    verdict is right far more often than not, and a null effect is called reproduced
    or contradicted at most at the test's level (Holm over one finding = raw p)."""
    rng = np.random.default_rng(0)
    reps, counts = 400, {"reproduced": 0, "contradicted": 0, "inconclusive": 0}
    for _ in range(reps):
        bn, none = _synthetic_bn_effect(rng, effect, 5)
        e = paired_effect(bn, none)
        counts[directional_verdict(e.p_value, e.estimate, -1, 0.05)] += 1
    if expected is None:
        false = counts["reproduced"] + counts["contradicted"]
        assert false / reps <= 0.05 + 4.5 * math.sqrt(0.05 * 0.95 / reps), counts
    else:
        assert counts[expected] / reps > 0.9, counts


def test_finalise_applies_holm_and_computes_theory_verdicts():
    e1 = Effect("a", -0.1, -0.2, -0.05, 0.01, 5, "t", df=4, se=0.02)
    e2 = Effect("b", -0.1, -0.2, 0.01, 0.03, 5, "t", df=4, se=0.03)
    th = Effect("t", 0.2, 0.1, 0.3, 0.001, 5, "t", df=4, se=0.03)
    out = finalise_findings([Finding("s", "c1", "x", "direction", e1, expected_sign=-1, theory_effect=th),
                             Finding("s", "c2", "x", "direction", e2, expected_sign=-1)], 0.05)
    assert out[0].p_holm == pytest.approx(0.02) and out[1].p_holm == pytest.approx(0.03)
    assert [f.verdict for f in out] == ["reproduced", "reproduced"]
    assert out[0].theory == "predicted the opposite" and out[1].theory == "no prediction"
    out = finalise_findings([Finding("s", "c", "x", "direction", e2, expected_sign=-1)] * 3, 0.05)
    assert all(f.verdict == "inconclusive" for f in out)  # 3 × 0.03 > 0.05 after Holm


def test_fieller_interval_coverage():
    """Fieller's interval for the vertex of a fitted quadratic covers the true vertex
    at the nominal rate (normal errors, seed offsets)."""
    import statsmodels.api as sm

    from noiseprop.empirical.studies.learning_rate import fieller_vertex

    rng = np.random.default_rng(5)
    x = np.tile(np.linspace(-1, 1, 6), 3)
    seed = np.repeat([0, 1, 2], 6)
    X = pd.DataFrame({"Intercept": 1.0, "x": x, "I(x ** 2)": x ** 2, "s1": (seed == 1) * 1.0, "s2": (seed == 2) * 1.0})
    reps, hits = 400, 0
    for _ in range(reps):
        y = 0.5 + 0.04 * x - 0.1 * x ** 2 + rng.normal(0, 0.05, 3)[seed] + rng.normal(0, 0.02, x.size)
        res = sm.OLS(y, X).fit()
        lo, hi = fieller_vertex(res, 0.0, 0.95)
        hits += lo <= 0.2 <= hi  # true vertex: -0.04 / (2 * -0.1)
    assert abs(hits / reps - 0.95) <= 4.5 * math.sqrt(0.05 * 0.95 / reps), hits / reps


def test_peak_location_and_interior_gain_are_exact_on_parabolas():
    from noiseprop.empirical.studies.learning_rate import interior_gain, peak_location

    x = np.linspace(-3, -1, 6)
    for peak in (-2.3, -1.9, -1.45):
        m = (0.9 - 0.2 * (x - peak) ** 2)[None]
        assert peak_location(m, x)[0] == pytest.approx(peak)
        assert interior_gain(m)[0] == pytest.approx(m[0, 1:-1].max() - m[0, [0, -1]].max())
    mono = (0.5 + 0.1 * x)[None]
    assert peak_location(mono, x)[0] == x[-1] and interior_gain(mono)[0] < 0


def test_sweet_spot_test_on_known_curves():
    from noiseprop.empirical.studies.learning_rate import _sweet_spot

    rng = np.random.default_rng(1)
    lrs = list(np.logspace(-3, -1, 6))
    rows = []
    for s in range(4):
        off = rng.normal(0, 0.02)
        for lr in lrs:
            x = math.log10(lr) + 2.0  # peak at lr = 0.01
            rows.append({"seed": s, "lr": lr, "auc": 0.8 - 0.1 * x ** 2 + off + rng.normal(0, 0.005)})
    f = pd.DataFrame(rows)
    eff, info = _sweet_spot(f, "auc", 0.95, lrs)
    assert eff.estimate > 0 and eff.p_value < 0.01 and eff.ci_low > 0
    assert info["lr_star_ci_low"] < 0.01 < info["lr_star_ci_high"]
    assert info["quadratic_fieller_ci_low"] < 0.01 < info["quadratic_fieller_ci_high"]
    assert directional_verdict(eff.p_value, eff.estimate, +1, 0.05) == "reproduced"
    # monotone in every seed: an edge is best, significantly (no sweet spot in the range)
    mono = f.assign(auc=lambda d: 0.5 + 0.1 * np.log10(d["lr"]) + rng.normal(0, 0.003, len(d)))
    eff, info = _sweet_spot(mono, "auc", 0.95, lrs)
    assert eff.estimate < 0 and directional_verdict(eff.p_value, eff.estimate, +1, 0.05) == "contradicted"
    assert info["best_lr_observed"] == pytest.approx(lrs[-1])


# ----------------------------------------------------------------------------- plumbing
def test_grid_validation():
    with pytest.raises(ValueError, match="etas"):
        common.Grid(etas=(0.5, 0.1))
    with pytest.raises(ValueError, match="seeds"):
        common.Grid(seeds=(1, 1))
    with pytest.raises(ValueError, match="theory"):
        common.Grid(theory="exact")
    g = common.Grid(widths={"vgg": 8})
    assert g.width("vgg") == 8 and g.width("mlp") is None


def test_plans_share_models_between_studies():
    from noiseprop.empirical.studies import quick_grid, quick_options, study_module

    g = quick_grid()
    bn = study_module("batchnorm").plan(g, **quick_options()["batchnorm"])
    nt = study_module("norm_type").plan(g, **quick_options()["norm_type"])
    # the 'none' and 'L2 everywhere' models of study 4 are the k=0 and k=all models of study 2
    shared = set(bn.index["eval_key"]) & set(nt.index["eval_key"])
    assert len(shared) == 2 * len(g.seeds)
    assert len({t.key for t in bn.tasks}) == len(bn.tasks)
    with pytest.raises(ValueError, match="L2 reference"):
        study_module("norm_type").plan(g, archs=("mlp",), norms=("l1",))


def test_cli_study_rejects_bad_arguments(capsys):
    from noiseprop.empirical.cli import main
    from noiseprop.empirical.cli_study import _ks

    assert _ks(["0", "1", "all"]) == (0, 1, None)
    with pytest.raises(ValueError, match="--ks"):
        _ks(["two"])
    assert main(["study", "bogus"]) == 2
    assert "unknown study 'bogus'" in capsys.readouterr().err
    assert main(["study", "architecture", "--lrs", "0.1", "--quick"]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert main(["report", "--studies", "nope"]) == 2
    assert "unknown studies" in capsys.readouterr().err


# ----------------------------------------------------------------------------- power
@pytest.mark.parametrize("n,tests", [(3, 1), (5, 4), (8, 8)])
def test_minimum_detectable_effect_has_its_power_by_simulation(n, tests):
    """A paired t-test across n seeds whose true mean difference is the MDE (computed
    from the true standard error σ/√n) rejects at α/tests in 80% of simulated studies
    (4 standard errors of the simulated rate)."""
    from scipy import stats as st

    from noiseprop.empirical.studies.verdicts import minimum_detectable_effect

    sigma, alpha, sims = 0.05, 0.05, 4000
    e = Effect("d", 0.0, -1.0, 1.0, 1.0, n, "paired t", df=n - 1, se=sigma / math.sqrt(n))
    mde = minimum_detectable_effect(e, alpha, 0.8, tests=tests)
    rng = np.random.default_rng(n * 100 + tests)
    d = rng.normal(mde, sigma, size=(sims, n))
    p = st.ttest_1samp(d, 0.0, axis=1).pvalue
    rate = float(np.mean(p < alpha / tests))
    assert abs(rate - 0.8) <= 4 * math.sqrt(0.8 * 0.2 / sims), (rate, mde)


def test_mde_in_findings_and_inconclusive_conclusions():
    from noiseprop.empirical.studies.verdicts import minimum_detectable_effect

    rng = np.random.default_rng(3)
    a, b = rng.normal(0.80, 0.03, 4), rng.normal(0.79, 0.03, 4)
    f = Finding("s", "claim", "src", "direction", paired_effect(a, b, "a − b", unit="normalised accuracy"),
                expected_sign=-1, paper_effect=-0.83, paper_note="VGG-16")
    (g,) = finalise_findings([f], 0.05)
    assert g.mde == pytest.approx(minimum_detectable_effect(g.effect, 0.05, 0.8, tests=1))
    if g.verdict == "inconclusive":
        c = g.conclusion()
        assert c.startswith("inconclusive: this grid could detect effects ≥ ") and "paper reported −0.83" in c.replace("-", "−")
    assert set(g.to_dict()) >= {"mde", "paper_effect", "conclusion", "mechanism"}
    # no interval, no power: stated as such
    nan = float("nan")
    e = Effect("x", 0.1, nan, nan, nan, 2, "too few")
    assert math.isnan(minimum_detectable_effect(e))
    with pytest.raises(ValueError, match="power"):
        minimum_detectable_effect(e, power=1.5)
    with pytest.raises(ValueError, match="kind"):
        minimum_detectable_effect(e, kind="two-sided")
    # a bootstrap effect (interval, no se): the half-width stands for the se (normal)
    e = Effect("x", 0.0, -1.96, 1.96, 0.9, 10, "bootstrap")
    assert minimum_detectable_effect(e) == pytest.approx((1.959964 + 0.841621) * 1.96 / 1.959964, rel=1e-6)


def test_round_to_ci_keeps_what_the_interval_supports():
    from noiseprop.empirical.report import round_to_ci

    assert round_to_ci(0.123456, 0.10, 0.15) == "0.123 [0.100, 0.150]"  # half-width 0.025: a leading 2
    assert round_to_ci(0.123456, 0.08, 0.16) == "0.12 [0.08, 0.16]"
    assert round_to_ci(-0.002411, -0.0102, 0.0054, "u") == "−0.002 [−0.010, 0.005] u"
    assert round_to_ci(12.3456, 2.0, 22.0) == "12 [2, 22]"


# ----------------------------------------------------------------------------- validation
def test_validation_tables_go_through_compare_cells():
    """The studies' validation is the tested compare_cells (via combine_cells) on the
    stored rows: the same Holm adjustment and calibration."""
    from noiseprop.empirical import compare, compare_cells, monte_carlo
    from noiseprop.empirical.studies.validation import agreement, validation_tables
    from noiseprop.theory import RelativeGaussian, predict

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    comps = {eta: compare(predict(net, x, y, RelativeGaussian(eta)),
                          monte_carlo(net, x, y, RelativeGaussian(eta), draws=40, seed=0)) for eta in (0.02, 0.05, 0.1)}
    ref = compare_cells(comps)
    rows = pd.concat([c.to_frame().assign(eta=eta) for eta, c in comps.items()], ignore_index=True)
    cells, summary = validation_tables(rows, 0.05, 0.95)
    np.testing.assert_allclose(cells["tost_p_holm"].to_numpy(float), ref.frame["tost_p_holm"].to_numpy(float))
    for q, cal in ref.calibrations.items():
        r = summary[summary["quantity"] == q].iloc[0]
        assert r["cal_slope"] == pytest.approx(cal.slope, nan_ok=True)
    acc = summary[summary["quantity"] == "accuracy"].iloc[0]
    assert acc["agreement"] == pytest.approx(float(np.mean(agreement(rows[rows["quantity"] == "accuracy"]))))
    assert acc["agreement"] >= acc["ci_contains_prediction"]


def test_models_below_the_floor_are_excluded_with_the_reason():
    from noiseprop.empirical.studies.frames import below_floor, diverged_notes, excluded_frame
    from noiseprop.empirical.studies.study_cells import StudyPlan

    idx = pd.DataFrame([{"arch": "vgg", "norm": "bn", "seed": s, "train_key": f"t{s}", "eval_key": f"e{s}"}
                        for s in range(3)])
    results = {"t0": {"test_accuracy": 0.97}, "t1": {"test_accuracy": 0.60}, "t2": {"diverged": "loss NaN"}}
    plan = StudyPlan("s", "S", (), idx, {})
    g = common.Grid(min_clean_accuracy=0.95)
    assert below_floor(results, idx.iloc[0], g) == ""
    assert "below the floor 0.95" in below_floor(results, idx.iloc[1], g)
    assert below_floor(results, idx.iloc[1], common.Grid()) == ""  # no floor: kept
    notes = diverged_notes(plan, results, g)
    assert len(notes) == 2 and "seed=1" in notes[0] and "diverged" in notes[1]
    ex = excluded_frame(plan, results, g)
    assert ex["included"].tolist() == [True, False, False]
    with pytest.raises(ValueError, match="min_clean_accuracy"):
        common.Grid(min_clean_accuracy=1.5)


def test_default_and_paper_grids():
    from noiseprop.empirical.report import ReportConfig, make_report
    from noiseprop.empirical.studies import PAPER_COST, default_grid, paper_grid, paper_options

    g = default_grid()
    assert g.min_clean_accuracy == 0.95 and g.theory == "moments" and min(g.widths.values()) >= 8
    assert g.n_test == 100 and g.etas == (0.0, 0.1, 0.3, 0.5, 0.75, 1.0)
    p = paper_grid()
    assert p.dataset == "cifar10" and p.widths is None and p.epochs is None
    assert default_grid(dataset="cifar100").dataset == "cifar100"
    assert set(paper_options()) == {"architecture", "batchnorm", "learning_rate", "norm_type"}
    assert "GPU-hours" in PAPER_COST
    with pytest.raises(ValueError, match="scale"):
        make_report(ReportConfig(scale="huge", progress=False))
    with pytest.raises(ValueError, match="quick"):
        make_report(ReportConfig(scale="paper", quick=True, progress=False))


def test_study_theory_uses_the_study_moment_settings():
    from noiseprop.empirical.studies.theory_helpers import MOMENT_SETTINGS, _theory_curve
    from noiseprop.theory import Targets
    from noiseprop.theory.examples import tiny_problem

    net, x, y = tiny_problem()
    preds = _theory_curve(net, x, y, [0.0, 0.2], Targets(), "moments")
    assert preds[0] is None
    assert (preds[1].diagnostics["rank"], preds[1].diagnostics["h2_rank"]) == \
        (MOMENT_SETTINGS["rank"], MOMENT_SETTINGS["h2_rank"])
    lin = _theory_curve(net, x, y, [0.0, 0.2], Targets(), "linear")
    assert "h2_rank" not in lin[1].diagnostics
