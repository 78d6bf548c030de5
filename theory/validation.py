"""Input checks shared by every public entry point (prediction and Monte-Carlo alike),
so both reject the same inputs with the same messages."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["check_inputs", "check_labels"]


def check_inputs(model, x, y):
    """Validate ``model, x, y`` at a public boundary; return ``(x, y)`` as tensors with
    ``y`` int64. Errors name the problem and what is accepted."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module mapping inputs to logits, got {type(model).__name__}")
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor of inputs, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a tensor of integer class labels, got {type(y).__name__}")
    if torch.is_floating_point(y) or torch.is_complex(y) or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class labels (int64 accepted, any integer dtype converted), got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"y must be 1-D (one label per input), got shape {tuple(y.shape)}")
    if x.dim() < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length: x has {x.shape[0] if x.dim() else 0} inputs, y has {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("x and y are empty: at least one input is needed")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if torch.is_floating_point(p) and not torch.isfinite(p).all():
            raise ValueError(f"model parameter {name!r} contains NaN or infinite values")
    return x, y.to(torch.int64)


def check_labels(y: torch.Tensor, num_classes: int):
    """Labels must lie in ``[0, num_classes)``."""
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) for a model with {num_classes} logits; found range [{lo}, {hi}]")
