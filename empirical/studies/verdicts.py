"""Findings and their verdicts, computed from Holm-adjusted p-values; the study result."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats as st

from ..stats import Effect, holm, tost_t

__all__ = ["VERDICTS", "directional_verdict", "equivalence_verdict", "theory_verdict", "Finding",
           "finalise_findings", "StudyResult", "minimum_detectable_effect", "POWER"]

#: The power at which the minimum detectable effect of every finding is stated.
POWER = 0.8

VERDICTS = ("reproduced", "contradicted", "inconclusive")


def directional_verdict(p: float, estimate: float, expected_sign: int, alpha: float) -> str:
    """``reproduced`` when the effect is significant (``p < alpha``) in the claimed
    direction, ``contradicted`` when significant in the opposite one, else
    ``inconclusive``."""
    if not (np.isfinite(p) and np.isfinite(estimate)):
        return "inconclusive"
    if p < alpha and np.sign(estimate) == np.sign(expected_sign):
        return "reproduced"
    if p < alpha and np.sign(estimate) == -np.sign(expected_sign):
        return "contradicted"
    return "inconclusive"


def equivalence_verdict(effect: Effect, margin: float, alpha: float) -> tuple[str, float]:
    """For a claim of *no difference*: TOST of ``|difference| < margin`` on the effect
    (its estimate, standard error and degrees of freedom). ``reproduced`` when
    equivalence is shown (TOST p < alpha), ``contradicted`` when the ``1 − 2α``
    interval lies wholly outside ``[−margin, margin]`` (a difference larger than the
    margin is shown), else ``inconclusive``. Returns ``(verdict, tost_p)``."""
    if not (np.isfinite(effect.se) and effect.se > 0 and np.isfinite(effect.estimate)):
        return "inconclusive", float("nan")
    p, _, _ = tost_t(effect.estimate, effect.se, effect.df, -margin, margin)
    q = st.t.ppf(1 - alpha, effect.df) if np.isfinite(effect.df) else st.norm.ppf(1 - alpha)
    lo, hi = effect.estimate - q * effect.se, effect.estimate + q * effect.se
    if p < alpha:
        return "reproduced", p
    if lo > margin or hi < -margin:
        return "contradicted", p
    return "inconclusive", p


def theory_verdict(verdict_of_prediction: str | None) -> str:
    """What the theory's predicted values say about a claim, from the same test run on
    them: ``predicted`` / ``predicted the opposite`` / ``not predicted`` / ``no
    prediction`` (theory unavailable)."""
    return {"reproduced": "predicted", "contradicted": "predicted the opposite",
            "inconclusive": "not predicted", None: "no prediction"}[verdict_of_prediction]


@dataclass(frozen=True)
class Finding:
    """One claim, its test on the measurements and the same test on the theory's
    predictions.

    ``kind``: "direction" (``expected_sign`` ±1) or "equivalence" (``margin``).
    ``effect``: the test on measurements; ``theory_effect``: on predicted values.
    ``p_holm``: ``effect.p_value`` (or the TOST p for equivalence) adjusted by Holm over
    the findings of the study; ``verdict`` and ``theory`` are computed from it by
    :func:`finalise_findings`.
    """

    study: str
    claim: str
    source: str
    kind: str
    effect: Effect
    expected_sign: int = 0
    margin: float = float("nan")
    theory_effect: Effect | None = None
    p_raw: float = float("nan")
    p_holm: float = float("nan")
    verdict: str = "inconclusive"
    theory: str = "no prediction"
    note: str = ""
    mde: float = float("nan")
    paper_effect: float = float("nan")
    paper_note: str = ""
    mechanism: str = ""

    def conclusion(self) -> str:
        """The verdict in words; an inconclusive one says what this grid could detect
        (the minimum detectable effect at 80% power) and what the paper reported."""
        if self.verdict != "inconclusive":
            return self.verdict
        unit = f" {self.effect.unit}" if self.effect.unit else ""
        if self.kind == "equivalence":
            det = (f"this grid could show equivalence within ±{_num(self.mde)}{unit}" if np.isfinite(self.mde)
                   else "this grid cannot estimate its power")
        else:
            det = (f"this grid could detect effects ≥ {_num(self.mde)}{unit}" if np.isfinite(self.mde)
                   else "this grid cannot estimate its power")
        paper = (f"the paper reported {_num(self.paper_effect)}{unit}" + (f" ({self.paper_note})" if self.paper_note
                                                                          else "")
                 if np.isfinite(self.paper_effect) else (self.paper_note or "the paper reports no effect size"))
        return f"inconclusive: {det}; {paper}"

    def to_dict(self) -> dict:
        e, t = self.effect, self.theory_effect
        return {"study": self.study, "claim": self.claim, "source": self.source, "test": e.method,
                "effect": e.estimate, "unit": e.unit, "ci_low": e.ci_low, "ci_high": e.ci_high,
                "effect_size": e.standardized, "n": e.n, "p": self.p_raw, "p_holm": self.p_holm,
                "verdict": self.verdict, "theory": self.theory,
                "theory_effect": t.estimate if t is not None else np.nan,
                "theory_ci_low": t.ci_low if t is not None else np.nan,
                "theory_ci_high": t.ci_high if t is not None else np.nan,
                "theory_p": t.p_value if t is not None else np.nan, "note": self.note,
                "mde": self.mde, "paper_effect": self.paper_effect, "paper_note": self.paper_note,
                "conclusion": self.conclusion(), "mechanism": self.mechanism}


def _raw_p(f: Finding, alpha: float) -> float:
    if f.kind == "equivalence":
        return equivalence_verdict(f.effect, f.margin, alpha)[1]
    return f.effect.p_value


def finalise_findings(findings: Sequence[Finding], alpha: float) -> list[Finding]:
    """Holm-adjust the findings' p-values (within the study) and compute every
    verdict from the adjusted values; the theory's verdict from the same test on the
    predicted values (Holm-adjusted over the theory tests of the study)."""
    findings = list(findings)
    if not findings:
        return []
    raw = np.array([_raw_p(f, alpha) for f in findings])
    adj, _ = holm(raw, alpha)
    traw = np.array([(_raw_p(replace(f, effect=f.theory_effect), alpha) if f.theory_effect is not None else np.nan)
                     for f in findings])
    tadj, _ = holm(traw, alpha)
    out = []
    for f, p, pa, tp in zip(findings, raw, adj, tadj):
        v = _verdict_from(f, f.effect, pa, alpha)
        tv = None
        if f.theory_effect is not None and np.isfinite(tp):
            tv = _verdict_from(f, f.theory_effect, tp, alpha)
        mde = minimum_detectable_effect(f.effect, alpha, POWER, tests=len(findings), kind=f.kind)
        out.append(replace(f, p_raw=float(p), p_holm=float(pa), verdict=v, theory=theory_verdict(tv), mde=mde))
    return out


def _num(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    return f"{v:.2g}" if a < 1 else f"{v:.3g}"


def _effect_se_df(effect: Effect) -> tuple[float, float]:
    """The effect's standard error and degrees of freedom; without a standard error
    (a bootstrap or F-test effect), the half-width of its interval over the normal
    quantile, with infinite degrees of freedom."""
    if np.isfinite(effect.se) and effect.se > 0:
        return float(effect.se), float(effect.df) if np.isfinite(effect.df) and effect.df > 0 else float("inf")
    if np.isfinite(effect.ci_low) and np.isfinite(effect.ci_high) and effect.ci_high > effect.ci_low:
        z = st.norm.ppf(0.5 + effect.confidence / 2)
        return float((effect.ci_high - effect.ci_low) / (2 * z)), float("inf")
    return float("nan"), float("nan")


def minimum_detectable_effect(effect: Effect, alpha: float = 0.05, power: float = POWER, tests: int = 1,
                              kind: str = "direction") -> float:
    """The smallest true effect the test of ``effect`` detects with probability
    ``power``, at the level ``alpha / tests`` (Holm's strictest step over ``tests``
    findings, so it holds whatever the finding's rank), taking the observed standard
    error as the true one (a sensitivity analysis of the grid, not of the estimate).

    ``kind="direction"``: the two-sided t-test with ``df`` degrees of freedom, exact by
    the non-central t: the δ solving ``P(|T_{df, δ/se}| > t_{1−a/2}) = power``.
    ``kind="equivalence"``: the smallest TOST margin shown with that power when the
    true difference is 0, ``(t_{1−a} + t_{(1+power)/2})·se``.
    Without a standard error the interval's half-width stands for it (normal
    quantiles). NaN when neither is available.

    >>> from noiseprop.empirical.stats import Effect
    >>> e = Effect("d", 0.0, -1.0, 1.0, 1.0, 10, "z", df=float("inf"), se=1.0)
    >>> round(minimum_detectable_effect(e), 2)   # (1.96 + 0.84)·se
    2.8
    """
    if kind not in ("direction", "equivalence"):
        raise ValueError(f"kind must be 'direction' or 'equivalence', got {kind!r}")
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    if not isinstance(tests, (int, np.integer)) or tests < 1:
        raise ValueError(f"tests must be an integer >= 1, got {tests!r}")
    se, df = _effect_se_df(effect)
    if not np.isfinite(se):
        return float("nan")
    a = alpha / int(tests)
    if kind == "equivalence":
        q = (lambda p: st.norm.ppf(p)) if not np.isfinite(df) else (lambda p: st.t.ppf(p, df))
        return float((q(1 - a) + q((1 + power) / 2)) * se)
    if not np.isfinite(df):
        return float((st.norm.ppf(1 - a / 2) + st.norm.ppf(power)) * se)
    crit = st.t.ppf(1 - a / 2, df)

    def pw(nc):
        return st.nct.sf(crit, df, nc) + st.nct.cdf(-crit, df, nc) - power

    approx = crit + st.t.ppf(power, df)  # the usual closed form, a close upper start
    try:
        hi = approx + 1.0
        for _ in range(60):
            v = pw(hi)
            if not np.isfinite(v) or v >= 0:
                break
            hi *= 2
        if not (np.isfinite(pw(hi)) and pw(hi) >= 0 and np.isfinite(pw(0.0))):
            return float(approx * se)
        return float(optimize.brentq(pw, 0.0, hi, xtol=1e-10) * se)
    except (ValueError, RuntimeError):  # scipy's non-central t fails far in the tail
        return float(approx * se)


def _verdict_from(f: Finding, effect: Effect, p_adj: float, alpha: float) -> str:
    if f.kind == "equivalence":
        v, _ = equivalence_verdict(effect, f.margin, alpha)
        if v == "reproduced" and not p_adj < alpha:
            return "inconclusive"
        return v
    return directional_verdict(p_adj, effect.estimate, f.expected_sign, alpha)


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyResult:
    """A study's tables (``tables``: name → DataFrame, each written as a CSV), its
    findings, and what it was run with (``params``)."""

    name: str
    title: str
    params: dict
    tables: dict
    findings: tuple
    notes: tuple = ()
    figures: tuple = ()

    def findings_frame(self) -> pd.DataFrame:
        return pd.DataFrame([f.to_dict() for f in self.findings])

    def summary(self) -> str:
        lines = [f"{self.title}"]
        for f in self.findings:
            lines.append(f"  [{f.verdict}] {f.claim}: {f.effect.describe()}; Holm p={f.p_holm:.3g}; theory: {f.theory}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        return "\n".join(lines)

    def to_frame(self) -> pd.DataFrame:
        return self.findings_frame()

    def __str__(self):
        return self.summary()
