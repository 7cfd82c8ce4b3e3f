"""A user's own model and dataset, as source text the tests write into a temporary module.

Nothing here is importable by the package or the suite: the tests write
:data:`SOURCE` into a folder of their own (``user_net.py``), so the model is one
r2sweep has never seen, and on a Ray cluster the module exists only in that
folder on the driver's side.
"""

from __future__ import annotations

from pathlib import Path

MODULE = "user_net"

SOURCE = '''
"""A keyword-spotting-sized CNN and a NumPy dataset: what a user brings."""
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn


class Block(nn.Module):
    """Residual: a grouped conv and a depthwise conv, BN, SiLU, and a skip sum."""

    def __init__(self, channels):
        super().__init__()
        self.grouped = nn.Conv2d(channels, channels, 3, padding=1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(x + self.bn2(self.depthwise(self.act(self.bn1(self.grouped(x))))))


class UserNet(nn.Module):
    def __init__(self, num_classes, in_channels, channels):
        super().__init__()
        self.classifier = nn.Linear(channels, num_classes)  # registered before the stem, on purpose
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.block = Block(channels)

    def forward(self, x):
        x = self.block(nn.functional.silu(self.bn(self.stem(x))))
        return self.classifier(torch.amax(x, dim=(2, 3)))  # a pooling head that is not AdaptiveAvgPool2d


def build(*, num_classes, in_channels, channels=8, record_to=None):
    if record_to:  # where this module was imported from, one file per process (the cluster test reads them)
        Path(record_to).mkdir(parents=True, exist_ok=True)
        (Path(record_to) / f"{os.getpid()}.txt").write_text(__file__)
    return UserNet(num_classes, in_channels, channels)


def load(*, seed, samples=400, val_share=0.25):
    """sklearn's digits as plain NumPy arrays: ((x_train, y_train), (x_val, y_val))."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))[:samples]
    x = (digits.images[order, None] / 8.0 - 1.0).astype(np.float32)
    y = digits.target[order].astype(np.int64)
    cut = int(len(y) * (1 - val_share))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def not_a_model(*, num_classes):
    return "a string"


def fixed_head(*, in_channels):  # ignores num_classes: always 3 outputs
    return UserNet(3, in_channels, 8)


def broken_forward(*, num_classes, in_channels):
    return nn.Sequential(nn.Flatten(), nn.Linear(7, num_classes))  # the wrong input width


def not_splits(*, seed):
    return {"training": []}
'''


def write_user_module(folder: Path) -> Path:
    """Write ``user_net.py`` into ``folder`` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{MODULE}.py"
    path.write_text(SOURCE)
    return path
