"""Behavioural checks of a model that the report shows next to parity."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["BatchIndependence", "BatchPoint", "batch_dependence", "batch_independence", "training_copy"]


@dataclass
class BatchIndependence:
    """Is a sample's *training-mode* output the same alone as inside a batch?"""

    batch: int
    max_rel_diff: float
    tol: float

    @property
    def independent(self) -> bool:
        return self.max_rel_diff <= self.tol

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "independent": self.independent}


def training_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in training mode with dropout (and stochastic depth) off: a copy, because
    training-mode BatchNorm updates its running statistics; no dropout, because it would make two runs
    differ for reasons other than the norm."""
    m = copy.deepcopy(model).train()
    for sub in m.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) or type(sub).__name__ in ("DropPath", "StochasticDepth"):
            sub.eval()
    return m


def batch_independence(
    model: nn.Module, input_shape: Sequence[int], *, batch: int = 8, seed: int = 0, tol: float = 1e-4
) -> BatchIndependence:
    """Run a copy of ``model`` in training mode (dropout off) on sample 0 alone and inside a batch
    of ``batch`` samples; compare sample 0's outputs relative to their scale.

    A copy, because training-mode BatchNorm updates its running statistics.
    """
    m = training_copy(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_shape[1:], generator=g)
    with torch.no_grad():
        together = pytree.tree_leaves(m(x))
        try:
            alone = pytree.tree_leaves(m(x[:1]))
        except (ValueError, RuntimeError):  # e.g. BatchNorm1d refuses a batch of 1 in training
            # then compare sample 0 inside a second batch with different companions
            y = torch.cat([x[:1], torch.randn(batch - 1, *input_shape[1:], generator=g)])
            alone = [t[:1] for t in pytree.tree_leaves(m(y))]
    worst = 0.0
    for a, b in zip(alone, together):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a, b = a[:1].double(), b[:1].double()
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
    return BatchIndependence(batch=batch, max_rel_diff=worst, tol=tol)


# ------------------------------------------------------------------------------- batch-size sweep


@dataclass
class BatchPoint:
    """One model at one batch size, in training mode (dropout off), over ``samples`` samples that each
    sit in one batch of ``batch`` (consecutive samples in the data's order; the last batch is filled up
    with samples from the start, which are not counted twice).

    * ``drift_eval_mean`` / ``_max`` — per sample, ‖y_train − y_eval‖ / ‖y_eval‖: how far the sample's
      training-mode output inside its batch is from the same model's eval-mode output of it;
    * ``drift_alone_mean`` / ``_max`` — the same against the sample's training-mode output alone (batch
      1); None when the model cannot run a batch of 1 in training;
    * ``top1_agreement`` / ``rel_err`` — the training-mode outputs against the *original's* eval-mode
      outputs (top-1 of the first output when it is ``[N, K]``; ‖out − ref‖/‖ref‖ over all outputs).

    ``defined`` is False when torch refuses the batch (BatchNorm on one value per channel in training:
    a batch of 1 before a ``[N, C]`` BatchNorm); ``reason`` says what torch said."""

    batch: int
    samples: int = 0
    defined: bool = True
    reason: str | None = None
    drift_eval_mean: float | None = None
    drift_eval_max: float | None = None
    drift_alone_mean: float | None = None
    drift_alone_max: float | None = None
    top1_agreement: float | None = None
    rel_err: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = float(f"{v:.6g}")
        return d


def _per_sample(out: Any, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(every floating output flattened per sample [n, D] in float64, the first output when it is
    ``[n, K]`` with K > 1 — the logits top-1 is read from — else None)."""
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()
              and t.dim() >= 1 and t.shape[0] == n]
    if not leaves:
        raise ValueError("the model's output has no floating-point tensor with the batch as its first dimension")
    flat = torch.cat([t.detach().reshape(n, -1).double().cpu() for t in leaves], dim=1)
    first = leaves[0]
    logits = first.detach().double().cpu() if first.dim() == 2 and first.shape[1] > 1 else None
    return flat, logits


def _rel(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row: ‖a − ref‖ / ‖ref‖ (0 when both are 0)."""
    num = (a - ref).norm(dim=1)
    den = ref.norm(dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num > 0, torch.inf, 0.0))


def _run(model: nn.Module, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    flats, logits = [], []
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            f, lg = _per_sample(model(x[i:i + chunk]), len(x[i:i + chunk]))
            flats.append(f)
            logits.append(lg)
    return torch.cat(flats), (None if any(lg is None for lg in logits) else torch.cat(logits))  # type: ignore[arg-type]


def _eval_outputs(model: nn.Module, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return _run(model, x, chunk)
    finally:
        for m, f in flags.items():
            m.train(f)


def batch_dependence(
    model: nn.Module,
    inputs: torch.Tensor,
    batch_sizes: Sequence[int],
    *,
    original: nn.Module | None = None,
    reference: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    chunk: int = 256,
    task: Any = None,
) -> list[BatchPoint]:
    """For each batch size, how a sample's *training-mode* output depends on the batch it is in (see
    :class:`BatchPoint`). ``inputs``: ``[n, ...]`` samples, n ≥ every batch size. ``original``: the model
    the agreement is measured against (its eval-mode outputs; or pass them precomputed as ``reference``
    = (flat outputs, logits) from :func:`reference_outputs`). ``model`` is not changed (a training copy runs).
    ``task``: advanced once per batch size."""
    n = len(inputs)
    sizes = [int(b) for b in batch_sizes]
    if any(b < 1 for b in sizes):
        raise ValueError(f"batch sizes must be ≥ 1, got {sizes}")
    if sizes and max(sizes) > n:
        raise ValueError(f"batch size {max(sizes)} needs at least that many samples; got {n}")
    if reference is None and original is not None:
        reference = reference_outputs(original, inputs, chunk=chunk)
    ev, _ = _eval_outputs(model, inputs, chunk)
    m = training_copy(model)
    cache: dict[int, tuple[torch.Tensor, torch.Tensor | None] | str] = {}

    def train_outputs(b: int) -> tuple[torch.Tensor, torch.Tensor | None] | str:
        if b in cache:
            return cache[b]
        flats, logits = [], []
        try:
            with torch.no_grad():
                for start in range(0, n, b):
                    idx = [(start + j) % n for j in range(b)]
                    keep = min(b, n - start)
                    f, lg = _per_sample(m(inputs[idx]), b)
                    flats.append(f[:keep])
                    logits.append(None if lg is None else lg[:keep])
        except (ValueError, RuntimeError) as e:  # e.g. "Expected more than 1 value per channel when training"
            from .errors import first_line

            cache[b] = first_line(e, 200)
            return cache[b]
        cache[b] = (torch.cat(flats), None if any(lg is None for lg in logits) else torch.cat(logits))  # type: ignore[arg-type]
        return cache[b]

    alone = train_outputs(1)
    points = []
    for b in sizes:
        out = train_outputs(b)
        p = BatchPoint(batch=b, samples=n)
        if isinstance(out, str):
            p.defined, p.reason = False, out
        else:
            flat, logits = out
            d = _rel(flat, ev)
            p.drift_eval_mean, p.drift_eval_max = float(d.mean()), float(d.max())
            if not isinstance(alone, str):
                d = _rel(flat, alone[0])
                p.drift_alone_mean, p.drift_alone_max = float(d.mean()), float(d.max())
            if reference is not None:
                ref_flat, ref_logits = reference
                if ref_flat.shape == flat.shape:
                    den = float(ref_flat.norm())
                    p.rel_err = float((flat - ref_flat).norm()) / den if den > 0 else None
                if ref_logits is not None and logits is not None and ref_logits.shape == logits.shape:
                    p.top1_agreement = float((logits.argmax(1) == ref_logits.argmax(1)).double().mean())
        points.append(p)
        if task is not None:
            task.advance(1)
    return points


def reference_outputs(original: nn.Module, inputs: torch.Tensor, *, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The original's eval-mode outputs on ``inputs`` (flat per sample, logits) for :func:`batch_dependence`
    (training flags restored)."""
    return _eval_outputs(original, inputs, chunk)
