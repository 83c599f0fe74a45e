"""Agreement with the original and per-layer drift."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...load.data import as_batches, local_batch
from ...parity import eval_mode
from .dist import _all_reduce, _dist_group
from ..kinds import Measures, Meter, outputs_for
from .taps import swapped_sites, _TeacherTap, _inner, _leaves, _model_device, _to

def _Agreement(outputs: Any = None, model: Any = None) -> Meter:
    """The running agreement of the outputs' kind (:class:`normswap.keep.kinds.Meter`)."""
    return Meter(outputs, model)


# ---------------------------------------------------------------------------------------------------
# metrics


def agreement(original: nn.Module, model: nn.Module, inputs: Any, *, dist: Any = False,
              shard_batches: bool = True, output_kind: Any = None) -> Measures:
    """The output kind's agreement measures (top-1 agreement for logits / probabilities; label
    agreement and MAE for multilabel; R² for regression; pixel agreement and mIoU for dense: see
    :mod:`normswap.keep.kinds`) and relative error ‖out − ref‖/‖ref‖ of ``model`` against ``original`` on
    ``inputs`` (a tensor or an iterable of batches), both in eval mode; ``output_kind``: a kind name or
    :class:`~normswap.keep.kinds.Outputs` (default: detected from the original's outputs);
    neither model is changed (training flags are restored). Under ``dist`` each rank evaluates its
    shard of every batch (``shard_batches=False``: the batches already are this rank's) and the counts
    are all-reduced."""
    return _evaluate(original, model, inputs, [], dist=dist, shard_batches=shard_batches, output_kind=output_kind)[0]


def heldout_losses(original: nn.Module, model: nn.Module, inputs: Any, outputs: Any) -> tuple[Measures, Tensor]:
    """One pass over ``inputs`` (both models in eval mode, flags restored, no grad): the kind's agreement
    measures and each sample's distillation loss at temperature 1 (float64, on the CPU, in data order) —
    what keep-best / never-worse decisions compare, paired (:func:`normswap.keep.heldout.compare_losses`)."""
    agg = Meter(outputs, original)
    losses: list[Tensor] = []
    device = _model_device(model)
    with torch.no_grad(), eval_mode(original, model):
        for batch in as_batches(inputs):
            batch = _to(batch, device)
            ref, out = original(*batch), model(*batch)
            agg.add(ref, out)
            losses.append(agg.outputs.sample_losses(out, ref, 1.0).double().cpu())
    return agg.result(), (torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64))


def accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch: int = 256, output_kind: Any = None) -> float:
    """The ground-truth measure of ``model`` (eval mode, training flags restored) on labelled data:
    top-1 accuracy for a classifier (the default), per-label accuracy at 0.5 for ``multilabel``, R²
    for ``regression``, pixel accuracy for ``dense`` (``output_kind``: a name or
    :class:`~normswap.keep.kinds.Outputs`)."""
    device = _model_device(model)
    preds = []
    with torch.no_grad(), eval_mode(model):
        for i in range(0, len(x), batch):
            preds.append(_leaves(model(x[i:i + batch].to(device)))[0].cpu())
    if not preds:
        return 0.0
    pred = torch.cat(preds)
    outputs = outputs_for(pred, output_kind if output_kind is not None else "logits", model)
    return outputs.kind.truth(pred, y)


def layer_drift(original: nn.Module, model: nn.Module, inputs: Any, *, sites: Sequence[str] | None = None,
                conversion: Any = None) -> dict[str, float]:
    """Per swapped site, in execution order: ‖y_new − y_orig‖ / ‖y_orig‖ of the site's output over
    ``inputs`` — the original BN's output (before any activation) against the new norm's, each model
    running on its own activations, so errors accumulated upstream show."""
    names = list(sites) if sites is not None else swapped_sites(original, model, conversion)
    return _evaluate(original, model, inputs, names)[1]


def agreement_and_drift(original: nn.Module, model: nn.Module, inputs: Any, *, sites: Sequence[str] | None = None,
                        conversion: Any = None, output_kind: Any = None, record: Any = None) -> tuple[Measures, dict[str, float]]:
    """:func:`agreement` and :func:`layer_drift` from one run of both models over ``inputs``. ``record``: a
    :class:`~normswap.keep.calibrate.never_worse.HeldoutRecord` to fill with the batches, both models'
    outputs and the original's site outputs (for calibration's held-out checks, which then run neither again)."""
    names = list(sites) if sites is not None else swapped_sites(original, model, conversion)
    return _evaluate(original, model, inputs, names, output_kind=output_kind, record=record)


def _evaluate(original: nn.Module, model: nn.Module, inputs: Any, sites: Sequence[str], *, dist: Any = False,
              shard_batches: bool = True, output_kind: Any = None, record: Any = None) -> tuple[Measures, dict[str, float]]:
    """Run both models (eval, flags restored, no grad) over ``inputs`` once: output agreement, and the
    per-site drift of ``sites`` (float64 sums kept as tensors, read once at the end); ``record``: see
    :func:`agreement_and_drift`."""
    active, group, rank, world = _dist_group(dist)
    smods = dict(model.named_modules())
    names = [n for n in sites if n in smods]
    tap = _TeacherTap(original, names)
    sums: dict[str, Tensor] = {}  # site → [‖y_new − y_orig‖², ‖y_orig‖²]

    def hook(name: str):
        def h(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            t = tap.pop(name)
            if t is None:
                return
            if record is not None:
                record.site(name, t)
            y = t.double()
            o = out.detach().double()
            if o.shape == y.shape:
                v = torch.stack([((o - y) ** 2).sum(), (y * y).sum()])
                sums[name] = sums[name] + v if name in sums else v  # insertion order = execution order
        return h

    handles = [_inner(smods[n]).register_forward_hook(hook(n)) for n in names]
    agg = Meter(output_kind, original)
    device = _model_device(model)
    if record is not None:
        record.site_names = set(names)
    try:
        with eval_mode(original, model), torch.no_grad():
            for batch in as_batches(inputs):
                if active and shard_batches:
                    batch = local_batch(batch, rank, world)
                    if batch is None:
                        continue
                batch = _to(batch, device)
                if record is not None:
                    record.begin(batch)
                ref, out = original(*batch), model(*batch)
                agg.add(ref, out)
                if record is not None:
                    record.end(ref, out)
                tap.clear()
        if record is not None:
            record.complete = not active
    finally:
        for h in handles:
            h.remove()
        tap.remove()
    agg.reduce(active, group, device)
    drift = {}
    for n, v in sums.items():
        err, ref = (float(x) for x in _all_reduce(v, active, group))
        drift[n] = math.sqrt(err / ref) if ref > 0 else 0.0
    return agg.result(), drift
