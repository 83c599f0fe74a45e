"""Outputs read through the user's decoder (``--decode module:fn``): agreement in the units the user reads."""

from __future__ import annotations

import math
from typing import Any

from .heads import _f64
from .registry import Kind


class Decoded(Kind):
    """A kind read through the user's decoder ``fn`` (output ``[N, ...]`` → the value the user reads,
    ``[N]`` or ``[N, D]``: a pitch in cents, an angle, a count): the measures lead with agreement in those
    units — the fraction of samples whose decoded value is within ``tol`` of the original's (every
    component, for ``[N, D]``) and the mean absolute difference — then the base kind's own. The loss is the
    base kind's (a decoder need not be differentiable)."""

    def __init__(self, base: Kind, fn: Any, tol: float, *, unit: str = "", spec: str = "") -> None:
        self.base, self.fn, self.tol, self.unit, self.spec = base, fn, float(tol), unit, spec
        self.name = base.name
        self.mixup = base.mixup
        u = f" {unit}" if unit else ""
        self.measures = ("decoded_within", "decoded_mad", *base.measures)
        self.labels = {"decoded_within": f"decoded within ±{tol:g}{u}", "decoded_mad": f"decoded mean |Δ|{f' ({unit})' if unit else ''}",
                       **base.labels}
        self.truth_label = f"accuracy within ±{tol:g}{u}"
        self.proportions = ("decoded_within", *base.proportions)

    def decode(self, out: Any) -> Any:
        """The decoder's values for ``out`` as float64 ``[N, D]``; one-line :class:`InputError` when it fails."""
        from torch import Tensor

        from ...errors import InputError, first_line

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
    from ...errors import InputError

    if decode is None:
        decode = getattr(model, "normswap_decode", None) if model is not None else None
        if decode is None:
            if decode_tol is not None:
                raise InputError("--decode-tol is the tolerance of a decoder; add --decode module:fn")
            return None
    spec = decode if isinstance(decode, str) else (f"{getattr(decode, '__module__', '')}:{decode.__qualname__}"
                                                   if hasattr(decode, "__qualname__") else type(decode).__name__)
    if isinstance(decode, str):
        from ...load import resolve_callable

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
