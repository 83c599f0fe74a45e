"""Measuring a model against the original: running sums (:class:`Meter`), their :class:`Measures`, Wilson intervals."""

from __future__ import annotations

import math
from typing import Any

from .detection import Outputs, outputs_for
from .heads import _f64
from .registry import _REGISTRY


def wilson(p: float | None, n: int | None, z: float = 1.959964) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a proportion ``p`` observed over ``n`` trials:
    ``(p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``; None without data."""
    if p is None or not n or not math.isfinite(p):
        return None
    p = min(max(p, 0.0), 1.0)
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


class Measures(dict):
    """The measures of one model against the original (a dict: ``{"top1_agreement": …, "rel_err": …}``)
    that also knows its kind: ``.quality`` is the primary measure (higher is better), ``.label`` its name."""

    kind: str = "logits"
    primary: str = "top1_agreement"
    label: str = "top-1 agreement"
    outputs: Any = None  # the Outputs measured
    n: int | None = None  # the samples the measures rest on

    @property
    def quality(self) -> float | None:
        return self.get(self.primary)

    def labels(self) -> dict[str, str]:
        own = self.outputs.kind.labels if self.outputs is not None else {}
        return {**_LABELS, **own}

    def interval(self, key: str | None = None) -> tuple[float, float] | None:
        """The 95% Wilson interval of measure ``key`` (default: the primary) over the :attr:`n` samples,
        when it is a proportion; else None."""
        key = key or self.primary
        props = self.outputs.kind.proportions if self.outputs is not None else ("top1_agreement", "top1_within")
        return wilson(self.get(key), self.n) if key in props else None

    def intervals(self) -> dict[str, list[float]]:
        return {k: [round(a, 6), round(b, 6)] for k in self if (iv := self.interval(k)) is not None for a, b in [iv]}

    def format(self, key: str | None = None) -> str:
        """'0.9911 [0.9746–0.9971]': a measure with its interval (when it is a proportion)."""
        key = key or self.primary
        v = self.get(key)
        if v is None:
            return "—"
        iv = self.interval(key)
        return f"{v:.4f}" + (f" [{iv[0]:.4f}–{iv[1]:.4f}]" if iv is not None else "")

    def describe(self, data: str = "") -> str:
        """'top-1 agreement 0.9911 [0.9746–0.9971], …, output rel err 0.12, n = 450' (+ ' on DATA'):
        the primary measure first, proportions with their 95% Wilson interval, and the sample count."""
        labels = self.labels()
        parts = []
        for k in sorted(self, key=lambda k: (k != self.primary, k == "rel_err")):
            v = self.get(k)
            if v is None:
                continue
            parts.append(f"{labels.get(k, k)} {self.format(k)}" if k != "rel_err" else f"output rel err {v:.3g}")
        n = f" (n = {self.n})" if self.n else ""
        return ", ".join(parts) + n + (f" on {data}" if data else "")

    def to_dict(self) -> dict[str, Any]:
        """The values, the sample count and the intervals (JSON-ready)."""
        return {"values": {k: None if v is None else round(float(v), 6) for k, v in self.items()}, "samples": self.n,
                "intervals": self.intervals(), "primary": self.primary}


_LABELS = {k: v for kind in _REGISTRY.values() for k, v in kind.labels.items()}


def measures_like(values: dict[str, float | None], outputs: Outputs | None, n: int | None = None) -> Measures:
    m = Measures(values)
    m.n = n
    if outputs is not None:
        m.kind, m.primary, m.label, m.outputs = outputs.kind.name, outputs.primary, outputs.label, outputs
    return m


class Meter:
    """Running agreement of a model's outputs with the original's, per :class:`Outputs` (float64
    tensors, read once at the end: no device sync per batch). With ``outputs`` None the kinds are
    detected from the first batch's reference outputs."""

    def __init__(self, outputs: Outputs | str | None = None, model: Any = None) -> None:
        self.outputs = outputs if isinstance(outputs, Outputs) else None
        self._kind = outputs if isinstance(outputs, str) else None
        self._model = model  # the original: its ``normswap_output_kind``, when it declares one
        self.sums: dict[str, Any] = {}

    def _acc(self, key: str, v: Any) -> None:
        self.sums[key] = v if key not in self.sums else self.sums[key] + v

    def add(self, ref: Any, out: Any) -> None:
        import torch

        if self.outputs is None:
            self.outputs = outputs_for(ref, self._kind, self._model)
        for i, k, r, o in self.outputs._pairs(ref, out):
            if r.shape != o.shape or not r.is_floating_point():
                continue
            if i == 0 and r.dim() > 0:
                self._acc("n", torch.tensor([float(r.shape[0])], dtype=torch.float64, device=r.device))
            r64, o64 = _f64(r), _f64(o)
            self._acc("rel", torch.stack([((o64 - r64) ** 2).sum(), (r64 * r64).sum()]))
            for name, v in k.sums(r, o).items():
                self._acc(f"{i}:{name}", v)

    def reduce(self, active: bool, group: Any, device: Any) -> None:
        """All-reduce the sums across ranks (every rank must have added the same outputs)."""
        import torch

        if not active:
            return
        import torch.distributed as tdist

        if "rel" not in self.sums:
            self.sums["rel"] = torch.zeros(2, dtype=torch.float64, device=device)
        keys = sorted(self.sums)
        flat = torch.cat([self.sums[k].to(device).reshape(-1) for k in keys])
        tdist.all_reduce(flat, group=group)
        at = 0
        for k in keys:
            n = self.sums[k].numel()
            self.sums[k] = flat[at:at + n].reshape(self.sums[k].shape)
            at += n

    def result(self) -> Measures:
        out: dict[str, float | None] = {}
        if self.outputs is not None:
            for i, (k, path) in enumerate(zip(self.outputs.kinds, self.outputs.paths)):
                mine = {key.split(":", 1)[1]: v for key, v in self.sums.items() if key.startswith(f"{i}:")}
                vals = k.values(mine) if mine else {m: None for m in k.measures}
                for m, v in vals.items():
                    out[m if i == 0 else f"{path}.{m}"] = v
        if "rel" in self.sums:
            err, ref = (float(v) for v in self.sums["rel"])
            out["rel_err"] = math.sqrt(err / ref) if ref > 0 else None
        else:
            out["rel_err"] = None
        if not out or list(out) == ["rel_err"]:
            out = {"top1_agreement": None, **out}
        n = int(float(self.sums["n"][0])) if "n" in self.sums else None
        return measures_like(out, self.outputs, n)
