"""Theory vs Monte-Carlo over the cells of a study or of the report.

One validation path: the Holm-adjusted TOST per cell and the calibration regression
across cells are :func:`noiseprop.empirical.compare.combine_cells` (the across-cell half
of the tested :func:`~noiseprop.empirical.compare.compare_cells`), applied to the rows
that each cell stored. On top of it, per quantity, plain shares a reader can check:
the median relative error, the share of cells whose Monte-Carlo interval contains the
prediction, and for the accuracy the share *agreeing*: inside that interval or within
``ACCURACY_TOLERANCE`` (1 point) of the Monte-Carlo mean.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..compare import combine_cells
from .theory_helpers import first_order_valid

__all__ = ["validation_tables", "validation_by_eta", "validation_by_method", "validation_by_model", "agreement",
           "ACCURACY_TOLERANCE"]

#: An accuracy prediction agrees with Monte-Carlo when inside its interval or within
#: this many accuracy units (1 percentage point) of its mean.
ACCURACY_TOLERANCE = 0.01


def agreement(frame: pd.DataFrame, tolerance: float = ACCURACY_TOLERANCE) -> np.ndarray:
    """Per row of prediction-vs-Monte-Carlo: the prediction lies inside the Monte-Carlo
    interval ``[ci_low, ci_high]`` or within ``tolerance`` of the observed mean.

    >>> agreement(pd.DataFrame({"predicted": [0.5, 0.5, 0.5], "observed": [0.505, 0.6, 0.6],
    ...                         "ci_low": [0.5, 0.45, 0.58], "ci_high": [0.51, 0.7, 0.62]})).tolist()
    [True, True, False]
    """
    pred = frame["predicted"].to_numpy(float)
    inside = (frame["ci_low"].to_numpy(float) <= pred) & (pred <= frame["ci_high"].to_numpy(float))
    close = np.abs(pred - frame["observed"].to_numpy(float)) <= tolerance
    return inside | close


def validation_tables(comp: pd.DataFrame, alpha: float, confidence: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prediction vs Monte-Carlo over all cells: ``(cells, summary)``. ``cells``: the
    rows with ``tost_p_holm`` / ``equivalent_holm`` (Holm within each quantity, by
    :func:`~noiseprop.empirical.compare.combine_cells`); ``summary``: per quantity, the
    number of cells, the median |relative error|, the share of cells whose interval
    contains the prediction, the share agreeing (:func:`agreement`; accuracy only), the
    equivalences after Holm and the calibration regression across cells."""
    if comp.empty or "quantity" not in comp.columns:
        return comp, pd.DataFrame()
    cc = combine_cells(comp.drop(columns=[c for c in ("tost_p_holm", "equivalent_holm") if c in comp.columns]),
                       alpha, confidence)
    cells = cc.frame
    cells["equivalent_holm"] = cells["equivalent_holm"].fillna(False).astype(bool)
    rows = []
    for q, sub in cells.groupby("quantity", sort=False):
        obs, pred = sub["observed"].to_numpy(float), sub["predicted"].to_numpy(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(pred - obs) / np.abs(obs)
        inside = (sub["ci_low"].to_numpy(float) <= pred) & (pred <= sub["ci_high"].to_numpy(float))
        row = {"quantity": q, "cells": int(len(sub)), "median_abs_rel_error": float(np.nanmedian(rel)),
               "ci_contains_prediction": float(np.mean(inside)),
               "agreement": float(np.mean(agreement(sub))) if q == "accuracy" else np.nan,
               "equivalent_after_holm": int(sub["equivalent_holm"].sum())}
        row.update({f"cal_{k}": v for k, v in cc.calibrations[q].to_dict().items()})
        rows.append(row)
    return cells, pd.DataFrame(rows)


def validation_by_eta(comp: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Where the theory holds: per noise placement and η, for the accuracy, the number
    of cells, the median and largest |predicted − observed| (accuracy points), the
    share of cells whose Monte-Carlo interval contains the prediction, the share
    agreeing (inside or within 1 point), the median relative error of the logit
    variance, and the mean first-order validity diagnostic (fraction of ReLU
    pre-activations whose predicted noise sd exceeds their magnitude)."""
    if comp.empty or "quantity" not in comp.columns:
        return pd.DataFrame()
    rows = []
    for (variant, eta), d in comp.groupby(["variant", "eta"], sort=True):
        a = d[d["quantity"] == "accuracy"]
        v = d[d["quantity"] == "logit_var"]
        err = (a["predicted"] - a["observed"]).abs().to_numpy(float)
        inside = ((a["ci_low"] <= a["predicted"]) & (a["predicted"] <= a["ci_high"])).to_numpy(bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            vrel = np.abs((v["predicted"] - v["observed"]) / v["observed"]).to_numpy(float)
        rows.append({"variant": variant, "eta": float(eta), "cells": int(len(a)),
                     "accuracy_median_abs_error": float(np.median(err)) if err.size else np.nan,
                     "accuracy_max_abs_error": float(np.max(err)) if err.size else np.nan,
                     "accuracy_ci_contains_prediction": float(np.mean(inside)) if inside.size else np.nan,
                     "accuracy_agreement": float(np.mean(agreement(a))) if len(a) else np.nan,
                     "logit_var_median_rel_error": float(np.nanmedian(vrel)) if vrel.size else np.nan,
                     "preact_frac": float(d["preact_frac"].astype(float).mean()) if "preact_frac" in d else np.nan})
    return pd.DataFrame(rows)


def validation_by_method(comp: pd.DataFrame) -> pd.DataFrame:
    """The accuracy agreement (:func:`agreement`) per prediction method: moment
    propagation, the first order in all its cells, and the first order where its
    validity diagnostic holds (:func:`~noiseprop.empirical.studies.theory_helpers.first_order_valid`).

    >>> rows = pd.DataFrame({"quantity": "accuracy", "method": ["moments", "linear", "linear"],
    ...                      "predicted": [0.5, 0.5, 0.5], "observed": [0.5, 0.5, 0.9],
    ...                      "ci_low": [0.45, 0.45, 0.85], "ci_high": [0.55, 0.55, 0.95], "preact_frac": [0.5, 0.05, 0.6]})
    >>> validation_by_method(rows)[["theory", "cells", "agreement"]].values.tolist()
    [['moment propagation', 1, 1.0], ['first order, all cells', 2, 0.5], ['first order, where its validity diagnostic holds', 1, 1.0]]
    """
    if comp.empty or "quantity" not in comp.columns:
        return pd.DataFrame()
    a = comp[comp["quantity"] == "accuracy"]
    method = a["method"] if "method" in a.columns else pd.Series("linear", index=a.index)
    ok = agreement(a)
    inside = ((a["ci_low"] <= a["predicted"]) & (a["predicted"] <= a["ci_high"])).to_numpy(bool)
    rows = []
    for name, mask in (("moment propagation", (method == "moments").to_numpy()),
                       ("first order, all cells", (method == "linear").to_numpy()),
                       ("first order, where its validity diagnostic holds",
                        (method == "linear").to_numpy() & first_order_valid(a["preact_frac"],
                                                                            a.get("first_order_flagged")))):
        if mask.any():
            rows.append({"theory": name, "cells": int(mask.sum()), "agreement": float(ok[mask].mean()),
                         "ci_contains_prediction": float(inside[mask].mean())})
    return pd.DataFrame(rows)


def validation_by_model(comp: pd.DataFrame) -> pd.DataFrame:
    """Where the theory misses, per model family: for the accuracy, per architecture,
    normalisation (and number of normalised layers), learning rate and noise placement
    (the columns present), the number of cells, the share agreeing
    (:func:`agreement`), the mean signed and the largest absolute error (accuracy
    points, predicted − Monte-Carlo: positive is optimistic) and the η of the largest.

    >>> rows = pd.DataFrame({"quantity": "accuracy", "arch": ["vgg", "vgg", "mlp"], "norm": ["bn", "bn", "none"],
    ...                      "variant": "digital", "eta": [0.1, 0.5, 0.5], "predicted": [0.9, 0.75, 0.8],
    ...                      "observed": [0.9, 0.5, 0.8], "ci_low": [0.89, 0.45, 0.79], "ci_high": [0.91, 0.55, 0.81]})
    >>> validation_by_model(rows)[["arch", "cells", "agreement", "mean_error_points", "worst_eta"]].values.tolist()
    [['mlp', 1, 1.0, 0.0, 0.5], ['vgg', 2, 0.5, 12.5, 0.5]]
    """
    if comp.empty or "quantity" not in comp.columns:
        return pd.DataFrame()
    a = comp[comp["quantity"] == "accuracy"]
    # n_norm: BatchNorm in the first k layers apart from everywhere; lr: the learning-rate
    # study's models apart from the architecture study's
    keys = [k for k in ("arch", "norm", "n_norm", "lr", "variant") if k in a.columns]
    if a.empty or not keys:
        return pd.DataFrame()
    a = a.assign(_ok=agreement(a), _err=100 * (a["predicted"].astype(float) - a["observed"].astype(float)))
    rows = []
    for key, d in a.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        worst = d["_err"].abs().idxmax()
        rows.append({**dict(zip(keys, key)), "cells": int(len(d)), "agreement": float(d["_ok"].mean()),
                     "mean_error_points": float(d["_err"].mean()),
                     "max_abs_error_points": float(d["_err"].abs().max()), "worst_eta": float(d.loc[worst, "eta"])})
    return pd.DataFrame(rows)
