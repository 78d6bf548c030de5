"""Monte-Carlo throughput: the engine against the naive study loop.

The naive loop is what published noise-injection studies do: for every draw, deep-copy
the model, add noise to its weights, evaluate the test set. The engine
(:func:`noiseprop.empirical.monte_carlo`) copies once, overwrites weights in place,
runs channels-last convolutions under inference mode and streams statistics.

Both use the same noise draws (same generator, same order), so their accuracies and
losses must agree up to float rounding; the JSON line reports the largest difference.
Timing alternates naive and engine blocks, so background load hits both alike, and
reports the median of per-block ratios.

Cases: (a) a VGG-style CNN with BatchNorm on 3×32×32 inputs, (b) an MLP on 1×8×8.
Also the achieved GFLOP/s of the engine's forward passes and the machine's float32
matmul GFLOP/s measured in the same run. One JSON line per result.

    .venv/bin/python benchmarks/mc_throughput.py [--draws 10] [--blocks 5] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from noiseprop.empirical import monte_carlo
from noiseprop.empirical.models import build_model
from noiseprop.theory import RelativeGaussian
from noiseprop.theory.targets import resolve_targets


def naive(model, x, y, noise, draws, seed, batch_size):
    names = resolve_targets(model).names
    g = torch.Generator().manual_seed(seed)
    accs, losses = [], []
    for _ in range(draws):
        net = copy.deepcopy(model)
        params = dict(net.named_parameters())
        with torch.no_grad():
            for n in names:
                params[n].copy_(noise.sample(params[n], g))
            lg = torch.cat([net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        accs.append((lg.argmax(1) == y).double().mean().item())
        losses.append(F.cross_entropy(lg.double(), y).item())
    return accs, losses


def matmul_gflops(n=1024, reps=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def forward_flops(model, x):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops()


def case(name, model, x, y, draws, blocks, batch_size):
    model.eval()
    noise = RelativeGaussian(0.1)
    # warm up both paths
    naive(model, x, y, noise, 1, 0, batch_size)
    monte_carlo(model, x, y, noise, draws=2, seed=0, batch_size=batch_size, progress=False)
    ratios, t_naive, t_engine, max_diff = [], [], [], 0.0
    for b in range(blocks):
        t = time.perf_counter()
        accs, losses = naive(model, x, y, noise, draws, b, batch_size)
        tn = (time.perf_counter() - t) / draws
        t = time.perf_counter()
        r = monte_carlo(model, x, y, noise, draws=draws, seed=b, batch_size=batch_size, progress=False)
        te = (time.perf_counter() - t) / draws
        ratios.append(tn / te)
        t_naive.append(tn)
        t_engine.append(te)
        max_diff = max(max_diff, max(abs(a - c) for a, c in zip(accs, r.accuracies)),
                       max(abs(a - c) for a, c in zip(losses, r.losses)))
    flops = forward_flops(model, x)
    te = statistics.median(t_engine)
    return {
        "benchmark": "mc_throughput", "case": name, "inputs": int(x.shape[0]), "in_shape": list(x.shape[1:]),
        "params": sum(p.numel() for p in model.parameters()), "draws_per_block": draws, "blocks": blocks,
        "naive_s_per_draw": statistics.median(t_naive), "engine_s_per_draw": te,
        "speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
        "max_abs_diff_acc_or_loss": max_diff, "engine_forward_gflops": flops / te / 1e9,
        "threads": torch.get_num_threads(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--inputs", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(json.dumps({"benchmark": "mc_throughput", "case": "machine_matmul_f32_1024", "gflops": matmul_gflops(),
                      "threads": torch.get_num_threads()}), flush=True)
    cnn = build_model("vgg", (3, 32, 32), 10, norm="bn", width=16, seed=0)
    x = torch.randn(args.inputs, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.inputs,), generator=g)
    print(json.dumps(case("cnn_bn_3x32x32", cnn, x, y, args.draws, args.blocks, args.batch_size)), flush=True)
    mlp = build_model("mlp", (1, 8, 8), 10, seed=0)
    x = torch.randn(args.inputs, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (args.inputs,), generator=g)
    print(json.dumps(case("mlp_1x8x8", mlp, x, y, args.draws, args.blocks, args.batch_size)), flush=True)


if __name__ == "__main__":
    main()
