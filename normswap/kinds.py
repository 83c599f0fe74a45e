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
regression      anything else ([N, D], features, maps)   mean (s − t)² / the original's per-output        R², rel err
                                                         variance over the batch
dense           [N, C, H, W], C > 1, unbounded           T²·per-pixel KL over C                            pixel top-1 agreement, mIoU vs the original, rel err
=============== ======================================== ================================================ =========================

A dict / list / tuple output gets a kind per tensor leaf (:class:`Outputs`): the loss is the sum over
the leaves, the first leaf's measures keep their names and the others are prefixed by their path
(``['boxes'].r2``). ``rel_err`` is ‖out − ref‖/‖ref‖ over all leaves together.

This module imports torch only inside its functions: :data:`KIND_NAMES` serves option validation.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

__all__ = ["KIND_NAMES", "Kind", "Measures", "Meter", "Outputs", "detect", "detect_kind", "get", "outputs_for", "register"]

#: every ``--output-kind`` value (torch-free)
KIND_NAMES = ("logits", "probabilities", "multilabel", "regression", "dense")

#: probabilities are clamped to [EPS, 1 − EPS] before their logarithm / logit
EPS = 1e-6

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

    @property
    def primary(self) -> str:
        return self.measures[0]

    @abstractmethod
    def loss(self, s: Any, t: Any, temperature: float) -> Any:
        ...

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


class Logits(Kind):
    name = "logits"
    measures = ("top1_agreement",)
    labels = {"top1_agreement": "top-1 agreement"}

    def log_probs(self, x: Any, temperature: float) -> Any:
        import torch.nn.functional as F

        return F.log_softmax(x / temperature, 1)

    def loss(self, s: Any, t: Any, temperature: float) -> Any:
        import torch.nn.functional as F

        T = float(temperature)
        return F.kl_div(self.log_probs(s, T), self.log_probs(t.detach(), T), log_target=True, reduction="batchmean") * T * T

    def sums(self, r: Any, o: Any) -> dict[str, Any]:
        import torch

        r2, o2 = r.reshape(r.shape[0], -1) if r.dim() > 2 else r, o.reshape(o.shape[0], -1) if o.dim() > 2 else o
        match = (r2.argmax(1) == o2.argmax(1)).sum().double()
        return {"cls": torch.stack([match, torch.tensor(float(r.shape[0]), dtype=torch.float64, device=r.device)])}

    def values(self, sums: dict[str, Any]) -> dict[str, float | None]:
        match, count = (float(v) for v in sums["cls"])
        return {"top1_agreement": match / count if count else None}

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
    measures = ("label_agreement", "mae")
    labels = {"label_agreement": "label agreement @0.5", "mae": "MAE"}
    truth_label = "label accuracy"

    @staticmethod
    def logit(p: Any) -> Any:
        p = p.clamp(EPS, 1 - EPS)
        return p.log() - (-p).log1p()

    def loss(self, s: Any, t: Any, temperature: float) -> Any:
        import torch.nn.functional as F

        T = float(temperature)
        zs, zt = self.logit(s) / T, self.logit(t.detach()) / T
        qt = zt.sigmoid()
        # binary KL(q_t ‖ q_s) per label, from log-sigmoids of the logits (stable at both ends)
        kl = qt * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - qt) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))
        return kl.sum() / max(int(s.shape[0]), 1) * T * T

    def sums(self, r: Any, o: Any) -> dict[str, Any]:
        import torch

        agree = ((r > 0.5) == (o > 0.5)).sum().double()
        return {"ml": torch.stack([agree, torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device),
                                   (_f64(o) - _f64(r)).abs().sum()])}

    def values(self, sums: dict[str, Any]) -> dict[str, float | None]:
        agree, count, abs_err = (float(v) for v in sums["ml"])
        return {"label_agreement": agree / count if count else None, "mae": abs_err / count if count else None}

    def truth(self, pred: Any, y: Any) -> float:
        return float(((pred.cpu() > 0.5) == (y.cpu().reshape(pred.shape) > 0.5)).double().mean())


class Regression(Kind):
    """Real-valued outputs (and features): matched in squared error relative to the original's spread."""

    name = "regression"
    measures = ("r2",)
    labels = {"r2": "R² vs original"}
    truth_label = "R² vs labels"  # two R² columns side by side: say which is which

    def loss(self, s: Any, t: Any, temperature: float) -> Any:
        t = t.detach()
        if t.shape[0] > 1:
            var = t.var(0, unbiased=False)
            var = var.clamp_min(float(var.mean()) * 1e-3 + 1e-12)
        else:
            var = (t * t).mean().clamp_min(1e-12)
        return ((s - t) ** 2 / var).mean()

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

    def loss(self, s: Any, t: Any, temperature: float) -> Any:
        import torch.nn.functional as F

        T = float(temperature)
        ls, lt = F.log_softmax(s / T, 1), F.log_softmax(t.detach() / T, 1)
        pixels = s.numel() // s.shape[1]
        return (lt.exp() * (lt - ls)).sum() / max(pixels, 1) * T * T

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


for _k in (Logits(), Probabilities(), Multilabel(), Regression(), Dense()):
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
        if unit:
            return "multilabel", f"{shape}, values in [0, 1] (sigmoid), rows not summing to 1"
        return "logits", f"{shape}, unbounded values"
    if t.dim() <= 2 and unit and (t.dim() == 1 or shape[1] == 1):
        return "multilabel", f"{shape}, values in [0, 1] (a sigmoid)"
    return "regression", f"{shape}, values in [{lo:.3g}, {hi:.3g}]"


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

    def describe(self) -> str:
        """One line: the kind(s) and how they were chosen."""
        how = {"given": "given (--output-kind)", "model": "declared by the model (normswap_output_kind)"}.get(self.source, "detected")
        why = f": {self.why[0]}" if self.source == "detected" and len(self.kinds) == 1 and self.why[0] else ""
        return f"output kind {self.name}, {how}{why}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.name, "kinds": [k.name for k in self.kinds], "paths": self.paths, "source": self.source,
                "primary": self.primary, "why": self.why}

    def _pairs(self, a: Any, b: Any) -> list[tuple[int, Kind, Any, Any]]:
        from torch import Tensor
        from torch.utils import _pytree as pytree

        la = [t for t in pytree.tree_leaves(a) if isinstance(t, Tensor)]
        lb = [t for t in pytree.tree_leaves(b) if isinstance(t, Tensor)]
        return [(i, self.kinds[min(i, len(self.kinds) - 1)], x, y) for i, (x, y) in enumerate(zip(la, lb))]

    def loss(self, s_out: Any, t_out: Any, temperature: float) -> Any:
        """The distillation loss: the sum over the outputs of each one's kind's loss."""
        from .errors import NormswapError

        pairs = [(k, s, t) for _, k, s, t in self._pairs(s_out, t_out) if s.is_floating_point() and s.shape == t.shape]
        if not pairs:
            raise NormswapError("the student returned no floating-point tensor output matching the original's")
        total = None
        for k, s, t in pairs:
            v = k.loss(s, t, temperature)
            total = v if total is None else total + v
        return total

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


def detect(model: Any, batches: Any, kind: str | Outputs | None = None, *, max_batches: int = 2) -> Outputs:
    """The output kinds of ``model`` (eval mode, flags restored, no grad) from its outputs on the first
    ``max_batches`` of ``batches`` (concatenated), unless ``kind`` (or the model) says."""
    import torch
    from torch.utils import _pytree as pytree

    from .data import as_batches
    from .parity import eval_mode

    if isinstance(kind, Outputs):
        return kind
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

    @property
    def quality(self) -> float | None:
        return self.get(self.primary)

    def describe(self, data: str = "") -> str:
        """'top-1 agreement 0.9911, output rel err 0.12' (+ ' on DATA')."""
        parts = []
        for k, v in self.items():
            if v is None:
                continue
            name = _LABELS.get(k, k)
            parts.append(f"{name} {v:.4f}" if k != "rel_err" else f"output rel err {v:.3g}")
        return ", ".join(parts) + (f" on {data}" if data else "")


_LABELS = {k: v for kind in _REGISTRY.values() for k, v in kind.labels.items()}


def measures_like(values: dict[str, float | None], outputs: Outputs | None) -> Measures:
    m = Measures(values)
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
        return measures_like(out, self.outputs)
