"""Study 5 (noise_aware) end to end at reduced size: plan, cells, analysis, figures."""
import pytest

from noiseprop.empirical.cli import main


@pytest.mark.slow
def test_noise_aware_study_quick(tmp_path):
    from noiseprop.empirical.studies import STUDIES, PUBLISHED_STUDIES, quick_grid, quick_options, run_study

    assert "noise_aware" in STUDIES and "noise_aware" not in PUBLISHED_STUDIES
    grid = quick_grid(n_test=60, etas=(0.0, 0.3, 0.6), draws=3)
    res = run_study("noise_aware", grid, cache_dir=tmp_path, **quick_options()["noise_aware"])
    assert len(res.findings) == 3
    claims = " ".join(f.claim for f in res.findings)
    assert "more robust" in claims and "equal clean accuracy" in claims and "tr(Σ_ε H)" in claims
    m = res.tables["noise_aware_models"]
    assert set(m["training"]) == {"standard", "noise-aware"} and len(m) == 2 * len(grid.seeds)
    assert m["trace_digital"].notna().all() and m["pred_loss_increase_eta_train"].notna().all()
    ls = res.tables["noise_aware_layer_summary"]
    for _, g in ls.groupby("training"):
        assert abs(g["share_loss"].sum() - 1) < 1e-9
    assert {f.name for f in res.figures} >= {"noise_aware_curves", "noise_aware_layer_shares"}
    assert "Study 5" in res.summary()


def test_cli_study_noise_aware_arguments(capsys):
    assert main(["study", "batchnorm", "--train-eta", "0.2", "--quick"]) == 2
    assert "--train-eta applies to the noise_aware study" in capsys.readouterr().err
