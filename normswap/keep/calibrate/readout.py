"""The readout refit: the model's final Linear / 1×1 conv, refit in closed form to the original's outputs.

The readout is the ``nn.Linear`` or 1×1 convolution whose output, through a fixed elementwise *link*
(:data:`LINKS`: identity, sigmoid, softmax over dim 1, tanh), is the model's (first) output. It is found
on the first calibration batch by hooking every candidate and checking which one's output, through
which link, reproduces the output (so it works on untraceable models too). The refit is done in the
link's pre-activation space: the original's outputs are mapped back through the inverse link
(probabilities clamped to [1e-6, 1 − 1e-6]; softmax's log-probabilities centred per row, since softmax
ignores a per-row shift) and the readout's weights are the ridge least-squares fit of those targets on
its inputs. When no readout is found, :meth:`_ReadoutProbe.find` says why in one line.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from .dist import _all_reduce
from .taps import _leaves

#: The readout refit: ridge strength toward the trained readout, relative to the mean feature energy;
#: and the output relative error (during the pass) below which the readout is left alone.
READOUT_RIDGE = 1e-3
READOUT_MIN_REL = 1e-3
#: probabilities are clamped to [LINK_EPS, 1 − LINK_EPS] before an inverse link
LINK_EPS = 1e-6


class Link(ABC):
    """A fixed elementwise output link: ``forward`` (pre-activation → output) and ``inverse``."""

    name = ""

    @abstractmethod
    def forward(self, z: Tensor) -> Tensor:
        ...

    @abstractmethod
    def inverse(self, y: Tensor) -> Tensor:
        ...


class _Identity(Link):
    name = "identity"

    def forward(self, z: Tensor) -> Tensor:
        return z

    def inverse(self, y: Tensor) -> Tensor:
        return y


class _Sigmoid(Link):
    name = "sigmoid"

    def forward(self, z: Tensor) -> Tensor:
        return torch.sigmoid(z)

    def inverse(self, y: Tensor) -> Tensor:
        p = y.double().clamp(LINK_EPS, 1 - LINK_EPS)
        return p.log() - (-p).log1p()


class _Softmax(Link):
    name = "softmax"

    def forward(self, z: Tensor) -> Tensor:
        return torch.softmax(z, 1)

    def inverse(self, y: Tensor) -> Tensor:
        lp = y.double().clamp_min(LINK_EPS).log()
        return lp - lp.mean(1, keepdim=True)


class _Tanh(Link):
    name = "tanh"

    def forward(self, z: Tensor) -> Tensor:
        return torch.tanh(z)

    def inverse(self, y: Tensor) -> Tensor:
        return torch.atanh(y.double().clamp(-1 + LINK_EPS, 1 - LINK_EPS))


#: the links a readout may be followed by, in the order they are tried (a registry: add one here)
LINKS: dict[str, Link] = {k.name: k for k in (_Identity(), _Sigmoid(), _Softmax(), _Tanh())}


def _is_pointwise_conv(m: nn.Module) -> bool:
    return (isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
            and all(k == 1 for k in m.kernel_size) and m.groups == 1 and all(p == 0 for p in m.padding)
            and all(d == 1 for d in m.dilation))


def _readout_candidate(m: nn.Module) -> bool:
    return type(m) is nn.Linear or _is_pointwise_conv(m)


class _Readout:
    """Closed-form refit of the model's readout (a Linear or 1×1 conv) to the original's outputs
    mapped through the inverse link: W = argmin ‖[f, 1]·W − t‖² + λ‖W − W₀‖² (bias unpenalized),
    λ = READOUT_RIDGE · mean feature energy, from running sums FᵀF, Fᵀt (memory O(D² + D·K),
    independent of the data size). A 1×1 conv is a Linear applied at every position."""

    def __init__(self, name: str, layer: nn.Module, active: bool, group: Any, link: Link | None = None,
                 ridge: float | None = None) -> None:
        self.name, self.linear, self.active, self.group = name, layer, active, group
        self.link = link or LINKS["identity"]
        self.ridge = READOUT_RIDGE if ridge is None else ridge
        self.conv = not isinstance(layer, nn.Linear)
        w = layer.weight.detach().double()
        k, d = int(w.shape[0]), int(w.shape[1])
        dev = w.device
        self.S = torch.zeros(d + 1 + k, d + 1 + k, dtype=torch.float64, device=dev)
        w0 = w.reshape(k, d)
        b0 = layer.bias.detach().double() if layer.bias is not None else torch.zeros(k, dtype=torch.float64, device=dev)
        self.W0 = torch.cat([w0.t(), b0[None]], 0)  # [D+1, K]
        self.W = self.W0.clone()

    def _rows(self, t: Tensor) -> Tensor:
        """[N, C, *S] (conv) → [N·S, C]; [..., D] (linear) → [·, D]."""
        if self.conv:
            return t.detach().movedim(1, -1).reshape(-1, t.shape[1]).double()
        return t.detach().reshape(-1, t.shape[-1]).double()

    def add(self, f: Tensor, out: Tensor) -> None:
        """One batch: the readout's input ``f`` and the original's output ``out`` (after the link)."""
        f = self._rows(f)
        t = self._rows(self.link.inverse(out.detach()))
        F_ = torch.cat([f, torch.ones(f.shape[0], 1, dtype=f.dtype, device=f.device), t], 1)
        self.S += _all_reduce(F_.t() @ F_, self.active, self.group)

    def solve(self) -> None:
        d1 = self.W0.shape[0]
        G, R = self.S[:d1, :d1], self.S[:d1, d1:]
        lam = self.ridge * float(torch.diagonal(G)[:-1].mean().clamp_min(1e-30)) + 1e-30
        pen = torch.eye(d1, dtype=G.dtype, device=G.device)
        pen[-1, -1] = 0.0
        self.W = torch.linalg.solve(G + lam * pen, R + lam * pen @ self.W0)

    def quality(self) -> dict[str, float]:
        """Relative error of the readout's pre-activations (in the link's space) with the trained
        (``rel_before``) and the refit weights (``rel_after``), on the calibration data."""
        d1 = self.W0.shape[0]
        G, R, tt = self.S[:d1, :d1], self.S[:d1, d1:], float(torch.diagonal(self.S[d1:, d1:]).sum())

        def rel(W: Tensor) -> float:
            sse = tt - 2 * float((W * R).sum()) + float((W * (G @ W)).sum())
            return math.sqrt(max(sse, 0.0) / tt) if tt > 0 else 0.0

        return {"rel_before": rel(self.W0), "rel_after": rel(self.W), "samples": round(float(G[-1, -1]))}

    def _put(self, W: Tensor) -> None:
        with torch.no_grad():
            w = self.linear.weight
            w.copy_(W[:-1].t().reshape(w.shape).to(w.dtype))
            if self.linear.bias is not None:
                self.linear.bias.copy_(W[-1].to(self.linear.bias.dtype))

    def write(self) -> None:
        self._put(self.W)

    def restore(self) -> None:
        """Put the trained weights back."""
        self._put(self.W0)


class _ReadoutProbe:
    """On the first batch: hooks on every nn.Linear and 1×1 conv find the one whose output, through a
    fixed link (:data:`LINKS`), *is* the model's output (the readout) and keep its input for the sums."""

    def __init__(self, model: nn.Module) -> None:
        self.seen: dict[str, tuple[Tensor, Tensor]] = {}
        self.order: list[str] = []
        self.candidates = [n for n, m in model.named_modules() if _readout_candidate(m)]
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in self.candidates]
        self.why: str | None = None  # when find() found none: why, in one line

    def _hook(self, name: str):
        def h(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
                self.seen[name] = (args[0], out)
                if name in self.order:
                    self.order.remove(name)
                self.order.append(name)
        return h

    def find(self, out: Any) -> tuple[str | None, Tensor | None, Link | None]:
        """(module name, its input, the link) of the readout, or (None, None, None) with :attr:`why` set."""
        leaves = _leaves(out)
        first = leaves[0] if leaves else None
        if first is None:
            self.why = "the model returned no tensor output"
            return None, None, None
        if not self.candidates:
            self.why = "the model has no nn.Linear or 1×1 convolution to refit"
            return None, None, None
        for name in reversed(self.order):  # the last-called first
            x, o = self.seen[name]
            if o is first:
                return name, x, LINKS["identity"]
        for name in reversed(self.order):
            x, o = self.seen[name]
            if o.shape != first.shape or not o.is_floating_point():
                continue
            with torch.no_grad():
                for link in LINKS.values():
                    y = link.forward(o.double())
                    if torch.allclose(y, first.double(), rtol=1e-4, atol=1e-6):
                        return name, x, link
        last = self.order[-1] if self.order else self.candidates[-1]
        shape = list(self.seen[last][1].shape) if last in self.seen else None
        self.why = (f"no readout to refit: the output {list(first.shape)} is not a Linear / 1×1 conv followed by a fixed link "
                    f"({', '.join(LINKS)}); the last such layer, {last}" + (f" {shape}" if shape else "") + ", feeds other ops")
        return None, None, None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.seen = {}
