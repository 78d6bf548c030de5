"""Bad input to the report, the studies and the executor (second bad-input probe,
cases RP1-RP4 and ST1): refused with an error naming the argument (the flag, exit 2,
one line, on the command line) before any work starts."""
from __future__ import annotations

import importlib

import pytest

from noiseprop.empirical import cli_study
from noiseprop.empirical.executor import SerialExecutor, make_executor
from noiseprop.empirical.report import ReportConfig
from noiseprop.empirical.studies import Grid, quick_grid, run_study
from test_bad_input import _cli, _one_line_error  # the CLI helpers of the bad-input table

studies_pkg = importlib.import_module("noiseprop.empirical.studies")
report_mod = importlib.import_module("noiseprop.empirical.report")


def _forbid(monkeypatch, module, *names):
    def forbidden(*a, **k):
        raise AssertionError("the work started before the bad argument was refused")

    for n in names:
        monkeypatch.setattr(module, n, forbidden)


# RP1: 0 workers is refused everywhere (as NOISEPROP_WORKERS=0 is); 1 is the in-process executor
@pytest.mark.parametrize("cmd", [["report"], ["study", "norm_type"]])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_rp1_cli_workers_below_1_refused_before_work(capsys, tmp_path, monkeypatch, cmd, value):
    _forbid(monkeypatch, report_mod, "make_report")
    _forbid(monkeypatch, studies_pkg, "run_plans")
    _forbid(monkeypatch, cli_study, "make_executor")
    rc, _, err = _cli(capsys, *cmd, "--workers", value, "--quick", "--no-progress", "--out", tmp_path / "rep",
                      "--cache-dir", tmp_path / "cache")
    _one_line_error(rc, err, "--workers", ">= 1")


def test_rp1_make_executor_and_report_config_refuse_0():
    with pytest.raises(ValueError, match=r"workers must be an integer >= 1"):
        make_executor(0)
    with pytest.raises(ValueError, match=r"workers must be an integer >= 1"):
        make_executor("0")
    with pytest.raises(ValueError, match=r"workers must be an integer >= 1"):
        ReportConfig(workers=0)
    with pytest.raises(TypeError, match="workers"):
        ReportConfig(workers=1.5)
    assert isinstance(make_executor(1), SerialExecutor)
    assert isinstance(make_executor("serial"), SerialExecutor)
    assert ReportConfig(workers=1).workers == 1 and ReportConfig().workers is None


# RP2: a string is one study name, not its characters
def test_rp2_studies_string_is_one_study():
    assert ReportConfig(studies="architecture").studies == ("architecture",)
    assert ReportConfig(studies=["batchnorm", "norm_type"]).studies == ("batchnorm", "norm_type")
    with pytest.raises(ValueError, match=r"studies must be one or more of .*unknown: \['archi'\]"):
        ReportConfig(studies="archi")
    with pytest.raises(ValueError, match="studies"):
        ReportConfig(studies=())
    with pytest.raises(TypeError, match="studies must be"):
        ReportConfig(studies=3)


# RP3: seeds (and etas) are sequences of values, not a count
@pytest.mark.parametrize("name, value", [("seeds", 3), ("seeds", "012"), ("etas", 0.5)])
def test_rp3_seeds_etas_not_a_sequence(name, value):
    with pytest.raises(TypeError, match=rf"{name} must be None or a sequence"):
        ReportConfig(**{name: value})
    with pytest.raises(TypeError, match=rf"{name} must be a sequence"):
        Grid(**{name: value})
    with pytest.raises(TypeError, match=rf"{name} must be a sequence"):
        quick_grid(**{name: value})
    assert ReportConfig(seeds=[0, 1]).seeds == [0, 1] and quick_grid(seeds=[4, 5]).seeds == (4, 5)


# RP4: booleans are booleans
@pytest.mark.parametrize("name", ["quick", "progress"])
@pytest.mark.parametrize("value", ["no", 0, None])
def test_rp4_report_bools(name, value):
    with pytest.raises(TypeError, match=rf"{name} must be True or False"):
        ReportConfig(**{name: value})


# ST1: run_study checks the grid and the cache folder before planning or running anything
def test_st1_run_study_grid_string_refused_before_work(monkeypatch, tmp_path):
    _forbid(monkeypatch, studies_pkg, "run_plans")
    _forbid(monkeypatch, studies_pkg.study_module("norm_type"), "plan")
    with pytest.raises(TypeError, match=r"grid must be a Grid \(e\.g\. quick_grid\(\).*got str 'quick'"):
        run_study("norm_type", grid="quick", cache_dir=tmp_path)


def test_st1_run_study_cache_dir_file_refused_before_work(monkeypatch, tmp_path):
    _forbid(monkeypatch, studies_pkg, "run_plans")
    _forbid(monkeypatch, studies_pkg.study_module("norm_type"), "plan")
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ValueError, match="cache_dir .* is a file"):
        run_study("norm_type", grid=quick_grid(), cache_dir=f)
    with pytest.raises(ValueError, match="cache_dir .* cannot be created"):
        run_study("norm_type", grid=quick_grid(), cache_dir=f / "sub")
    with pytest.raises(ValueError, match="unknown study"):
        run_study("norm", grid=quick_grid(), cache_dir=tmp_path)
