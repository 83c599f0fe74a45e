"""What recovery did, and the naive → calibrated → recovered report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


from ...defaults import DEFAULT_LR, DEFAULT_TEMPERATURE
from ..calibrate import CalibrationReport


# ---------------------------------------------------------------------------------------------------
# report


@dataclass
class RecoveryReport:
    """What :func:`recover` did."""

    steps: int
    start_step: int = 0
    end_step: int = 0
    stopped_early: bool = False
    resumed: bool = False
    seed: int = 0
    lr: float = DEFAULT_LR
    temperature: float = DEFAULT_TEMPERATURE
    feature_weight: float = 0.0
    schedule: str = "cosine"
    augment: bool = True
    mixup: bool = True  # augment mixed pairs of inputs (the output kind decides: Kind.mixup)
    noise: float = 0.0
    world_size: int = 1
    batch_size: int | None = None  # None: the data's own batches
    seconds: float = 0.0
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) on rank 0
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, top-1 agreement)
    agreement_before: dict[str, float | None] = field(default_factory=dict)
    agreement_after: dict[str, float | None] = field(default_factory=dict)
    heldout_evals: list[tuple[int, float]] = field(default_factory=list)  # (step, the kind's quality on held-out data)
    output_kind: str | None = None  # the outputs' kind and how it was chosen
    measure: str = "top-1 agreement"  # what the evals measure (the kind's primary measure)
    best_step: int | None = None  # with keep_best: the step whose weights were kept
    heldout_samples: int | None = None  # the held-out evaluations' sample count
    heldout_start: dict[str, float | None] = field(default_factory=dict)  # held-out measures at the start
    keep_decision: dict[str, Any] | None = None  # keep-best: best vs last evaluation, paired held-out loss
    heldout_change: dict[str, Any] | None = None  # the kept weights vs the start, paired held-out loss
    checkpoint: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        r = lambda v: None if v is None else round(float(v), 6)
        return {
            "steps": self.steps, "start_step": self.start_step, "end_step": self.end_step,
            "stopped_early": self.stopped_early, "resumed": self.resumed, "seed": self.seed, "lr": self.lr,
            "temperature": self.temperature, "feature_weight": self.feature_weight,
            "schedule": self.schedule, "augment": self.augment, "mixup": self.mixup, "noise": self.noise, "batch_size": self.batch_size, "world_size": self.world_size, "seconds": round(self.seconds, 3),
            "agreement_before": {k: r(v) for k, v in self.agreement_before.items()},
            "agreement_after": {k: r(v) for k, v in self.agreement_after.items()},
            "heldout_evals": [[st, r(a)] for st, a in self.heldout_evals], "best_step": self.best_step,
            "heldout_samples": self.heldout_samples, "keep_decision": self.keep_decision, "heldout_change": self.heldout_change,
            "loss": [[s, r(v)] for s, v in self.history],
            "evals": [[s, r(v)] for s, v in self.evals],
            "checkpoint": self.checkpoint, "notes": list(self.notes), "output_kind": self.output_kind, "measure": self.measure,
        }

    def summary(self) -> str:
        key = next((k for k in self.agreement_after if k != "rel_err"), "top1_agreement")
        a0 = self.agreement_before.get(key)
        a1 = self.agreement_after.get(key)
        ran = self.end_step - self.start_step
        s = f"recovery: {ran} step(s)"
        if self.resumed:
            s += f" (resumed at step {self.start_step})"
        s += f" in {self.seconds:.1f}s"
        if len(self.heldout_evals) >= 2:
            kept = dict(self.heldout_evals).get(self.best_step, self.heldout_evals[-1][1]) if self.best_step is not None else self.heldout_evals[-1][1]
            n = f", n = {self.heldout_samples}" if self.heldout_samples else ""
            s += f"; held-out {self.measure} {self.heldout_evals[0][1]:.4f} → {kept:.4f}{n}"
            if self.best_step is not None and self.best_step != self.end_step:
                s += f" (kept step {self.best_step})"
            if self.heldout_change is not None:
                c = self.heldout_change
                s += f"; held-out loss {c['mean_diff']:+.3g} ± {c['se']:.2g} ({c['verdict']})"
        elif a0 is not None and a1 is not None:
            s += f"; {self.measure} on the calibration data (not held out) {a0:.4f} → {a1:.4f}"
        if self.stopped_early:
            s += f"; stopped early at step {self.end_step} (target reached)"
        if self.history:
            s += f"; final loss {self.history[-1][1]:.4g}"
        return s

    def __rich__(self) -> Any:
        from rich.text import Text

        return Text(self.summary())



# ---------------------------------------------------------------------------------------------------
# the pipeline: naive → calibrated → recovered


def _rounded(iv: tuple[float, float] | None) -> list[float] | None:
    return None if iv is None else [round(iv[0], 6), round(iv[1], 6)]


@dataclass
class StageMetrics:
    stage: str  # naive | calibrated | recovered
    agreement: dict[str, float | None]
    accuracy: float | None = None
    drift: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage,
                "agreement": {k: None if v is None else round(float(v), 6) for k, v in self.agreement.items()},
                "samples": getattr(self.agreement, "n", None),
                "intervals": self.agreement.intervals() if hasattr(self.agreement, "intervals") else {},
                "accuracy": None if self.accuracy is None else round(self.accuracy, 6),
                "drift": {k: round(v, 6) for k, v in self.drift.items()}}


@dataclass
class FunctionReport:
    """Agreement with the original (and accuracy, given labels) after each stage, per-layer drift,
    and the calibration and recovery reports. ``evaluated_on`` names the data the metrics use."""

    target: str
    evaluated_on: str
    original_accuracy: float | None
    stages: list[StageMetrics]
    calibration: CalibrationReport | None = None
    recovery: RecoveryReport | None = None
    plot: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of "calibrate" and "recover"
    output_kind: str | None = None  # the outputs' kind and how it was chosen (normswap.keep.kinds)
    truth_label: str = "accuracy"  # what ``accuracy`` measures against the labels, for this kind
    truth_proportion: bool = False  # ``accuracy`` is a proportion of the held-out samples: it gets a Wilson interval
    heldout: dict[str, Any] | None = None  # how the held-out data was chosen (a split: fraction, seed, samples)

    def stage(self, name: str) -> StageMetrics | None:
        return next((s for s in self.stages if s.stage == name), None)

    @property
    def samples(self) -> int | None:
        """The held-out samples every figure rests on (the labelled ones included)."""
        return getattr(self.stages[0].agreement, "n", None) if self.stages else None

    def accuracy_interval(self, value: float | None) -> tuple[float, float] | None:
        """The 95% Wilson interval of a ground-truth figure over :attr:`samples`, when it is a proportion."""
        from ..kinds import wilson

        return wilson(value, self.samples) if self.truth_proportion else None

    def format_accuracy(self, value: float | None) -> str:
        if value is None:
            return "—"
        iv = self.accuracy_interval(value)
        return f"{value:.4f}" + (f" [{iv[0]:.4f}–{iv[1]:.4f}]" if iv is not None else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "evaluated_on": self.evaluated_on,
            "original_accuracy": None if self.original_accuracy is None else round(self.original_accuracy, 6),
            "stages": [{**s.to_dict(), "accuracy_interval": _rounded(self.accuracy_interval(s.accuracy))} for s in self.stages],
            "original_accuracy_interval": _rounded(self.accuracy_interval(self.original_accuracy)),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "recovery": None if self.recovery is None else self.recovery.to_dict(),
            "drift_plot": self.plot,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "output_kind": self.output_kind, "ground_truth_measure": self.truth_label, "heldout": self.heldout,
        }

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        from ...report import Column, FittedTable

        first = self.stages[0].agreement if self.stages else {}
        labels = first.labels() if hasattr(first, "labels") else {}
        keys = [k for k in first if k != "rel_err"][:2] or ["top1_agreement"]
        rows: list[list[Any]] = []
        for s in self.stages:
            r = s.agreement.get("rel_err")
            d = list(s.drift.values())
            fmt = s.agreement.format if hasattr(s.agreement, "format") else (lambda k: "—" if s.agreement.get(k) is None else f"{s.agreement[k]:.4f}")
            rows.append([s.stage, *(fmt(k) for k in keys), "—" if r is None else f"{r:.4f}",
                         self.format_accuracy(s.accuracy),
                         f"{sum(d) / len(d):.4f}" if d else "—", f"{max(d):.4f}" if d else "—"])
        no_acc = all(s.accuracy is None for s in self.stages)
        cols = [Column("stage"), *(Column(labels.get(k, k).replace(" ", "\n", 1), justify="right", drop=0 if i == 0 else 4)
                                   for i, k in enumerate(keys)),
                Column("output\nrel err", justify="right"),
                Column(self.truth_label, justify="right", drop=3 if no_acc else 1, why="no labels" if no_acc else ""),
                Column("layer drift\nmean", justify="right", drop=2), Column("layer drift\nmax", justify="right")]
        n = getattr(first, "n", None)
        title = (f"keeping the trained function: --to {self.target} (held-out: {self.evaluated_on}"
                 f"{f', n = {n}' if n else ''}; [95% Wilson interval])")
        parts: list[Any] = [FittedTable(cols, rows, title=title)]
        if self.output_kind:
            parts.append(Text(self.output_kind, style="dim"))
        if self.original_accuracy is not None:
            parts.append(Text(f"original {self.truth_label} {self.format_accuracy(self.original_accuracy)}"))
        if self.calibration is not None:
            parts.append(Text(self.calibration.summary()))
            parts += [Text(w, style="yellow") for w in self.calibration.warnings]
        if self.recovery is not None:
            parts.append(Text(self.recovery.summary()))
            parts += [Text(n, style="yellow") for n in self.recovery.notes]
        if self.plot:
            parts.append(Text(f"per-layer drift plot: {self.plot}"))
        return Group(*parts)
