"""Parity with IBM aihwkit's PCM simulation (issue 12): the same trained network, the
same PCM model (``PCMLikeNoiseModel``, g_max = 25 µS, g_min = 0, one conductance pair per
weight, max|W| per layer, global drift compensation on/off) at t = 1 h, 1 day, 1 year:
aihwkit's simulation against noiseprop's Monte-Carlo (``drift_sweep``) and prediction
(``predict_drift``), differences with 95% CIs.

Runs in a separate environment that has aihwkit (not a dependency of noiseprop):

    python3 -m venv /work/aihwkit-venv
    /work/aihwkit-venv/bin/pip install /path/to/torch-cpu.whl          # any torch works
    /work/aihwkit-venv/bin/pip install -c constraints.txt aihwkit==1.1.0   # constraints: torch==<that version>
    /work/aihwkit-venv/bin/pip install -c constraints.txt -e . pandas scipy statsmodels sympy tqdm scikit-learn
    /work/aihwkit-venv/bin/python benchmarks/aihwkit_parity.py [--models mlp,resnet20] [--draws 40]

aihwkit side: ``TorchInferenceRPUConfig`` (pure torch, works with any torch) with a
perfect forward pass (no IO noise, no DAC/ADC quantisation), weight scaling to
max|W| = 1 per layer (``weight_scaling_omega=1``, not column-wise), no tile splitting,
digital biases, no clipping; ``convert_to_analog`` keeps BatchNorm digital, as noiseprop's
default targets do. One draw = one conversion + ``program_analog_weights()``, then
``drift_analog_weights(t)`` at each time (the same programmed chip at every time, as
noiseprop's common random numbers). aihwkit draws from the global torch RNG (seeded).

One JSON line per (model, compensation, time).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings

import numpy as np
import torch
from scipy import stats


def emit(row):
    print(json.dumps(row), flush=True)


def _ci(v, conf=0.95):
    v = np.asarray(v, dtype=np.float64)
    se = v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(se)


def _diff_ci(a, b, conf=0.95):
    """Welch interval for mean(a) − mean(b) (independent samples)."""
    ma, sa = _ci(a)
    mb, sb = _ci(b)
    se = math.sqrt(sa**2 + sb**2)
    dof = (sa**2 + sb**2) ** 2 / (sa**4 / (len(a) - 1) + sb**4 / (len(b) - 1)) if se > 0 else 1.0
    h = float(stats.t.ppf(0.5 + conf / 2, dof)) * se
    return ma - mb, (ma - mb - h, ma - mb + h)


def aihwkit_rpu(compensation: bool, prog: float, drift: float, read: float):
    from aihwkit.inference import GlobalDriftCompensation, PCMLikeNoiseModel
    from aihwkit.simulator.configs import TorchInferenceRPUConfig
    from aihwkit.simulator.parameters.enums import WeightClipType

    rpu = TorchInferenceRPUConfig()
    rpu.forward.is_perfect = True
    rpu.mapping.weight_scaling_omega = 1.0
    rpu.mapping.weight_scaling_columnwise = False
    rpu.mapping.digital_bias = True
    rpu.mapping.max_input_size = 0
    rpu.mapping.max_output_size = 0
    rpu.clip.type = WeightClipType.NONE
    rpu.noise_model = PCMLikeNoiseModel(g_max=25.0, prog_noise_scale=prog, drift_scale=drift, read_noise_scale=read)
    rpu.drift_compensation = GlobalDriftCompensation() if compensation else None
    return rpu


@torch.no_grad()
def aihwkit_curve(model, x, y, times, draws, compensation, scales, seed=0):
    from aihwkit.nn.conversion import convert_to_analog

    acc = np.empty((len(times), draws))
    rpu = aihwkit_rpu(compensation, *scales)
    torch.manual_seed(seed)
    for d in range(draws):
        analog = convert_to_analog(copy.deepcopy(model), rpu)
        analog.eval()
        analog.program_analog_weights()
        for i, t in enumerate(times):
            analog.drift_analog_weights(t)
            acc[i, d] = float((analog(x).argmax(1) == y).double().mean())
    return acc


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mlp,resnet20")
    ap.add_argument("--draws", type=int, default=40)
    ap.add_argument("--times", default="3600,86400,3.15e7")
    ap.add_argument("--scales", default="1,1,1", help="prog,drift,read noise scales")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    import aihwkit

    from noiseprop.empirical import drift_sweep, load_dataset, train
    from noiseprop.theory import PCMLike, predict_drift

    models = {"mlp": "mlp", "vgg": {"name": "vgg", "norm": "bn"}, "resnet20": {"name": "resnet20", "norm": "bn"}}
    times = [float(t) for t in a.times.split(",")]
    scales = tuple(float(s) for s in a.scales.split(","))
    data = load_dataset("digits")
    x, y = data.x_test, data.y_test
    for name in a.models.split(","):
        model = train(models[name], data, seed=0).model.eval()
        for comp in (True, False):
            noise = PCMLike(compensation=comp, prog_noise_scale=scales[0], drift_scale=scales[1],
                            read_noise_scale=scales[2])
            t0 = time.perf_counter()
            ak = aihwkit_curve(model, x, y, times, a.draws, comp, scales)
            t_ak = time.perf_counter() - t0
            t0 = time.perf_counter()
            mc = drift_sweep(model, x, y, noise, times, draws=a.draws, seed=0, progress=False)
            t_mc = time.perf_counter() - t0
            pred = predict_drift(model, x, y, noise, times, accuracy_draws=0)
            for i, t in enumerate(times):
                m_ak, se_ak = _ci(ak[i])
                m_np, se_np = _ci(mc.accuracies[i])
                d, (lo, hi) = _diff_ci(mc.accuracies[i], ak[i])
                tq = float(stats.t.ppf(0.975, a.draws - 1))
                p = float(pred.accuracy[i])
                emit(dict(model=name, compensation=comp, time_s=t, scales=scales, draws=a.draws,
                          aihwkit=round(m_ak, 4), aihwkit_ci=[round(m_ak - tq * se_ak, 4), round(m_ak + tq * se_ak, 4)],
                          noiseprop_mc=round(m_np, 4), mc_minus_aihwkit=round(d, 4),
                          mc_minus_aihwkit_ci=[round(lo, 4), round(hi, 4)], mc_agrees=bool(lo <= 0 <= hi),
                          predicted=round(p, 4), predicted_minus_aihwkit=round(p - m_ak, 4),
                          predicted_in_aihwkit_ci=bool(m_ak - tq * se_ak <= p <= m_ak + tq * se_ak),
                          aihwkit_s_per_draw=round(t_ak / a.draws, 3), noiseprop_s_per_draw=round(t_mc / a.draws, 3),
                          aihwkit_version=aihwkit.__version__, torch=torch.__version__))


if __name__ == "__main__":
    main()
