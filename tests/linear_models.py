"""Linear models with closed-form answers, shared by the known-answer tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def binary_linear(w: np.ndarray, b: float = 0.0) -> nn.Linear:
    """Logits f(x) = [0, w·x + b]: class 1 iff w·x + b > 0, margin |w·x + b|."""
    lin = nn.Linear(len(w), 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[1] = torch.tensor(np.asarray(w), dtype=torch.float32)
        lin.bias[1] = b
    return lin
