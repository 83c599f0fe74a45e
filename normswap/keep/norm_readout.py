"""The readout refit after per-sample norms became fitted affines (``--to fold --calib``).

A per-channel affine cannot reproduce what a per-sample norm does sample by sample (GroupNorm over 8
head features, say: its R² alone can be 0.9); the part it misses reaches the model's readout (the final
Linear / 1×1 conv, through its link) as features the trained readout was not trained on. The same
closed-form refit the swap calibration makes (:mod:`normswap.keep.calibrate.readout`: ridge least
squares of the original's outputs, through the inverse link, on the student's own readout inputs, one
pass over the calibration data) is the best linear readout of those features — and, being a Linear, it
folds like any other.

It is kept only when, on the held-out data, it lowers the output kind's distillation loss *and* does not
lower the kind's primary measure (the one ``--fold-norms auto`` holds within ``--max-drop``: a refit that
trades a lower loss for one more disagreeing sample would break that bar after the choice was made); the
decision, both losses, both measures and the sample count are reported. The readout must not be a site's producer
or consumer that the fold changes — it is the model's last layer, after every norm.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["ReadoutRefit", "refit_readout", "improves"]


@dataclass
class ReadoutRefit:
    """What the refit did: the readout's name and link, the pre-activation rel err on the calibration
    data before / after, the held-out loss before / after, and whether the refit was kept."""

    module: str | None
    link: str | None
    kept: bool
    rel_before: float | None = None
    rel_after: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    loss: str = ""
    samples: int | None = None
    measure: str = ""  # the kind's primary measure, as the report names it
    measure_before: float | None = None
    measure_after: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def line(self) -> str:
        if self.module is None:
            return f"no readout refit: {self.note}"
        link = f" through {self.link}" if self.link not in (None, "identity") else ""
        measure = ("" if self.measure_before is None or self.measure_after is None
                   else f", {self.measure} {self.measure_before:.4f} → {self.measure_after:.4f}")
        what = (f"readout {self.module} refit{link} to the original's outputs (calibration rel err "
                f"{self.rel_before:.3f} → {self.rel_after:.3f}; held-out {self.loss} {self.loss_before:.4g} → "
                f"{self.loss_after:.4g}{measure}, {self.samples} samples)")
        if self.kept:
            return what + ": kept"
        why = ("it did not lower the held-out loss" if self.loss_after is None or self.loss_before is None
               or self.loss_after >= self.loss_before else f"it lowered the held-out {self.measure}")
        return what + f": reverted, {why}"


def improves(loss_before: float | None, loss_after: float | None, measure_before: float | None,
             measure_after: float | None) -> bool:
    """The keep rule of every refit after the affine fits: the held-out loss is lower and the kind's primary
    measure (when both are known) is not."""
    return (loss_before is not None and loss_after is not None and loss_after < loss_before
            and (measure_before is None or measure_after is None or measure_after >= measure_before))


def refit_readout(original: nn.Module, model: nn.Module, calib: Any, heldout: Any, outputs: Any) -> ReadoutRefit:
    """Refit ``model``'s readout in place to ``original``'s outputs on ``calib``; put the trained one back
    unless the held-out loss (the kind of ``outputs``) is lower with the refit. ``original`` is not changed."""
    from .calibrate import calibrate

    before = copy.deepcopy(model.state_dict())
    rep = calibrate(original, model, calib, sites=[], readout=True, heldout=heldout, output_kind=outputs)
    r, h = rep.readout or {}, rep.heldout or {}
    if not r.get("refit"):
        return ReadoutRefit(None, None, False, note=r.get("note") or "no Linear / 1×1 conv readout found")
    lb, la = h.get("loss_naive"), h.get("loss_after")
    key = h.get("primary")
    mb, ma = (h.get("naive") or {}).get(key), (h.get("after") or {}).get(key)
    kept = improves(lb, la, mb, ma)
    if not kept:
        model.load_state_dict(before)
    return ReadoutRefit(r["module"], r.get("link"), kept, r.get("rel_before"), r.get("rel_after"), lb, la,
                        h.get("loss", "loss"), h.get("samples"), h.get("label") or key or "", mb, ma)
