"""Output kinds: what a model's output *is*, so recovery distils it and every report measures it the right way.

A kind is detected from the original model's outputs on calibration data (:func:`detect`), or given
(``output_kind=`` / ``--output-kind``), or declared by the model (an attribute ``normswap_output_kind``, as
``normswap_input_shape`` declares the input). Each kind is registered (:func:`register`) with

* its **distillation loss** (student output vs the original's, differentiable in the student's);
* its **agreement measures** against the original, accumulated over batches in float64 (all-reducible
  under torch.distributed) — the first one, ``primary``, is the kind's *quality* (higher is better);
* its **ground-truth measure** against labels, when labels are known.

=============== ======================================== ================================================ =========================
kind            looks like                               loss (student s, original t, temperature T)      measures (primary first)
=============== ======================================== ================================================ =========================
logits          [N, K], K > 1, unbounded                 T²·KL(softmax(t/T) ‖ softmax(s/T)), per sample    top-1 agreement, rel err
probabilities   [N, K], ≥ 0, rows sum to 1 (softmax)     the same KL on log p (the logits up to a shift),  top-1 agreement, rel err
                                                         clamped at 1e-6: no log(0)
multilabel      [N, K] (or [N]) in [0, 1] (sigmoid)      T²·Σ_labels binary KL, on the logits log(p/(1−p)) label agreement at 0.5, MAE, rel err
                                                         of both (clamped to [1e-6, 1 − 1e-6])
peaked          [N, K], K ≥ 16, in [0, 1], each row one  T²·KL of the rows normalised to sum 1 (the bump's  peak within ±1 bin, mean |Δpeak| (bins),
                bump: a pitch / angle / age histogram    position and shape) + the per-bin binary KL        top-1, top-1 ±1, MAE, rel err
regression      anything else ([N, D], features, maps)   mean (s − t)² / the original's per-output        R², rel err
                                                         variance over the batch
dense           [N, C, H, W], C > 1, unbounded           T²·per-pixel KL over C                            pixel top-1 agreement, mIoU vs the original, rel err
=============== ======================================== ================================================ =========================

Every kind with a class or bin axis also reports top-1 agreement and top-1 within ±1 bin
(:data:`WITHIN_BINS`). A *decoder* (``decode=`` / ``--decode module:fn``, or the model's
``normswap_decode``) maps an output to the value the user reads (a pitch in cents, an angle); with it the
first output's measures lead with agreement in those units (:class:`Decoded`: the fraction within
``decode_tol``, the mean absolute difference), and that is the measure every report cites.

Every measure carries its sample count, and each proportion a 95% Wilson interval
(:meth:`Measures.interval`): a held-out figure over 51 samples is one sample in 2 points.

A dict / list / tuple output gets a kind per tensor leaf (:class:`Outputs`): the loss is the sum over
the leaves, the first leaf's measures keep their names and the others are prefixed by their path
(``['boxes'].r2``). ``rel_err`` is ‖out − ref‖/‖ref‖ over all leaves together.

This module imports torch only inside its functions: :data:`KIND_NAMES` serves option validation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

__all__ = ["KIND_NAMES", "Decoded", "Kind", "Measures", "Meter", "Outputs", "detect", "detect_kind", "get", "outputs_for", "register",
           "wilson"]

#: every ``--output-kind`` value (torch-free)
KIND_NAMES = ("logits", "probabilities", "multilabel", "peaked", "regression", "dense")

#: probabilities are clamped to [EPS, 1 − EPS] before their logarithm / logit
EPS = 1e-6
#: top-1 "within ±k bins" is reported with this k for every output with a class or bin axis
WITHIN_BINS = 1
#: a peaked row's position is the output-weighted mean bin index over ±PEAK_HALF_WIDTH bins around its argmax
PEAK_HALF_WIDTH = 4
#: a sigmoid output is *peaked* when it has at least this many bins ...
PEAKED_MIN_BINS = 16
#: ... and the median row holds at least this fraction of its mass within ±PEAK_HALF_WIDTH bins of its argmax
PEAKED_MASS = 0.6

_REGISTRY: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add ``kind`` to the registry (by its ``name``); returns it."""
    _REGISTRY[kind.name] = kind
    return kind


def get(name: str) -> Kind:
    """The registered kind ``name``; an :class:`~normswap.errors.InputError` naming the choices otherwise."""
    from .errors import InputError

    if name not in _REGISTRY:
        raise InputError(f"--output-kind {name!r} is not an output kind; choose from: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def check_name(name: str | None) -> None:
    """Torch-free validation of an ``--output-kind`` value (None = detect)."""
    from .errors import InputError

    if name is not None and name not in KIND_NAMES:
        raise InputError(f"--output-kind {name!r} is not an output kind; choose from: {', '.join(KIND_NAMES)}")


# ---------------------------------------------------------------------------------------------------
# the kinds


class Kind(ABC):
    """One output kind: its loss, its measures (accumulated by a :class:`Meter`), its ground truth."""

    name = ""
    #: the measure keys, the primary (the kind's quality, higher is better) first
    measures: tuple[str, ...] = ()
    #: how each measure reads in a table / a sentence
    labels: dict[str, str] = {}
    #: what the ground-truth measure is called (``accuracy`` for a classifier)
    truth_label = "accuracy"
    #: the measures that are proportions (they get a Wilson interval over the sample count)
    proportions: tuple[str, ...] = ()

    @property
    def primary(self) -> str:
        return self.measures[0]

    @abstractmethod
    def sample_losses(self, s: Any, t: Any, temperature: float) -> Any:
        """The distillation loss of each sample ``[N]`` (student ``s``, original ``t``, differentiable in ``s``)."""
        ...

    def loss(self, s: Any, t: Any, temperature: float) -> Any:
        """The distillation loss of the batch: the mean of :meth:`sample_losses`."""
        return self.sample_losses(s, t, temperature).mean()

    @abstractmethod
    def sums(self, r: Any, o: Any) -> dict[str, Any]:
        """This batch's float64 sums (named tensors) from which :meth:`values` computes the measures."""
        ...

    @abstractmethod
    def values(self, sums: dict[str, Any]) -> dict[str, float | None]:
        ...

    @abstractmethod
    def truth(self, pred: Any, y: Any) -> float:
        """The model's ground-truth measure on labelled data (``pred``: its outputs, ``y``: the labels)."""
        ...

    def __repr__(self) -> str:
        return f"<output kind {self.name}>"


def _f64(t: Any) -> Any:
    return t.detach().double()


def _top1_sums(r: Any, o: Any) -> Any:
    """[top-1 matches, top-1 within ±WITHIN_BINS, samples] (float64) over a class / bin axis (dim 1)."""
    import torch

    r2, o2 = r.reshape(r.shape[0], r.shape[1], -1), o.reshape(o.shape[0], o.shape[1], -1)
    a, b = r2.argmax(1), o2.argmax(1)
    match = (a == b).double().mean(-1).sum()  # a dense output's pixels count as a fraction of their sample
    near = ((a - b).abs() <= WITHIN_BINS).double().mean(-1).sum()
    return torch.stack([match, near, torch.tensor(float(r.shape[0]), dtype=torch.float64, device=r.device)])


def _top1_values(v: Any) -> dict[str, float | None]:
    match, near, count = (float(x) for x in v)
    return {"top1_agreement": match / count if count else None, "top1_within": near / count if count else None}


_TOP1_LABELS = {"top1_agreement": "top-1 agreement", "top1_within": f"top-1 within ±{WITHIN_BINS} bin"}


class Logits(Kind):
    name = "logits"
    measures = ("top1_agreement", "top1_within")
    labels = dict(_TOP1_LABELS)
    proportions = ("top1_agreement", "top1_within")

    def log_probs(self, x: Any, temperature: float) -> Any:
        import torch.nn.functional as F

        return F.log_softmax(x / temperature, 1)

    def sample_losses(self, s: Any, t: Any, temperature: float) -> Any:
        T = float(temperature)
        ls, lt = self.log_probs(s, T), self.log_probs(t.detach(), T)
        return (lt.exp() * (lt - ls)).reshape(s.shape[0], -1).sum(1) * T * T

    def sums(self, r: Any, o: Any) -> dict[str, Any]:
        r2, o2 = r.reshape(r.shape[0], -1) if r.dim() > 2 else r, o.reshape(o.shape[0], -1) if o.dim() > 2 else o
        if r2.dim() < 2:
            r2, o2 = r2.reshape(-1, 1), o2.reshape(-1, 1)
        return {"cls": _top1_sums(r2, o2)}

    def values(self, sums: dict[str, Any]) -> dict[str, float | None]:
        return _top1_values(sums["cls"])

    def truth(self, pred: Any, y: Any) -> float:
        return float((pred.argmax(1).cpu() == y.cpu()).double().mean()) if len(y) else math.nan


class Probabilities(Logits):
    """Softmax rows: the same KL, on log p — the logits up to a per-row shift that softmax ignores."""

    name = "probabilities"

    def log_probs(self, x: Any, temperature: float) -> Any:
        import torch.nn.functional as F

        return F.log_softmax(x.clamp_min(EPS).log() / temperature, 1)


class Multilabel(Kind):
    """Independent sigmoid outputs in [0, 1]."""

    name = "multilabel"
    measures = ("label_agreement", "mae", "top1_agreement", "top1_within")
    labels = {"label_agreement": "label agreement @0.5", "mae": "MAE", **_TOP1_LABELS}
    truth_label = "label accuracy"
    proportions = ("label_agreement", "top1_agreement", "top1_within")

    @staticmethod
    def logit(p: Any) -> Any:
        p = p.clamp(EPS, 1 - EPS)
        return p.log() - (-p).log1p()

    def sample_losses(self, s: Any, t: Any, temperature: float) -> Any:
        import torch.nn.functional as F

        T = float(temperature)
        zs, zt = self.logit(s) / T, self.logit(t.detach()) / T
        qt = zt.sigmoid()
        # binary KL(q_t ‖ q_s) per label, from log-sigmoids of the logits (stable at both ends)
        kl = qt * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - qt) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))
        return kl.reshape(s.shape[0], -1).sum(1) * T * T

    def sums(self, r: Any, o: Any) -> dict[str, Any]:
        import torch

        agree = ((r > 0.5) == (o > 0.5)).sum().double()
        out = {"ml": torch.stack([agree, torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device),
                                  (_f64(o) - _f64(r)).abs().sum()])}
        if r.dim() >= 2 and r.shape[1] > 1:
            out["cls"] = _top1_sums(r, o)
        return out

    def values(self, sums: dict[str, Any]) -> dict[str, float | None]:
        agree, count, abs_err = (float(v) for v in sums["ml"])
        vals: dict[str, float | None] = {"label_agreement": agree / count if count else None, "mae": abs_err / count if count else None}
        vals.update(_top1_values(sums["cls"]) if "cls" in sums else {"top1_agreement": None, "top1_within": None})
        return vals

    def truth(self, pred: Any, y: Any) -> float:
        return float(((pred.cpu() > 0.5) == (y.cpu().reshape(pred.shape) > 0.5)).double().mean())


def peak_position(p: Any) -> Any:
    """Each row's peak as a fractional bin index: the mean of the bin indices within ±PEAK_HALF_WIDTH of
    the argmax, weighted by the outputs (a pitch tracker's local weighted average, in bins)."""
    import torch

    p = _f64(p).reshape(p.shape[0], -1)
    centre = p.argmax(1)
    idx = (centre[:, None] + torch.arange(-PEAK_HALF_WIDTH, PEAK_HALF_WIDTH + 1, device=p.device)[None, :]).clamp(0, p.shape[1] - 1)
    w = p.gather(1, idx).clamp_min(0)
    pos = (w * idx.double()).sum(1) / w.sum(1).clamp_min(1e-12)
    return torch.where(w.sum(1) > 0, pos, centre.double())


class Peaked(Multilabel):
    """Sigmoid bins whose rows are one bump (a pitch, angle or age histogram trained on blurred one-hot
    targets): what is read is the peak, so the measures are the peak's position and the loss keeps the
    row's shape (KL of the rows normalised to sum 1) as well as each bin (the multilabel term)."""

    name = "peaked"
    measures = ("peak_within", "peak_mad", "top1_agreement", "top1_within", "mae")
    labels = {"peak_within": "peak within ±1 bin", "peak_mad": "mean |Δpeak| (bins)", "mae": "MAE", **_TOP1_LABELS}
    truth_label = "peak accuracy (±1 bin)"
    proportions = ("peak_within", "top1_agreement", "top1_within")

    def sample_losses(self, s: Any, t: Any, temperature: float) -> Any:
        import torch.nn.functional as F

        T = float(temperature)
        ls = F.log_softmax(s.reshape(s.shape[0], -1).clamp_min(EPS).log() / T, 1)
        lt = F.log_softmax(t.detach().reshape(t.shape[0], -1).clamp_min(EPS).log() / T, 1)
        rows = (lt.exp() * (lt - ls)).sum(1) * T * T
        return rows + super().sample_losses(s, t, temperature)

    def sums(self, r: Any, o: Any) -> dict[str, Any]:
        import torch

        d = (peak_position(o) - peak_position(r)).abs()
        n = torch.tensor(float(r.shape[0]), dtype=torch.float64, device=r.device)
        return {**super().sums(r, o), "peak": torch.stack([(d <= 1.0).double().sum(), d.sum(), n])}

    def values(self, sums: dict[str, Any]) -> dict[str, float | None]:
        within, dsum, n = (float(v) for v in sums["peak"])
        base = super().values(sums)
        return {"peak_within": within / n if n else None, "peak_mad": dsum / n if n else None,
                "top1_agreement": base["top1_agreement"], "top1_within": base["top1_within"], "mae": base["mae"]}

    def truth(self, pred: Any, y: Any) -> float:
        """Against per-bin targets ``[N, K]`` (peak vs peak) or bin positions ``[N]``: within ±1 bin."""
        y = y.cpu()
        ty = peak_position(y) if y.dim() == 2 and y.shape == pred.shape else _f64(y).reshape(-1)
        return float(((peak_position(pred.cpu()) - ty).abs() <= 1.0).double().mean())


class Regression(Kind):
    """Real-valued outputs (and features): matched in squared error relative to the original's spread."""

    name = "regression"
    measures = ("r2",)
    labels = {"r2": "R² vs original"}
    truth_label = "R² vs labels"  # two R² columns side by side: say which is which

    def sample_losses(self, s: Any, t: Any, temperature: float) -> Any:
        t = t.detach()
        if t.shape[0] > 1:
            var = t.var(0, unbiased=False)
            var = var.clamp_min(float(var.mean()) * 1e-3 + 1e-12)
        else:
            var = (t * t).mean().clamp_min(1e-12)
        return ((s - t) ** 2 / var).reshape(s.shape[0], -1).mean(1)

    def sums(self, r: Any, o: Any) -> dict[str, Any]:
        import torch

        r64, o64 = _f64(r).reshape(r.shape[0], -1), _f64(o).reshape(o.shape[0], -1)
        n = torch.tensor([float(r.shape[0])], dtype=torch.float64, device=r.device)
        return {"reg": torch.cat([n, ((o64 - r64) ** 2).sum().reshape(1)]), "reg_t": r64.sum(0), "reg_t2": (r64 * r64).sum(0)}

    def values(self, sums: dict[str, Any]) -> dict[str, float | None]:
        n, sse = (float(v) for v in sums["reg"])
        if n <= 0:
            return {"r2": None}
        sst = float((sums["reg_t2"] - sums["reg_t"] ** 2 / n).clamp_min(0).sum())
        return {"r2": 1.0 - sse / sst if sst > 0 else (1.0 if sse <= 1e-24 else None)}

    def truth(self, pred: Any, y: Any) -> float:
        p, t = _f64(pred).cpu().reshape(pred.shape[0], -1), _f64(y).cpu().reshape(pred.shape[0], -1)
        sst = float(((t - t.mean(0)) ** 2).sum())
        return 1.0 - float(((p - t) ** 2).sum()) / sst if sst > 0 else math.nan


class Dense(Kind):
    """Per-pixel class logits [N, C, H, W] (segmentation)."""

    name = "dense"
    measures = ("pixel_agreement", "miou")
    labels = {"pixel_agreement": "pixel top-1 agreement", "miou": "mIoU vs original"}
    truth_label = "pixel accuracy"
    proportions = ("pixel_agreement",)

    def sample_losses(self, s: Any, t: Any, temperature: float) -> Any:
        import torch.nn.functional as F

        T = float(temperature)
        ls, lt = F.log_softmax(s / T, 1), F.log_softmax(t.detach() / T, 1)
        pixels = max(s.numel() // (s.shape[1] * s.shape[0]), 1)
        return (lt.exp() * (lt - ls)).reshape(s.shape[0], -1).sum(1) / pixels * T * T

    def sums(self, r: Any, o: Any) -> dict[str, Any]:
        import torch

        c = int(r.shape[1])
        a, b = r.argmax(1).reshape(-1), o.argmax(1).reshape(-1)
        inter = torch.bincount(a[a == b], minlength=c).double()
        union = torch.bincount(a, minlength=c).double() + torch.bincount(b, minlength=c).double() - inter
        px = torch.tensor([float((a == b).sum()), float(a.numel())], dtype=torch.float64, device=r.device)
        return {"px": px, "iou": torch.stack([inter, union])}

    def values(self, sums: dict[str, Any]) -> dict[str, float | None]:
        match, count = (float(v) for v in sums["px"])
        inter, union = sums["iou"]
        seen = union > 0
        miou = float((inter[seen] / union[seen]).mean()) if bool(seen.any()) else None
        return {"pixel_agreement": match / count if count else None, "miou": miou}

    def truth(self, pred: Any, y: Any) -> float:
        return float((pred.argmax(1).cpu() == y.cpu().reshape(pred.shape[0], *pred.shape[2:])).double().mean())


class Decoded(Kind):
    """A kind read through the user's decoder ``fn`` (output ``[N, ...]`` → the value the user reads,
    ``[N]`` or ``[N, D]``: a pitch in cents, an angle, a count): the measures lead with agreement in those
    units — the fraction of samples whose decoded value is within ``tol`` of the original's (every
    component, for ``[N, D]``) and the mean absolute difference — then the base kind's own. The loss is the
    base kind's (a decoder need not be differentiable)."""

    def __init__(self, base: Kind, fn: Any, tol: float, *, unit: str = "", spec: str = "") -> None:
        self.base, self.fn, self.tol, self.unit, self.spec = base, fn, float(tol), unit, spec
        self.name = base.name
        u = f" {unit}" if unit else ""
        self.measures = ("decoded_within", "decoded_mad", *base.measures)
        self.labels = {"decoded_within": f"decoded within ±{tol:g}{u}", "decoded_mad": f"decoded mean |Δ|{f' ({unit})' if unit else ''}",
                       **base.labels}
        self.truth_label = f"accuracy within ±{tol:g}{u}"
        self.proportions = ("decoded_within", *base.proportions)

    def decode(self, out: Any) -> Any:
        """The decoder's values for ``out`` as float64 ``[N, D]``; one-line :class:`InputError` when it fails."""
        from torch import Tensor

        from .errors import InputError, first_line

        who = f"the decoder {self.spec}" if self.spec else "the decoder"
        try:
            v = self.fn(out.detach())
        except Exception as e:  # noqa: BLE001 - the user's code: say what it raised
            raise InputError(f"{who} raised {first_line(e)} on an output of shape {list(out.shape)}; "
                             "it takes the model's output [N, ...] and returns [N] or [N, D] values") from None
        if not isinstance(v, Tensor) or v.dim() not in (1, 2) or v.shape[0] != out.shape[0]:
            got = list(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise InputError(f"{who} returned {got} for an output of shape {list(out.shape)}; return [N] or [N, D] values, "
                             f"one row per sample (N = {out.shape[0]})")
        return _f64(v).reshape(v.shape[0], -1)

    def sample_losses(self, s: Any, t: Any, temperature: float) -> Any:
        return self.base.sample_losses(s, t, temperature)

    def sums(self, r: Any, o: Any) -> dict[str, Any]:
        import torch

        d = (self.decode(o) - self.decode(r)).abs()
        d = torch.where(torch.isfinite(d), d, torch.full_like(d, math.inf))  # a NaN decode is a miss
        within = (d <= self.tol).all(1).double().sum()
        mad = d.mean(1)
        n = torch.tensor(float(r.shape[0]), dtype=torch.float64, device=r.device)
        return {**self.base.sums(r, o), "dec": torch.stack([within, mad[torch.isfinite(mad)].sum(), n])}

    def values(self, sums: dict[str, Any]) -> dict[str, float | None]:
        within, dsum, n = (float(v) for v in sums["dec"])
        return {"decoded_within": within / n if n else None, "decoded_mad": dsum / n if n else None,
                **self.base.values({k: v for k, v in sums.items() if k != "dec"})}

    def truth(self, pred: Any, y: Any) -> float:
        """Against labels in the decoder's units (``[N]`` or ``[N, D]``): the fraction within ``tol``."""
        d = (self.decode(pred).cpu() - _f64(y).cpu().reshape(pred.shape[0], -1)).abs()
        return float((d <= self.tol).all(1).double().mean()) if len(d) else math.nan

    def __repr__(self) -> str:
        return f"<output kind {self.name} read through {self.spec or 'a decoder'} (±{self.tol:g}{' ' + self.unit if self.unit else ''})>"


def resolve_decoder(decode: Any, decode_tol: float | None, model: Any = None) -> tuple[Any, float, str, str] | None:
    """(fn, tol, unit, spec) of the decoder to read outputs through: ``decode`` (a callable or a
    ``module:callable`` / ``file.py:callable`` spec), else the model's ``normswap_decode`` attribute, else
    None. ``tol``: ``decode_tol``, else the decoder's ``tolerance`` attribute; ``unit``: its ``unit``."""
    from .errors import InputError

    if decode is None:
        decode = getattr(model, "normswap_decode", None) if model is not None else None
        if decode is None:
            if decode_tol is not None:
                raise InputError("--decode-tol is the tolerance of a decoder; add --decode module:fn")
            return None
    spec = decode if isinstance(decode, str) else (f"{getattr(decode, '__module__', '')}:{decode.__qualname__}"
                                                   if hasattr(decode, "__qualname__") else type(decode).__name__)
    if isinstance(decode, str):
        from .load import resolve_callable

        fn = resolve_callable(decode)
    else:
        fn = decode
    if not callable(fn):
        raise InputError(f"--decode {spec} is not callable; name a function from the model's output to the value you read")
    tol = decode_tol if decode_tol is not None else getattr(fn, "tolerance", None)
    if tol is None:
        raise InputError(f"the decoder {spec} has no tolerance: add --decode-tol T (in its units: how far apart two readings "
                         "may be and still count as the same)")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise InputError(f"--decode-tol must be a non-negative number, got {tol!r}")
    return fn, float(tol), str(getattr(fn, "unit", "") or ""), spec


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


for _k in (Logits(), Probabilities(), Multilabel(), Peaked(), Regression(), Dense()):
    register(_k)


# ---------------------------------------------------------------------------------------------------
# detection


def detect_kind(t: Any) -> tuple[str, str]:
    """(kind name, why) for one output tensor of the original model on real inputs."""
    if not t.is_floating_point():
        return "regression", f"{t.dtype} values"
    shape = list(t.shape)
    if t.numel() == 0:
        return "regression", "empty output"
    lo, hi = float(t.min()), float(t.max())
    unit = lo >= 0.0 and hi <= 1.0
    if t.dim() == 4 and shape[1] > 1 and not unit:
        return "dense", f"[N, C, H, W] = {shape}, unbounded values: per-pixel class logits"
    if t.dim() == 2 and shape[1] > 1:
        if unit and float((t.double().sum(1) - 1).abs().max()) < 1e-3:
            return "probabilities", f"{shape}, rows in [0, 1] summing to 1 (softmax)"
        if unit and shape[1] >= PEAKED_MIN_BINS:
            mass = _peak_mass(t)
            if mass >= PEAKED_MASS:
                return "peaked", (f"{shape}, values in [0, 1] (sigmoid), each row one bump: the median row holds "
                                  f"{mass:.0%} of its mass within ±{PEAK_HALF_WIDTH} bins of its peak (a pitch / angle histogram)")
        if unit:
            return "multilabel", f"{shape}, values in [0, 1] (sigmoid), rows not summing to 1"
        return "logits", f"{shape}, unbounded values"
    if t.dim() <= 2 and unit and (t.dim() == 1 or shape[1] == 1):
        return "multilabel", f"{shape}, values in [0, 1] (a sigmoid)"
    return "regression", f"{shape}, values in [{lo:.3g}, {hi:.3g}]"


def _peak_mass(t: Any) -> float:
    """The median, over rows with a clear maximum (≥ 0.05), of the fraction of a row's mass within
    ±PEAK_HALF_WIDTH bins of its argmax (1.0 for a single bump; ~(2w+1)/K for a flat or scattered row)."""
    import torch

    p = _f64(t).reshape(t.shape[0], -1).clamp_min(0)
    idx = (p.argmax(1)[:, None] + torch.arange(-PEAK_HALF_WIDTH, PEAK_HALF_WIDTH + 1, device=p.device)[None, :]).clamp(0, p.shape[1] - 1)
    near = torch.zeros_like(p).scatter_(1, idx, 1.0)
    frac = (p * near).sum(1) / p.sum(1).clamp_min(1e-12)
    clear = p.amax(1) >= 0.05
    if int(clear.sum()) < max(1, t.shape[0] // 2):
        return 0.0
    return float(frac[clear].median())


def _leaves_with_paths(out: Any) -> list[tuple[str, Any]]:
    from torch import Tensor
    from torch.utils import _pytree as pytree

    flat, _ = pytree.tree_flatten_with_path(out)
    return [(pytree.keystr(p), v) for p, v in flat if isinstance(v, Tensor)]


class Outputs:
    """The kinds of a model's outputs: one per tensor leaf (a plain tensor output has one)."""

    def __init__(self, kinds: list[Kind], paths: list[str], *, source: str, why: list[str] | None = None) -> None:
        self.kinds, self.paths, self.source = kinds, paths, source
        self.why = why or [""] * len(kinds)

    @property
    def kind(self) -> Kind:
        """The first output's kind (the one whose primary measure is the model's quality)."""
        return self.kinds[0]

    @property
    def name(self) -> str:
        names = list(dict.fromkeys(k.name for k in self.kinds))
        return names[0] if len(self.kinds) == 1 else f"{len(self.kinds)} outputs: " + ", ".join(
            f"{p or 'out'} {k.name}" for p, k in zip(self.paths, self.kinds))

    @property
    def primary(self) -> str:
        return self.kind.primary

    @property
    def label(self) -> str:
        return self.kind.labels[self.primary]

    @property
    def decoder(self) -> Decoded | None:
        """The decoder the first output is read through, if any."""
        return self.kinds[0] if isinstance(self.kinds[0], Decoded) else None

    def with_decoder(self, fn: Any, tol: float, *, unit: str = "", spec: str = "") -> Outputs:
        """These outputs, the first one read through ``fn`` (:class:`Decoded`)."""
        base = self.kinds[0].base if isinstance(self.kinds[0], Decoded) else self.kinds[0]
        kinds = [Decoded(base, fn, tol, unit=unit, spec=spec), *self.kinds[1:]]
        return Outputs(kinds, self.paths, source=self.source, why=self.why)

    def describe(self) -> str:
        """One line: the kind(s) and how they were chosen."""
        how = {"given": "given (--output-kind)", "model": "declared by the model (normswap_output_kind)"}.get(self.source, "detected")
        why = f": {self.why[0]}" if self.source == "detected" and len(self.kinds) == 1 and self.why[0] else ""
        dec = self.decoder
        read = "" if dec is None else (f"; read through the decoder {dec.spec or ''} (same reading: within ±{dec.tol:g}"
                                       f"{' ' + dec.unit if dec.unit else ''})")
        return f"output kind {self.name}, {how}{why}{read}"

    def to_dict(self) -> dict[str, Any]:
        dec = self.decoder
        return {"kind": self.name, "kinds": [k.name for k in self.kinds], "paths": self.paths, "source": self.source,
                "primary": self.primary, "why": self.why,
                "decoder": None if dec is None else {"spec": dec.spec, "tolerance": dec.tol, "unit": dec.unit}}

    def _pairs(self, a: Any, b: Any) -> list[tuple[int, Kind, Any, Any]]:
        from torch import Tensor
        from torch.utils import _pytree as pytree

        la = [t for t in pytree.tree_leaves(a) if isinstance(t, Tensor)]
        lb = [t for t in pytree.tree_leaves(b) if isinstance(t, Tensor)]
        return [(i, self.kinds[min(i, len(self.kinds) - 1)], x, y) for i, (x, y) in enumerate(zip(la, lb))]

    def _summed(self, per_kind: str, s_out: Any, t_out: Any, temperature: float, batched: bool) -> Any:
        """The sum over the matching floating-point outputs of each one's kind's ``per_kind`` loss."""
        from .errors import NormswapError

        pairs = [(k, s, t) for _, k, s, t in self._pairs(s_out, t_out)
                 if s.is_floating_point() and s.shape == t.shape and (s.dim() > 0 or not batched)]
        if not pairs:
            raise NormswapError("the student returned no floating-point tensor output matching the original's")
        total = None
        for k, s, t in pairs:
            v = getattr(k, per_kind)(s, t, temperature)
            total = v if total is None else total + v
        return total

    def loss(self, s_out: Any, t_out: Any, temperature: float) -> Any:
        """The distillation loss: the sum over the outputs of each one's kind's loss."""
        return self._summed("loss", s_out, t_out, temperature, batched=False)

    def sample_losses(self, s_out: Any, t_out: Any, temperature: float = 1.0) -> Any:
        """Each sample's distillation loss ``[N]``, summed over the outputs (their mean is :meth:`loss`)."""
        return self._summed("sample_losses", s_out, t_out, temperature, batched=True)

    def meter(self) -> Meter:
        return Meter(self)

    def truth(self, pred_out: Any, y: Any) -> float:
        leaves = [t for _, t in _leaves_with_paths(pred_out)]
        return self.kind.truth(leaves[0], y)


def outputs_for(out: Any, kind: str | Outputs | None = None, model: Any = None) -> Outputs:
    """The :class:`Outputs` of a model's output ``out`` (the original's, on real inputs): ``kind`` when
    given (a name applies to every output), else the model's ``normswap_output_kind`` attribute, else
    detected per output (:func:`detect_kind`)."""
    if isinstance(kind, Outputs):
        return kind
    leaves = _leaves_with_paths(out)
    paths = [p for p, _ in leaves]
    if not leaves:
        from .errors import InputError

        raise InputError("the model returned no tensor output: nothing to measure or distil")
    declared = getattr(model, "normswap_output_kind", None) if model is not None else None
    if kind is not None or declared is not None:
        name = kind if kind is not None else declared
        if isinstance(name, str):
            k = get(name)
            return Outputs([k] * len(leaves), paths, source="given" if kind is not None else "model")
    found = [detect_kind(t) for _, t in leaves]
    return Outputs([get(n) for n, _ in found], paths, source="detected", why=[w for _, w in found])


def detect(model: Any, batches: Any, kind: str | Outputs | None = None, *, max_batches: int = 2, decode: Any = None,
           decode_tol: float | None = None) -> Outputs:
    """The output kinds of ``model`` (eval mode, flags restored, no grad) from its outputs on the first
    ``max_batches`` of ``batches`` (concatenated), unless ``kind`` (or the model) says; the first output
    read through ``decode`` (or the model's ``normswap_decode``: :func:`resolve_decoder`) when there is one."""
    if not isinstance(kind, Outputs):
        found = _detect(model, batches, kind, max_batches)
        dec = resolve_decoder(decode, decode_tol, model)
        return found if dec is None else found.with_decoder(dec[0], dec[1], unit=dec[2], spec=dec[3])
    return kind


def _detect(model: Any, batches: Any, kind: str | None, max_batches: int) -> Outputs:
    import torch
    from torch.utils import _pytree as pytree

    from .data import as_batches
    from .parity import eval_mode

    if kind is not None:
        check_name(kind)
    outs = []
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model), torch.no_grad():
        for i, batch in enumerate(as_batches(batches)):
            if i >= max_batches:
                break
            outs.append(model(*(t.to(device) for t in batch)))
    if not outs:
        from .errors import InputError

        raise InputError("no data to detect the output kind on; give at least one sample")
    if len(outs) == 1:
        return outputs_for(outs[0], kind, model)
    flat = [pytree.tree_flatten(o) for o in outs]
    leaves = [torch.cat(ls) if all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in ls) else ls[0]
              for ls in zip(*(f[0] for f in flat))]
    return outputs_for(pytree.tree_unflatten(leaves, flat[0][1]), kind, model)


# ---------------------------------------------------------------------------------------------------
# measuring


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
