"""Models that try to fool a parity verdict (tests/test_trust.py): NaN weights, a BN that divides by
zero, outputs that are empty or constant, and a badly conditioned BN (running_mean 1e6)."""
import torch
from torch import nn

def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

def nan_var():
    m = _net(); m[1].running_var[2] = float("nan"); return m

def nan_conv():
    m = _net()
    with torch.no_grad(): m[0].weight[0, 0, 0, 0] = float("nan")
    return m

def eps0():
    m = _net(); m[1].eps = 0.0
    with torch.no_grad(): m[1].running_var.zero_()
    return m

def empty():
    class E(nn.Module):
        def __init__(self):
            super().__init__(); self.c = nn.Conv2d(3, 8, 3); self.bn = nn.BatchNorm2d(8)
        def forward(self, x):
            y = self.bn(self.c(x)).flatten(1)
            return y[y.sum(1) > 1e9]   # never: 0 rows
    return E()

def const():
    class C(nn.Module):
        def __init__(self):
            super().__init__(); self.c = nn.Conv2d(3, 8, 3); self.bn = nn.BatchNorm2d(8)
        def forward(self, x):
            return self.bn(self.c(x)).mean((2, 3)) * 0.0
    return C()

def illcond():
    m = _net()
    with torch.no_grad():
        m[1].running_mean.fill_(1e6); m[1].running_var.fill_(1e-2); m[0].bias.fill_(1e6)
    return m
