"""Which kind each output is: detected from the original's outputs, given, or declared by the model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .decoded import Decoded, resolve_decoder
from .heads import _f64
from .registry import PEAK_HALF_WIDTH, PEAKED_MASS, PEAKED_MIN_BINS, Kind, check_name, get

if TYPE_CHECKING:
    from .measures import Meter


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
    def mixup(self) -> bool:
        """Recovery may mix pairs of inputs only when every output's kind allows it (:attr:`Kind.mixup`)."""
        return all(k.mixup for k in self.kinds)

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
        from ...errors import NormswapError

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
        from .measures import Meter  # measures builds on this module

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
        from ...errors import InputError

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

    from ...load.data import as_batches
    from ...parity import eval_mode

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
        from ...errors import InputError

        raise InputError("no data to detect the output kind on; give at least one sample")
    if len(outs) == 1:
        return outputs_for(outs[0], kind, model)
    flat = [pytree.tree_flatten(o) for o in outs]
    leaves = [torch.cat(ls) if all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in ls) else ls[0]
              for ls in zip(*(f[0] for f in flat))]
    return outputs_for(pytree.tree_unflatten(leaves, flat[0][1]), kind, model)


# ---------------------------------------------------------------------------------------------------
