"""Real architectures for the test matrix, defined in code (torchvision does not import beside
this machine's CPU torch wheel, and nothing may be downloaded).

- :class:`ResNet18`: the CIFAR-style ResNet-18 (as RobustBench's model zoo defines it):
  BatchNorm, residual additions, ``F.relu`` and ``F.adaptive_avg_pool2d`` written
  functionally. ``width`` scales every layer; 64 is the published network (11.2 M
  parameters), the tests use a narrower one with the same topology.
- :class:`TinyViT`: patch embedding, a class token, learned positions, pre-norm transformer
  blocks (LayerNorm, multi-head attention, GELU MLP).
- :class:`TabularMLP`: a plain MLP on feature vectors.
- :class:`FunctionalCNN`: convolutions with ``F.max_pool2d`` / ``F.relu`` / ``torch.flatten``
  in ``forward`` instead of modules.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class TinyViT(nn.Module):
    def __init__(self, num_classes: int = 10, image: int = 32, patch: int = 8, dim: int = 32,
                 depth: int = 2, heads: int = 4, in_channels: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        tokens = (image // patch) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        z = self.patch(x).flatten(2).transpose(1, 2)
        # z.shape[0], not len(z): the ONNX tracer keeps a shape op (dynamic batch) for it
        z = torch.cat([self.cls.expand(z.shape[0], -1, -1), z], dim=1) + self.pos
        z = self.blocks(z)
        return self.head(self.norm(z[:, 0]))


class TabularMLP(nn.Module):
    def __init__(self, features: int = 30, num_classes: int = 3, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


class FunctionalCNN(nn.Module):
    """For 1×8×8 digits: pooling, activations and flattening written functionally."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 2 * 2, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def stripes(n: int, *, seed: int = 0, classes: int = 10, size: int = 32):
    """A 3×size×size image set with real structure: class c is a colour (fixed by c) under
    oriented stripes (angle and frequency fixed by c, random phase) and pixel noise, in
    [0, 1]; a small network learns it in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    u, v = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    x = np.empty((n, 3, size, size), np.float32)
    for i, c in enumerate(y):
        angle = np.pi * c / classes
        freq = 2 * np.pi * (2 + c % 3) / size
        wave = np.sin(freq * (np.cos(angle) * u + np.sin(angle) * v) + rng.uniform(0, 2 * np.pi))
        colour = np.array([(c % 3) / 2, ((c // 3) % 3) / 2, 1 - (c % 2) * 0.5])
        img = 0.25 + 0.5 * colour[:, None, None] + 0.2 * wave[None]
        x[i] = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
    return x, y.astype(np.int64)


def tabular(n: int, *, seed: int = 0, features: int = 30, classes: int = 3):
    """Gaussian class clusters in [0, 1]^features."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.25, 0.75, (classes, features))
    y = rng.integers(0, classes, n)
    x = np.clip(centres[y] + rng.normal(0, 0.08, (n, features)), 0, 1).astype(np.float32)
    return x, y.astype(np.int64)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 3, lr: float = 3e-3,
          seed: int = 0) -> nn.Module:
    """A few epochs of Adam, then eval mode: enough that predictions depend on the input."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(32):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()
