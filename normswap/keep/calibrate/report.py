"""What calibration did: per-site fits and the whole pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


#: A site whose best per-channel affine fit explains less than this share of the original's output
#: variance is reported as one calibration cannot fix.
LOW_R2 = 0.9
#: ... and one whose R² rose by less than this over the naive (copied) γ, β is one calibration cannot help.
MIN_R2_GAIN = 0.1


@dataclass
class SiteCalibration:
    """The fit at one site: R² and relative RMS error of the site's output against the original's,
    with the naive (copied) parameters (``*_before``) and the fitted ones (``*_after``), both on the
    inputs the site saw during calibration (its upstream already calibrated)."""

    site: str
    norm: str
    kind: str
    channels: int = 0
    calls: int = 0
    r2_before: float | None = None
    r2_after: float | None = None
    rel_before: float | None = None
    rel_after: float | None = None
    status: str = "fitted"  # fitted | low-r2 | cannot-help | kept-previous | exact | unsupported | not-run
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("site", "norm", "kind", "channels", "calls", "r2_before", "r2_after",
                                            "rel_before", "rel_after", "status", "note")}
        for k in ("r2_before", "r2_after", "rel_before", "rel_after"):
            if d[k] is not None:
                d[k] = round(float(d[k]), 6)
        if self.extra:
            d.update(self.extra)
        return d


# ---------------------------------------------------------------------------------------------------
# report


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did: per-site fits, the readout refit, agreement during the last pass, cost.

    ``agreement`` is measured on the calibration data *during* the last pass (each batch with the
    parameters fitted so far, before the readout refit) — not held out; ``heldout`` (when
    :func:`calibrate` was given held-out data) holds the kind's measures and loss on it before
    (``naive``) and after (``after``), and the sites that kept their previous parameters.
    ``seconds`` is the wall time of the whole call, every check included; ``parts`` splits it (fit pass,
    readout, held-out checks, advice). ``cost_ratio`` = ``seconds`` / one forward of the original over
    the calibration data (the teacher's forwards in the fit pass, minus the time of calibration's own
    hooks on it); :meth:`part_ratios` gives each part the same way. ``benchmarks/bench.py`` measures the
    stage against separate plain forward passes."""

    sites: list[SiteCalibration]
    samples: int = 0
    batches: int = 0
    passes: int = 1
    seconds: float = 0.0
    teacher_seconds: float = 0.0
    world_size: int = 1
    agreement: dict[str, float | None] = field(default_factory=dict)
    readout: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    output_kind: str | None = None  # the outputs' kind and how it was chosen (normswap.keep.kinds.Outputs.describe)
    heldout: dict[str, Any] | None = None
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def forward_seconds(self) -> float:
        """One forward of the original over the calibration data."""
        return self.teacher_seconds / max(self.passes, 1)

    def part_ratios(self) -> dict[str, float]:
        """Each part's seconds / one forward of the original over the calibration data."""
        f = self.forward_seconds
        return {k: v / f for k, v in self.parts.items()} if f > 0 else {}

    @property
    def kept_previous_sites(self) -> list[str]:
        """Sites whose fitted parameters raised the held-out loss and were not kept."""
        return [s.site for s in self.sites if s.status == "kept-previous"]

    @property
    def cost_ratio(self) -> float | None:
        if self.teacher_seconds <= 0:
            return None
        return self.seconds / self.forward_seconds

    @property
    def low_r2_sites(self) -> list[str]:
        """Sites whose fit explains less than LOW_R2 of the original's output (both kinds)."""
        return [s.site for s in self.sites if s.status in ("low-r2", "cannot-help")]

    @property
    def cannot_help_sites(self) -> list[str]:
        """Low-R² sites where calibration barely improved on the naive γ, β."""
        return [s.site for s in self.sites if s.status == "cannot-help"]

    def to_dict(self) -> dict[str, Any]:
        cr = self.cost_ratio
        return {
            "samples": self.samples,
            "batches": self.batches,
            "passes": self.passes,
            "world_size": self.world_size,
            "seconds": round(self.seconds, 4),
            "original_forward_seconds": round(self.forward_seconds, 4),
            "cost_ratio": None if cr is None else round(cr, 3),
            "parts": {k: {"seconds": round(v, 4), "ratio": round(self.part_ratios().get(k, 0.0), 3)} for k, v in self.parts.items()},
            "agreement_during_pass": {k: (None if v is None else round(float(v), 6)) for k, v in self.agreement.items()},
            "readout": self.readout,
            "output_kind": self.output_kind,
            "heldout": _rounded(self.heldout),
            "kept_previous_sites": self.kept_previous_sites,
            "low_r2_sites": self.low_r2_sites,
            "cannot_help_sites": self.cannot_help_sites,
            "warnings": list(self.warnings),
            "sites": [s.to_dict() for s in self.sites],
        }

    def summary(self) -> str:
        fitted = sum(s.status in ("fitted", "low-r2", "cannot-help") for s in self.sites)
        cr = self.cost_ratio
        split = ", ".join(f"{k} {v:.2f}×" for k, v in self.part_ratios().items())
        parts = [f"calibrated {fitted}/{len(self.sites)} site(s) on {self.samples} samples"
                 f" ({self.passes} pass{'es' if self.passes > 1 else ''}, {self.seconds:.2f}s"
                 + (f" = {cr:.2f}× one forward of the original over those {self.samples} samples" if cr is not None else "")
                 + ")"]
        h = self.heldout
        if h is not None and h.get("after"):
            from ..kinds import Measures

            before, after = Measures(h["naive"]), Measures(h["after"])
            key = h.get("primary") or next(iter(after))
            label = h.get("label") or _label(key)
            if after.get(key) is not None and before.get(key) is not None:
                n = f", {h['samples']} samples" if "samples" in h else ""
                parts.append(f"held-out {label} {before[key]:.4f} → {after[key]:.4f} on {h.get('data', 'held-out data')}"
                             + (f" (never-worse check {h['seconds']:.2f}s{n})" if h.get("checked") and "seconds" in h else ""))
        else:
            key = next((k for k in self.agreement if k != "rel_err"), None)
            v = self.agreement.get(key) if key else None
            if v is not None:
                parts.append(f"{_label(key)} during the pass {v:.4f} (calibration data, not held out)")
        r = self.readout or {}
        if r.get("refit"):
            link = f" through {r['link']}" if r.get("link") not in (None, "identity") else ""
            parts.append(f"readout {r['module']} refit{link} (pre-activation rel err {r['rel_before']:.3f} → {r['rel_after']:.3f})")
        elif r.get("note"):
            parts.append(r["note"])
        if self.kept_previous_sites:
            parts.append(f"{len(self.kept_previous_sites)} site(s) kept their previous parameters (held-out check)")
        if self.low_r2_sites:
            parts.append(f"{len(self.low_r2_sites)} site(s) with R² < {LOW_R2}"
                         + (f", {len(self.cannot_help_sites)} of them beyond calibration's reach" if self.cannot_help_sites else ""))
        if split and cr is not None:
            parts.append(f"of which {split} (× one forward)")
        return "; ".join(parts)

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        t = Table(title="calibration (per site: the original BN's output vs the new norm's)", title_justify="left")
        for col in ("site", "norm", "R² before", "R² after", "rel err before", "rel err after", "status"):
            t.add_column(col, overflow="fold")

        def f(v: float | None, digits: int = 4) -> str:
            return "—" if v is None else f"{v:.{digits}f}"

        for s in self.sites:
            style = {"fitted": "green", "low-r2": "yellow", "cannot-help": "red", "exact": "cyan", "kept-previous": "magenta"}.get(s.status, "yellow")
            t.add_row(s.site, s.norm, f(s.r2_before), f(s.r2_after), f(s.rel_before), f(s.rel_after),
                      f"[{style}]{s.status}[/]" + (f" {s.note}" if s.note else ""))
        lines: list[Any] = [t] + ([Text(self.output_kind, style="dim")] if self.output_kind else []) + [Text(self.summary())]
        lines += [Text(w, style="yellow") for w in self.warnings]
        return Group(*lines)


def _label(key: str) -> str:
    from ..kinds.measures import _LABELS

    return _LABELS.get(key, key)


def _rounded(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _rounded(v) for k, v in d.items()}
    if isinstance(d, float):
        return round(d, 6)
    return d
