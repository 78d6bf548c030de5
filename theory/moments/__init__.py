"""Moment propagation: logit means and covariances under weight noise beyond first
order (``predict(..., method="moments")``; docs/THEORY.md §2, §3, §9). The per-layer rule
for a noisy layer with a random input is derivation ``linear.random_input``
(``Cov(y) = W Γ Wᵀ + σ²(‖μ‖² + tr Γ)``); average pooling of the spatially correlated
errors of a convolution is derivation ``conv.pooling``.

Two passes per chunk of inputs, over the network traced with ``torch.fx``.

1. **Moment pass.** Every activation ``h`` is carried, per input, as a Gaussian with
   mean ``μ`` and a *low-rank-plus-diagonal* covariance

       h = μ + F ξ + diag(√d) ζ,     ξ ~ N(0, I_K) shared by all activations,
                                     ζ ~ N(0, I) independent per unit,

   so a residual connection adds two *correlated* tensors exactly (``F_skip + F_branch``
   in the same basis). Node by node:

   * Linear / Conv (``y = (W + N) x + b``): ``μ_y = Wμ + b``, ``F_y = W F`` (exact),
     ``d_y = (W∘W) d`` (the diagonal of ``W diag(d) Wᵀ``). The weight noise adds new
     independent sources of variance ``Σ_j σ_ij² E[x_j²]``, ``E[x²] = μ² + Var(x)`` — the
     noise also acts on the already perturbed input (docs/THEORY.md §2,
     ``σ²(‖μ‖² + tr Γ)``). A convolution reuses one kernel at every position, so its new
     noise is correlated across the positions of a channel:
     ``Cov(δy_{c,p}, δy_{c,q}) = σ_c² G_pq``, ``G`` the Gram matrix of the noisy input
     patches (mean patches, patches of every column of ``F``, and ``d``); its top
     ``spatial_rank`` eigenvectors give new columns per channel, the rest of each unit's
     (exact) variance goes to ``d``. The basis is then re-compressed to ``rank``
     columns: a variance-preserving random sketch of the joint columns of all live
     activations (``compression="sketch"``: correlations sketched, each unit's variance
     kept exactly) or their top eigenvectors (``"eigh"``); with at most ``rank`` units
     (an MLP no wider than ``rank``) the factorisation is exact.
   * BatchNorm-like layers in eval (any ``folding_affine()``): the affine map.
   * ReLU (LeakyReLU and ELU in closed form, :func:`~.gaussian.leaky_relu_moments`,
     :func:`~.gaussian.elu_moments`; GELU, SiLU, tanh, sigmoid, softplus by Gauss–Hermite
     quadrature, :func:`~.gaussian.smooth_moments`, with ``E f'`` for ``Φ``): with ``s² = Var``,
     ``α = μ/s``, the exact Gaussian moments ``E[relu] = μΦ(α) + sφ(α)``, ``E[relu²] = (μ² + s²)Φ(α) + μsφ(α)`` (the mean shift
     from activation flips that the first order misses) and, exact for Gaussians
     (Price's theorem), ``Cov(relu(h), ·) = Φ(α) Cov(h, ·)``.
   * Beyond the Gaussian, along residual connections: every ReLU output keeps its
     pre-activation (mean, variance, third cumulant), from which its own third cumulant
     is formed where a residual sum needs it; a sum of a ReLU output and a
     branch gets ``κ₃(r + b) = κ₃(r) + κ₃(b) + 3κ(r, r, b) + 3κ(r, b, b)`` with the
     cross cumulants of a rectified Gaussian (:func:`~.gaussian.rectified_cross_cumulants`,
     exact for jointly Gaussian ``a, b``; ``Cov(r, b)`` from the shared columns), and a
     ReLU of a skewed input uses the one-term Gram–Charlier closure
     (:func:`~.gaussian.relu_moments_skew`: mean, variance, slope ``P(z > 0)`` and the
     output's ``κ₃``; skewness clipped to ±1). Linear / Conv / pooling outputs are taken
     as Gaussian (docs/THEORY.md §3, "rectified skips").
   * Max pooling: Clark's (1961) moments of the maximum of two correlated Gaussians,
     pairwise over the window, with ``Cov(max, ·) = Φ(α)Cov(h₁, ·) + Φ(−α)Cov(h₂, ·)``.
     The maximum is skewed: each pairwise step also gives its third cumulant
     (:func:`~.gaussian.max_k3`, exact for two Gaussians), which the next step's
     ``relu(a − b)`` and the ReLU after the pool (a ``maxpool(relu(z))`` is traced as
     ``relu(maxpool(z))``) take through the Gram–Charlier closure (docs/THEORY.md §3,
     "skewed max-pooling").
   * Dropout and Identity (eval mode): the identity. Average pooling (also adaptive),
     ``mean``, flatten/view/reshape, slicing, zero padding, ``torch.cat`` and ``+``
     (residual, 1×1 projection shortcuts included): linear, applied to ``μ``, ``F`` and
     ``d`` alike.

   Optionally (``d_rank > 0``; off by default, see below) before a Linear/Conv layer
   maps its input, the input's diagonal part ``d`` is turned into ``d_rank`` sketched
   columns (Rademacher, each unit's variance exact), so the
   correlation that the layer creates between units fed by the same independent
   variance is kept (sketched) instead of dropped; the nonlinear excess of each ReLU /
   max beyond its linear part is carried partly as ``h2_rank`` columns: its second
   Hermite component ``2c₂ᵢc₂ⱼρᵢⱼ²``, by random features.

   The pass records, per ReLU / pairwise max, the std ``s`` (or ``θ = sd(h₁ − h₂)``) and
   the variance the expected-slope linearisation misses, ``Var(out) − Var(lin. part)``;
   per noisy layer, the noise acting on the input's perturbation: its exact per-unit
   variance ``Σ_j σ_cj² Var(x̃_pj)`` and, for a convolution, the perturbation patch Gram
   matrix (its spatial correlation).

2. **Surrogate pass.** The network's mean path with every ReLU replaced by its Gaussian
   expectation at the recorded ``s`` (``zΦ(z/s) + sφ(z/s)``, whose derivative is the
   expected slope ``Φ(z/s)``; with the recorded skewness, the Gram–Charlier mean) and every max-pool by Clark's expectation. Its output is
   the propagated logit mean (the mean shift); its Jacobian, computed exactly by one
   batched backward pass per class as in the linear method, maps every noise source to
   the logits:

       Cov(f) = Σ_θ σ_θ² J̃_θ J̃_θᵀ                         (weight noise on the mean input)
              + Σ_layers J̃_e (σ² ⊗ G_pert) J̃_eᵀ            (noise on the perturbation)
              + Σ_nonlin J̃_r diag(excess) J̃_rᵀ              (nonlinear excess variance)

   So the dominant first-order term is exact at every noise level (no truncation), with
   smoothed gates; the low-rank pass only supplies per-unit variances and local
   correlations. At small noise the surrogate is the network itself and the result is
   the linear method's.
3. **Accuracy.** Where the logits are a noisy Linear layer's output, they are Gaussian
   only given that layer's input ``h``: their scale ``v_c = Σ_j s_cj h_j²`` moves with
   ``h``. ``predict`` integrates this scale mixture (:mod:`.head`: Isserlis' moments of
   ``v`` and its covariance with the logits from the moment pass's ``h``, Gauss–Hermite
   along ``v``'s dominant direction) instead of taking the logits as Gaussian
   (``diagnostics["accuracy_model"]`` says which; docs/THEORY.md §7).

Package layout: :mod:`.gaussian` (the closed forms: ReLU moments, Clark's max, Hermite
coefficients, Gauss–Hermite moments of smooth activations; each tested against
``scipy.integrate.quad``), :mod:`.lowrank` (the ``μ + Fξ + √d ζ`` representation and its
algebra), :mod:`.interpreter` (the one graph walker both passes use), :mod:`.rules` (the
moment pass: one rule per layer kind), :mod:`.surrogate` (the surrogate pass and the
covariance), :mod:`.head` (the output layer's scale mixture). Defaults: ``rank = 32``,
``spatial_rank = 4`` (:data:`DEFAULT_RANK`, :data:`DEFAULT_SPATIAL_RANK`, the same in
``predict``).

Measured limits (zoo ResNet-20, width 8, BatchNorm, trained on digits; relative noise
η = 0.3; 200 test inputs, 200 Monte-Carlo draws, MC accuracy 0.918 ± 0.002;
``benchmarks/moments_diagnose.py``):

* Prediction 0.936 (+1.8 points). Gaussian logits with the *Monte-Carlo* mean and
  covariance give 0.927 (+0.9): the Gaussian-logit model alone costs about half the
  error. Predicted mean with Monte-Carlo covariance 0.931, Monte-Carlo mean with the
  predicted covariance 0.932–0.934: the rest is shared by the covariance and the mean.
* Logit variance: pooled ratio to Monte-Carlo 0.90 (rank 32) and 0.89 (rank 128);
  mean shift projected on Monte-Carlo's 0.91 (rank 32), 0.94 (rank 128).
* Per-ReLU pre-activation variance of the moment pass against Monte-Carlo: 1.00 in
  the first stage, falling to 0.92 (stage 2) and 0.84 (last block) at rank 32; 0.96
  and 0.92 at rank 128. Compression moves < 0.5% of the variance to the diagonal
  (the sketch preserves every unit's variance); what is lost is correlation between
  units, which the sketch randomises. The surrogate's logit variance does not follow
  the rank (0.90 → 0.89): its shortfall is not the moment pass's.
* Oracle: the surrogate fed with Monte-Carlo's own per-ReLU pre-activation mean and
  variance (for ``s`` and the excess; 48 inputs, 400 draws) gives a logit variance
  ratio of 0.87 (the moment pass's own statistics: 0.90). Split of the predicted
  variance, as shares of Monte-Carlo's: weight noise on the mean input (the exact
  smoothed Jacobian) 0.72, noise on the input's perturbation 0.085, gate excess 0.10.
  So the shortfall is not in the per-unit variances. Making the gate excess fully
  correlated within each channel (an upper bound on its spatial correlation) raises the
  ratio only to 0.92: the rest of the missing variance (≥ 8%) is in how the weight-noise
  term and the gates interact across layers (the smoothed Jacobian ``E[J]`` in place of
  ``E[J Σ Jᵀ]`` over many correlated gates), which neither the excess nor its second
  Hermite correlation restores.
* By where the noise is (only these layers noisy, η = 0.3): stem + stage 1: logit
  variance ratio 0.86 (the first order: 1.30); stage 2: 0.94; stage 3: 0.95; the final
  Linear alone: 0.99. The shortfall grows with the number of random ReLU gates a
  perturbation crosses: the expected-slope Jacobian plus an excess injected at each
  gate, independent across units beyond the second Hermite term, misses part of the
  gate fluctuation shared by units that one early perturbation reaches (they flip
  together).
* Knobs that do not move the result (rank 32): ``h2_rank`` 0/16/64, ``d_rank`` 0/16,
  ``spatial_rank`` 4/16, ``compression="eigh"``, and carrying the whole gate excess
  (not only its second Hermite part) in the correlated columns change the logit
  variance ratio by < 0.015 and the accuracy by < 0.1 point; ``d_rank = 0`` halves the
  moment pass's time (so it is now the default).

Accuracy curves (``benchmarks/fidelity.py --checks curve --n 150 --curve-draws 100
--methods moments``; error = predicted − Monte-Carlo, in points): MLP within 0.4 at
every level to η = 1.4 (relative); VGG with BatchNorm within 0.6 to η = 0.4, +2.6 at
0.5, +1.1 at 0.7 (earlier stops; retrained since). The VGG before → after the skewed
max-pooling (the same Monte-Carlo draws, run side by side): relative +1.40/+5.06 →
+1.25/+3.86 at η = 0.5/0.7 with BatchNorm digital, +1.39/+4.22 → +1.23/+3.05 folded;
relative-max +3.16 → +2.40 (digital) and +4.44 → +3.32 (folded) at η = 0.15;
multiplicative +2.46/+4.93 → +2.27/+3.74 at η = 0.5/0.7 (folded the same within 0.05).
Residual networks, before → after the rectified-skip
closure (the same Monte-Carlo draws, run side by side): ResNet-20 within 0.45 to η = 0.2,
then +1.8 → +1.7 (0.3), +4.2 → +3.6 (0.4), +6.1 → +4.2 (0.5) for relative noise with
BatchNorm digital, +1.8/+4.4/+6.8 → +1.6/+3.7/+5.1 folded; relative-max +2.2/+5.8 →
+2.0/+3.8 at η = 0.1/0.15 (folded +2.8/+6.9 → +2.5/+4.6); multiplicative
+1.4/+4.2/+7.7 → +1.2/+3.4/+5.8 at η = 0.3/0.4/0.5 (folded the same within 0.1);
ResNet-32 within 0.8 to η = 0.2, then +4.0 → +3.9 (0.3), +11.2 → +9.8 (0.4), +4.2 →
+1.8 (0.5); ResNet-56 within 1.3 to η = 0.2, then +5.3 → +5.3 (0.3), +14.5 → +13.9
(0.4), +17.0 → +15.1 (0.5); the small ResNet with its own block class (one identity
shortcut) unchanged within 0.05, worst −2.4 (η = 0.5, inside Monte-Carlo's interval).
The deeper the residual net, the more optimistic the prediction once the shortfall
above compounds. Stop 37: the surrogate's variance channel (:mod:`.surrogate`: each
unit's noise variance follows the means upstream, so the smoothed ReLUs and maxima
respond through their ``s`` too) closes much of it: worst curve errors (relative noise,
BatchNorm digital, ``fidelity.py --methods moments,moments_fixed_s``) ResNet-20 4.5 →
3.4, ResNet-32 6.9 → 3.5, ResNet-56 12.8 → 8.0, VGG 2.6 → 1.7 points; the MLP within a
point as before; the small ResNet 3.3 → 3.5 (under-predicted); docs/THEORY.md §9,
ninth pass.

Where the rest comes from (``benchmarks/moments_diagnose.py``-style per-ReLU statistics
of 300 Monte-Carlo draws, ResNet-20 with BatchNorm, relative η = 0.5): at the ReLU after
each residual sum ``h = r + b`` (``r`` the rectified skip, ``b`` the branch), the pooled
third cumulant splits as ``κ₃(r)`` 0.34–0.91, ``κ₃(b)`` −0.20–0.15, ``3κ(r, r, b)``
0.01–0.19 and ``3κ(r, b, b)`` 0.11–0.58 of the total. The rectified-Gaussian formulas
give ``3κ(r, r, b)`` about right (0.00–0.10) but ``3κ(r, b, b)`` only 0.01–0.04: the
branch's noise variance grows with the block's input (the weight noise acts on the
rectified skip, ``Var(n | x) = Σ σ²x²``), a heteroscedasticity the pass does not carry.
Carrying it was tried and not kept: a third-order cross moment ``H = ½E[ξ e²]`` per
unit and column (``e`` the independent part; formed at each noisy layer as
``Σ_j σ_ij²(μ_j F_j + H_j)`` plus a ReLU input's rectification part, mapped by ``W∘W``,
by the gates' slope², re-based with the columns, and adding ``2F·H`` to the cross
cumulants) raised the predicted median skewness at the post-sum ReLUs from about half to
65–80% of Monte-Carlo's (0.45/0.48 against 0.57/0.68 in the last stage), but moved the
accuracy by ≤ 0.4 point (0.5234 → 0.5252 at η = 0.5, 0.6371 → 0.6330 with BatchNorm in
the first layer only at η = 0.75; Monte-Carlo 0.4903 and 0.5634) for 30% more time
per sweep. So the rest of the error is mostly not skewness; the candidates left are
the excess kurtosis (below) and the correlation of gate flips across units (above). On
a VGG with BatchNorm in
its first layer only (relative η = 1.0) the pre-activations are negatively skewed
(median −0.1 to −0.4) with excess kurtosis up to 0.95, and the Gaussian closure with
Monte-Carlo's own mean and variance overestimates each ReLU's mean by 2–8.5%: a
closure with the fourth cumulant would be needed there.

At η = 0.4 (same model, 128 inputs, 150 draws; ``moments_diagnose.py --eta 0.4``):
Monte-Carlo 0.814 ± 0.006, predicted 0.863 (+4.9 points); Gaussian logits with
Monte-Carlo's mean and covariance 0.831 (+1.7: the Gaussian-logit limit), the predicted
mean with Monte-Carlo's covariance 0.851, Monte-Carlo's mean with the predicted
covariance 0.846; logit variance ratio 0.88, mean-shift projection 0.90; per-ReLU
pre-activation variance 0.74 of Monte-Carlo's in the last block. In a second run (other
draws, Monte-Carlo 0.822) the pass's own logit covariance (the sources carried as
columns end to end, no surrogate) was worse: variance ratio 0.65 (rank 32) and 0.74
(rank 96), accuracy +8.2 and +6.4 points, while rank 96 moved the surrogate's accuracy
by 0.1 point and the sketch's seed by ±0.1.

Not the cause (docs/THEORY.md §3, "gates under the Gaussian interpolation"): a
per-gate variance term. By the Gaussian interpolation ``Cov f = ∫₀¹ E[J(X) Σ J(Y_t)ᵀ]
dt``; for one ReLU the integrand runs from ``Φ²`` (expected slope squared) to ``Φ``
(the gate's second moment), and the closed form ``Φ²s² + excess`` is its integral, so
propagating variance through gates with ``Φ`` instead of ``Φ²`` would count the excess
twice; for Gaussian pre-activations the closure is exact. What would close the rest:
the cross-unit correlation of the gate fluctuations that one early perturbation causes
(units it reaches flip together; only the second Hermite term of it is carried) and
the per-unit variance it feeds back into the mean shift, estimated e.g. from
``E[J(X) Σ J(Y_t)ᵀ]`` at a few correlated pairs of sampled gate patterns; beyond
Gaussian logits a per-input scale mixture (heavier tails of the logit margin).

Cost (``benchmarks/moments_speed.py --n 120``, one thread): a 10-level moments sweep
against a 10-level Monte-Carlo sweep with 100 draws per level, speed-up (Monte-Carlo
time / moments time) on a quiet machine: ResNet-20 0.34–0.38, VGG 0.36–0.38, MLP 0.15;
one level alone 0.39–0.44 of a 100-draw level (ResNet-20, VGG). Profiled with cProfile
(ResNet-20, 120 inputs, 1.5 s per level): convolving the columns 0.23 s, the surrogate's
batched backward 0.2 s, re-mixing the columns at the noisy layers 0.34 s, patch Gram
matrices 0.11 s, the surrogate's injection covariance 0.14 s, the rest spread over
~75 000 small operations. Batched matrix products for the patch Gram matrix and the
injection covariance (the einsums they replace contracted separated axes: 3–4× and 2×
slower alone) and a ReLU rule that writes its columns once with known norms did not
change the per-level time measurably (paired runs, same load). What bounds it per level:
the pass carries ``rank + h2_rank`` = 48 columns through every convolution (as many
forward passes of the convolutions), re-mixes every live activation's columns at each
noisy layer (``K × rank`` per unit), forms a spatial Gram matrix per noisy convolution
(``K·C·L²``), and the surrogate costs one batched backward pass per class; Monte-Carlo
costs 100 plain forward passes per level, about what the columns and the backward pass
alone cost here, so 1× is not reachable by trimming. Nothing of the pass is shared
across levels (every gate's ``Φ(μ/s)`` depends on the level). What would go further:
fewer columns where the level is small (the moment prediction approaches the linear
one there; not measured), the previous level's eigenvectors to start the randomised
eigensolver, or a cheaper representation of a convolution's new noise than its patch
Gram eigenvectors (e.g. random kernels applied to the mean input).

The surrogate's smoothed ReLU and Clark's max attach their expected slopes directly
(:func:`~.gaussian.smooth_relu`: the value, plus ``slope·(z − z.detach())``, which is
zero), so the per-class backward pass is one product per gate instead of autograd's
chain through ``Φ`` and ``φ``; its injection covariance runs its products in the
signals' dtype (float64 accumulation, as the first-order weight terms). On the main
job's models (seed 0, 180 inputs, six levels, the studies' settings) one moments sweep
went from 17.0 to 11.3–15.0 s (VGG: the backward pass through its max-pool windows was
a third of the time) and from 12.4 to 10.2–11.2 s (ResNet-20), with the same accuracies
to 5e-5; the default report's theory time summed over cells from 880 to 735 s
(``benchmarks/report_time.py``, slower machine). The 10-level moments sweep at the
default settings (``benchmarks/moments_speed.py``, 359 inputs, that machine, the previous
code and this one back to back): ResNet-20 59.7 → 48.2 s (speed-up against Monte-Carlo
0.28 → 0.34), VGG 173 → 128 s (0.37 → 0.45); the surrogate part of one level 1.73 →
1.58 s and 2.48 → 1.79 s; MLP 0.36. Timings on that machine vary by about ±20% between
runs, so only paired figures compare.

A layer the propagation does not support (LayerNorm, attention, anything not listed)
raises ``ValueError`` naming it and pointing to ``method="linear"`` (which works for
any differentiable module).
"""
from .gaussian import clark_max, relu_moments, smooth_moments  # noqa: E402
from .rules import (DEFAULT_D_RANK, DEFAULT_H2_RANK, DEFAULT_RANK, DEFAULT_SPATIAL_RANK, UNIT_SPACE_MAX,  # noqa: E402
                    MomentPropagator, PassResult)
from .surrogate import MomentResult, propagate_moments  # noqa: E402

__all__ = ["MomentPropagator", "MomentResult", "PassResult", "propagate_moments", "relu_moments", "clark_max",
           "smooth_moments", "DEFAULT_RANK", "DEFAULT_SPATIAL_RANK", "DEFAULT_H2_RANK", "DEFAULT_D_RANK",
           "UNIT_SPACE_MAX"]
