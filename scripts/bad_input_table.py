"""Re-run the bad-input cases of issue 16 and count the outcomes.

    .venv/bin/python scripts/bad_input_table.py [--rows]

Each case is classified as
  clear      refused with an error naming the argument/file/layer and what is accepted
             (or, for absurd-but-allowed noise levels, flagged in the result and warned);
  unclear    refused, but the message does not say what is wrong in the user's terms;
  traceback  an exception from deep inside (wrong type, or a raw torch/zlib message);
  silent     no error and a wrong or non-finite result.
Prints one JSON line per case (with --rows) and a final JSON line of counts.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pickle
import struct
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from noiseprop.empirical import monte_carlo, sweep
from noiseprop.empirical.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from noiseprop.empirical.cli import main
from noiseprop.empirical.data import DatasetFormatError, load_dataset
from noiseprop.empirical.executor import default_workers
from noiseprop.empirical.models import build_model, model_spec
from noiseprop.theory import RelativeGaussian, fold_bn, predict

CLEAR_TYPES = (ValueError, TypeError, CheckpointError, DatasetFormatError, FileNotFoundError)
G = torch.Generator().manual_seed(0)
X = torch.randn(24, 1, 8, 8, generator=G)
Y = torch.randint(0, 4, (24,), generator=G)


def mlp(depth=1):
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(64, 32), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 4)).eval()


def conv_bn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 4))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


class Returns(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.lin, self.kind = nn.Linear(64, 4), kind

    def forward(self, x):
        z = self.lin(x.flatten(1))
        return (z, z) if self.kind == "tuple" else {"logits": z}


def idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">i", s) for s in arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def mnist(tmp, n_test=2, hw=28, corrupt=False):
    d = Path(tempfile.mkdtemp(dir=tmp))
    idx(d / "train-images-idx3-ubyte", np.zeros((3, 28, 28)))
    idx(d / "train-labels-idx1-ubyte", np.zeros(3))
    idx(d / "t10k-images-idx3-ubyte", np.zeros((n_test, hw, hw)))
    if corrupt:
        (d / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    else:
        idx(d / "t10k-labels-idx1-ubyte", np.zeros(n_test))
    return d


def cifar(tmp, labels):
    d = Path(tempfile.mkdtemp(dir=tmp))
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / f, "wb") as fh:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, fh)
    return d


def cli(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def classify_call(fn, words, silent_check=None):
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            res = fn()
    except CLEAR_TYPES as e:
        msg = str(e)
        return ("clear" if all(x.lower() in msg.lower() for x in words) else "unclear"), f"{type(e).__name__}: {msg[:160]}"
    except Exception as e:  # noqa: BLE001
        return "traceback", f"{type(e).__name__}: {str(e)[:160]}"
    if silent_check is not None and silent_check(res, w):
        return "clear", "flagged: " + "; ".join(str(x.message)[:100] for x in w)
    return "silent", repr(res)[:160]


def classify_cli(argv, words, ok_check=None):
    try:
        rc, out, err = cli(*argv)
    except Exception as e:  # noqa: BLE001
        return "traceback", f"{type(e).__name__}: {str(e)[:160]}"
    if "Traceback" in err:
        return "traceback", err.strip().splitlines()[-1][:160]
    if rc == 0:
        if ok_check is not None and ok_check(out):
            return "clear", out.strip()[:160]
        return "silent", out.strip()[:160]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    good = len(lines) == 1 and all(x.lower() in lines[0].lower() for x in words)
    return ("clear" if good else "unclear"), " | ".join(lines)[:200]


def rows(tmp: Path):
    spec = model_spec("mlp", (1, 8, 8), 10, width=16, depth=1)
    ck = tmp / "m.pt"
    save_checkpoint(ck, build_model(**spec), spec, {"dataset": "digits"})
    spec3 = model_spec("mlp", (1, 8, 8), 10, width=16, depth=3)
    ck3 = tmp / "deep.pt"
    save_checkpoint(ck3, build_model(**spec3), spec3, {"dataset": "digits"})
    text = tmp / "notes.pt"
    text.write_text("101")
    huge = tmp / "huge.pt"
    obj = torch.load(ck, weights_only=True)
    obj["spec"]["width"] = 2 ** 40
    torch.save(obj, huge)
    neg = conv_bn()
    with torch.no_grad():
        neg[1].running_var[0] = -1.0
    hooked = conv_bn()
    hooked[1].register_forward_hook(lambda m, i, o: -3 * o)
    afile = tmp / "afile"
    afile.write_text("x")

    def hook_check():
        r = monte_carlo(hooked, X, Y, "relative:0.05", draws=2)
        with torch.no_grad():
            d = float((r.clean_logits - hooked(X).double()).abs().max())
        if d > 1e-4:
            return f"clean logits differ from model(x) by {d:.3g}"
        raise ValueError("ok: monte_carlo clean logits equal model(x) (hook followed)")

    def json_ok(out):
        try:
            d = json.loads(out, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError:
            return False
        return d.get("nonfinite_draws", 0) > 0

    def nan_flagged(res, w):
        return res.extras.get("nonfinite_draws", 0) > 0 and any("non-finite" in str(x.message) for x in w)

    env = os.environ.copy()
    yield "silent", "mc relative:1e30", classify_call(lambda: monte_carlo(mlp(), X, Y, "relative:1e30", draws=2), ["eta", "1e+30"])
    yield "silent", "mc additive:1e15 (overflowing, allowed level)", classify_call(
        lambda: monte_carlo(mlp(3), X, Y, "additive:1e15", draws=2), [], nan_flagged)
    yield "silent", "mc --json with NaN loss", classify_cli(
        ["mc", "--model", ck3, "--noise", "additive:1e18", "--draws", 2, "--json", "--no-progress"], [], json_ok)
    yield "silent", "BatchNorm negative running_var (mc)", classify_call(
        lambda: monte_carlo(neg, X, Y, "relative:0.1", draws=2), ["running_var", "'1'"])
    yield "silent", "BatchNorm negative running_var (predict)", classify_call(
        lambda: predict(neg, X, Y, "relative:0.1", accuracy_draws=0, loss_probes=0), ["running_var"])
    yield "silent", "fold_bn with negative running_var", classify_call(lambda: fold_bn(neg), ["running_var"])
    yield "silent", "CIFAR float labels", classify_call(
        lambda: load_dataset("cifar10", data_dir=cifar(tmp, np.array([0.7, 1.9]))), ["integer class labels"])
    yield "silent", "MNIST 20x20 test beside 28x28 train", classify_call(
        lambda: load_dataset("mnist", data_dir=mnist(tmp, hw=20)), ["28×28", "20×20"])
    yield "silent", "RelativeGaussian(True)", classify_call(lambda: RelativeGaussian(True), ["eta"])
    yield "silent", "mc ignores BatchNorm forward hook", classify_call(hook_check, ["hook followed"])
    yield "traceback", "--noise relative:1e300", classify_cli(["mc", "--model", ck, "--noise", "relative:1e300",
                                                                "--draws", 2], ["relative:1e300", "eta"])
    yield "traceback", "predict --noise additive:1e200", classify_cli(["predict", "--model", ck, "--noise",
                                                                        "additive:1e200"], ["sigma"])
    yield "traceback", "predict(additive:1e200)", classify_call(lambda: predict(mlp(), X, Y, "additive:1e200"), ["sigma"])
    yield "traceback", "study --etas 0 1e30", classify_cli(["study", "batchnorm", "--quick", "--etas", 0, 1e30,
                                                             "--cache-dir", tmp / "c1"], ["etas"])
    yield "traceback", "text-file checkpoint (library)", classify_call(lambda: load_checkpoint(text), ["notes.pt", "could not be read"])
    yield "traceback", "text-file checkpoint (CLI)", classify_cli(["mc", "--model", text, "--noise", "relative:0.1"],
                                                                  ["notes.pt", "could not be read"])
    yield "traceback", "corrupt MNIST .gz", classify_call(lambda: load_dataset("mnist", data_dir=mnist(tmp, corrupt=True)),
                                                           ["t10k-labels", "gzip"])
    yield "traceback", "MNIST with 0 images", classify_call(lambda: load_dataset("mnist", data_dir=mnist(tmp, n_test=0)),
                                                             ["0 images"])
    yield "traceback", "checkpoint spec width=2**40", classify_call(lambda: load_checkpoint(huge), ["huge.pt", "spec"])
    for kind in ("tuple", "dict"):
        yield "traceback", f"model returning a {kind} (mc)", classify_call(
            lambda: monte_carlo(Returns(kind), X, Y, "relative:0.1", draws=2), ["logits", kind])
        yield "traceback", f"model returning a {kind} (predict)", classify_call(
            lambda: predict(Returns(kind), X, Y, "relative:0.1"), ["logits", kind])
    for what, xb in (("shape", torch.randn(24, 50)), ("channels", torch.randn(24, 3, 8, 8))):
        yield "unclear", f"x of wrong {what} (mc)", classify_call(
            lambda: monte_carlo(conv_bn() if what == "channels" else mlp(), xb, Y, "relative:0.1", draws=2),
            ["x does not fit the model"])
        yield "unclear", f"x of wrong {what} (predict)", classify_call(
            lambda: predict(conv_bn() if what == "channels" else mlp(), xb, Y, "relative:0.1"),
            ["x does not fit the model"])
    yield "unclear", "x of wrong dtype (mc)", classify_call(lambda: monte_carlo(mlp(), X.double(), Y, "relative:0.1", draws=2),
                                                            ["x does not fit the model", "float64"])
    yield "unclear", "x of wrong dtype (predict)", classify_call(lambda: predict(mlp(), X.double(), Y, "relative:0.1"),
                                                                 ["x does not fit the model", "float64"])
    yield "unclear", "model on meta device (mc)", classify_call(lambda: monte_carlo(mlp().to("meta"), X, Y, "relative:0.1", draws=2),
                                                                ["meta"])
    yield "unclear", "model on meta device (predict)", classify_call(lambda: predict(mlp().to("meta"), X, Y, "relative:0.1"),
                                                                     ["meta"])
    yield "unclear", "seed=2**70 (mc)", classify_call(lambda: monte_carlo(mlp(), X, Y, "relative:0.1", draws=2, seed=2 ** 70),
                                                      ["seed", "<="])
    yield "unclear", "seed=2**70 (predict)", classify_call(lambda: predict(mlp(), X, Y, "relative:0.1", seed=2 ** 70),
                                                           ["seed", "<="])
    yield "unclear", 'confidence="0.9"', classify_call(lambda: monte_carlo(mlp(), X, Y, "relative:0.1", draws=2,
                                                                            confidence="0.9"), ["confidence", "> 0"])
    yield "unclear", "targets={'foo': 1}", classify_call(lambda: monte_carlo(mlp(), X, Y, "relative:0.1", draws=2,
                                                                              targets={"foo": 1}), ["foo", "accepted"])
    yield "unclear", 'fold_bn("model")', classify_call(lambda: fold_bn("model"), ["nn.Module", "str"])
    os.environ["NOISEPROP_WORKERS"] = "abc"
    try:
        yield "unclear", "NOISEPROP_WORKERS=abc", classify_call(default_workers, ["NOISEPROP_WORKERS"])
    finally:
        os.environ.clear()
        os.environ.update(env)
    train = ["train", "--model", "mlp", "--epochs", 1, "--cache-dir", tmp / "c2", "--quiet", "--out"]
    yield "late", "train --out DIR", classify_cli(train + [tmp], ["--out", "folder"])
    yield "late", "train --out under a file", classify_cli(train + [afile / "m.pt"], ["--out", "is a file"])
    yield "late", "train --out unwritable", classify_cli(train + ["/proc/np/m.pt"], ["--out", "cannot be written"])
    yield "late", "report --cache-dir FILE", classify_cli(["report", "--quick", "--out", tmp / "r", "--cache-dir", afile,
                                                           "--no-progress"], ["--cache-dir", "is a file"])


def main_():
    show = "--rows" in sys.argv
    counts = {"clear": 0, "unclear": 0, "traceback": 0, "silent": 0}
    with tempfile.TemporaryDirectory() as d:
        for group, name, (outcome, detail) in rows(Path(d)):
            counts[outcome] += 1
            if show:
                print(json.dumps({"group": group, "case": name, "outcome": outcome, "detail": detail}), flush=True)
    print(json.dumps({"cases": sum(counts.values()), **counts}))


if __name__ == "__main__":
    main_()
