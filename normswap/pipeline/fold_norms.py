"""``--to fold --calib``: which per-sample norms become fixed affines, fitted, measured, recovered.

The stage before the fold pass (which then folds every fitted affine exactly, like an eval BatchNorm):

1. **fit** every per-sample norm site (:func:`normswap.keep.norm_fit.fit_norm_affines`) on the calibration part;
2. **cost**: per site, the held-out quality drop (the output kind's primary measure against the original)
   of the original with *only that site* replaced by its open-loop affine;
3. **front**: sites replaced cumulatively, cheapest first, each prefix fitted closed loop (step 5) with
   only its sites replaced: the held-out quality after each — the compute/quality front to choose from;
4. **choose** (``--fold-norms``): ``all``; a comma-separated list of site names; or ``auto``: the longest
   cheapest-first prefix whose measured drop stays within ``--max-drop`` (default
   :data:`DEFAULT_MAX_DROP`), and when that stops short of every site, every site folded *with* step 5's
   refits, measured, taken instead when it stays within ``--max-drop``; every other site is kept and says why;
5. **calibrate**: the chosen sites fitted closed loop (each on the student's own inputs, earlier chosen
   sites already affine; for a cheapest-first prefix, the front's own fit); then each chosen site's
   producer refit by least squares (:mod:`normswap.keep.producer_fit`), then the model's readout refit in
   closed form to the original's outputs (:mod:`normswap.keep.norm_readout`), each kept only when it
   lowers the held-out loss and does not lower the kind's primary measure: the model the fold receives.
   (The front and the costs are measured with the affines alone; only the all-sites point is also
   measured refit, so ``auto``'s choice of a shorter prefix errs on the side of keeping a site.)
6. **recover** (``--recover-steps``): label-free distillation of that model onto the original, before the fold.

With ``latency=True`` (``--front-latency``) every front point is also folded, exported and timed
(:mod:`normswap.pipeline.fold_front`): its latency ×the original, and per site the latency it saves.

Held-out quality is measured after the open-loop replacement ("naive"), the calibration and the recovery.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from normswap.errors import InputError

__all__ = ["DEFAULT_MAX_DROP", "FOLD_NORMS_MODES", "SiteChoice", "FrontPoint", "FoldNormsReport", "parse_fold_norms",
           "fit_and_choose"]

#: ``auto`` folds sites while the held-out quality drop (top-1 agreement for a classifier) stays within
#: one point: the bar of MLPerf Inference's closed division (99% of the reference's quality) and the
#: issue's own (≥ 0.99 agreement calibrated). At 0.005 (half a point, 2 samples in 450, within the
#: noise of such a held-out set) auto kept 2 of digits_gn's 9 GroupNorms that folded at 0.9933.
DEFAULT_MAX_DROP = 0.01
FOLD_NORMS_MODES = ("auto", "all")


def parse_fold_norms(value: str | Sequence[str] | None) -> str | list[str]:
    """``auto`` (default), ``all``, or the list of site names a comma-separated value names."""
    if value is None:
        return "auto"
    if isinstance(value, str):
        v = value.strip()
        if v in FOLD_NORMS_MODES:
            return v
        names = [p.strip() for p in v.split(",") if p.strip()]
    else:
        names = [str(p) for p in value]
    if not names:
        raise InputError("--fold-norms is empty; pass auto, all, or site names separated by commas")
    return names


def check_max_drop(max_drop: float) -> None:
    if not (isinstance(max_drop, (int, float)) and 0.0 <= max_drop <= 1.0):
        raise InputError(f"--max-drop must be in [0, 1] (a drop of the kind's quality, e.g. 0.01), got {max_drop!r}")


@dataclass
class SiteChoice:
    """What happens at one per-sample norm site, and the numbers behind it."""

    fit: Any  # SiteFit
    folded: bool
    reason: str | None = None  # why it is kept
    cost: float | None = None  # held-out quality drop with only this site replaced (open loop)

    def to_dict(self) -> dict[str, Any]:
        return {**self.fit.to_dict(), "folded": self.folded, "reason": self.reason, "cost": self.cost}


@dataclass
class _Calibrated:
    """Step 5's model and what each refit did (:func:`fit_and_choose`)."""

    model: Any
    refit: Any = None
    refit_measures: dict[str, Any] | None = None
    refit_kept: bool = False
    readout: Any = None
    agreement: Any = None  # its held-out measures, when already taken (auto's second look)

    def refits(self) -> dict[str, Any]:
        """Which refits the model carries: producers refit and kept, the readout's refit kept."""
        return {"producers_refit": len(self.refit.producers) if self.refit is not None and self.refit_kept else 0,
                "readout_refit": bool(self.readout is not None and self.readout.kept)}


@dataclass
class FrontPoint:
    """The first ``len(folded)`` sites (cheapest first) replaced: the held-out quality."""

    folded: list[str]
    quality: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"folded": list(self.folded), "quality": self.quality}


@dataclass
class FoldNormsReport:
    """The per-sample norms' fits, the choice, the front and the quality after each stage; ``model`` is
    the affine-replaced model the fold pass receives. Truthy when at least one site is folded."""

    model: Any
    fits: Any
    choices: list[SiteChoice]
    front: list[FrontPoint]
    stages: list[Any] = field(default_factory=list)  # StageMetrics: naive, calibrated, recovered
    evaluated_on: str = ""
    heldout_samples: int | None = None
    output_kind: str = ""
    measure: str = ""
    mode: Any = "auto"
    max_drop: float = DEFAULT_MAX_DROP
    base: float | None = None  # the original's quality against itself (1 for agreement)
    recovery: Any = None
    readout: Any = None  # normswap.keep.norm_readout.ReadoutRefit of the calibrated model
    refit: Any = None  # RefitReport: the producers' least-squares refit after the affine fits
    refit_measures: dict[str, Any] | None = None  # held-out measure and mean loss, affines alone / refit
    refit_kept: bool = False
    #: auto, when the affines alone stopped short of every site: all of them folded and refit, measured
    #: (sites, affines_alone: the prefix length, quality, drop, accepted: folded all, and which refits that
    #: model kept: producers_refit, readout_refit)
    auto_all: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    latency: Any = None  # FrontLatency (normswap.pipeline.fold_front), with latency=True

    def chosen_point(self) -> int | None:
        """The front point (k) the chosen sites are — 0 when none is — or None when they are not a cheapest-first prefix."""
        chosen = set(self.folded)
        if not chosen:
            return 0
        k = len(chosen)
        return k if k <= len(self.front) and set(self.front[k - 1].folded) == chosen else None

    def __bool__(self) -> bool:
        return self.changes_function

    @property
    def changes_function(self) -> bool:
        return any(c.folded for c in self.choices)

    @property
    def folded(self) -> list[str]:
        return [c.fit.name for c in self.choices if c.folded]

    @property
    def kept(self) -> list[str]:
        return [c.fit.name for c in self.choices if not c.folded]

    def annotate(self, conversion: Any) -> None:
        """Give each kept site's action its reason; refuse (RewriteError) a fold that folded nothing."""
        from normswap.errors import RewriteError

        why = {c.fit.name: c.reason for c in self.choices if not c.folded}
        for a in conversion.actions:
            if a.site in why:
                a.action, a.reason = "kept", f"kept as {a.type}: {why[a.site]}"
        if not any(a.rewritten for a in conversion.actions):
            raise RewriteError(self.nothing_folded())

    def nothing_folded(self) -> str:
        """The one line that refuses a fold that folded nothing: the cheapest site's measured cost against
        the bar, and what would fold it (``--recover-steps`` runs after the choice, so it is no way out
        for ``auto``; it can win back part of the drop of sites named with ``--fold-norms``)."""
        head = (f"--to fold --calib kept all {len(self.choices)} per-sample norm site(s) and the model has no BatchNorm: "
                "nothing was folded")
        if self.mode != "auto" or not self.front:
            return f"{head}; name the sites to fold with --fold-norms (or all)"
        first = self.front[0]
        drop = None if first.quality is None or self.base is None else self.base - first.quality
        cheapest = first.folded[0]
        cost = "unmeasured" if drop is None else f"{drop:.4f}"
        return (f"{head}: the cheapest site, {cheapest}, alone costs {cost} in held-out {self.measure} > --max-drop "
                f"{self.max_drop:g}; to fold it anyway pass --max-drop "
                + (f"{math.ceil(drop * 1e4) / 1e4:.4f}" if drop is not None else "1")
                + f" or --fold-norms {cheapest} (--recover-steps can win part of the drop back)")

    def auto_all_line(self) -> str:
        """What auto's second look (every site folded, with the refits) measured and decided."""
        a = self.auto_all or {}
        drop = "unmeasured" if a.get("drop") is None else f"{a['drop']:.4f}"
        refits = _refits_text(a)
        head = (f"auto: the affines alone stay within --max-drop {self.max_drop:g} for {a.get('affines_alone')} of "
                f"{a.get('sites')} site(s); all {a.get('sites')} folded ({refits}) cost "
                f"{drop} in held-out {self.measure}")
        return head + (": all folded" if a.get("accepted") else f" > --max-drop {self.max_drop:g}: the prefix is kept")

    def _n(self) -> str:
        return f"{self.heldout_samples} samples" if self.heldout_samples is not None else "the held-out data"

    def _on(self) -> str:
        """The held-out data and its count, the count once (the 20% split's name already gives it)."""
        n = self._n()
        return self.evaluated_on if self.evaluated_on.endswith(f"{n})") else f"{self.evaluated_on}, {n}"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode if isinstance(self.mode, str) else list(self.mode), "max_drop": self.max_drop,
                "measure": self.measure, "output_kind": self.output_kind, "evaluated_on": self.evaluated_on,
                "heldout_samples": self.heldout_samples, "calibration": self.fits.to_dict(),
                "sites": [c.to_dict() for c in self.choices], "front": [p.to_dict() for p in self.front],
                "stages": [s.to_dict() for s in self.stages],
                "readout": None if self.readout is None else self.readout.to_dict(),
                "recovery": None if self.recovery is None else self.recovery.to_dict(),
                "refit": None if self.refit is None else {**self.refit.to_dict(), "kept": self.refit_kept,
                                                          "heldout": self.refit_measures},
                "auto_all": self.auto_all,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, **self._latency_dict()}

    def _latency_dict(self) -> dict[str, Any]:
        lat = self.latency
        if lat is None:
            return {}
        order = self.front[-1].folded if self.front else []
        r = lambda v: None if v is None else round(v, 5)
        return {"latency": lat.to_dict(), "chosen_point": self.chosen_point(),
                "latency_saved_ms": {n: r(lat.saved_ms(k)) for k, n in enumerate(order, start=1)},
                "front_latency": [{"k": k, "folded": list(p.folded), "quality": p.quality, "latency_ms": r(ms),
                                   "latency_vs_original": r(lat.ratio(ms))}
                                  for k, (p, ms) in enumerate(zip(self.front, lat.points_ms), start=1)]}

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        from normswap.report import Column, FittedTable

        f = lambda v, p=3: "" if v is None or v != v else f"{v:.{p}f}"
        saved = self._latency_dict().get("latency_saved_ms")
        # R² in student: the closed-loop fit in the model that is folded; a kept site is not in it (its closed-loop
        # fit was made with every site replaced, a model no one gets), so it shows none
        rows = [[c.fit.name, c.fit.source, f(c.fit.spread_sigma), f(c.fit.spread_mu), f(c.fit.r2),
                 f(c.fit.r2_student) if c.folded else "",
                 f(c.cost, 4)] + ([] if saved is None else [f(saved.get(c.fit.name))]) +
                [Text("folded" if c.folded else "kept", style="cyan" if c.folded else "yellow"), c.reason or ""]
                for c in self.choices]
        cols = [Column("site"), Column("type", drop=2), Column("σ spread", "right", drop=1), Column("μ spread", "right", drop=1),
                Column("R² alone", "right"), Column("R² in student", "right", drop=3), Column("cost", "right")] + (
                [] if saved is None else [Column("saved ms", "right")]) + [Column("action"), Column("why kept", fold=True)]
        title = (f"per-sample norms as fitted affines (fit on {self.fits.samples} calibration samples; cost = "
                 f"{self.measure} drop on {self._n()} with only that site replaced"
                 + ("; saved ms = the onnxruntime latency its fold saves along the front)" if saved is not None else ")"))
        parts: list[Any] = [FittedTable(cols, rows, title=title)]
        if self.front:
            from .fold_front import front_table

            parts.append(front_table(self))
        if self.auto_all is not None:
            parts.append(Text(self.auto_all_line(), style=None if self.auto_all["accepted"] else "yellow"))
        if self.refit is not None and self.refit_measures is not None:
            r, m = self.refit, self.refit_measures
            verdict = ("kept" if self.refit_kept else
                       "reverted, it did not lower the held-out loss" if not m["loss_after"] < m["loss_before"] else
                       f"reverted, it lowered the held-out {self.measure}")
            line = (f"{len(r.producers)} producer(s) refit by least squares to the norms' outputs ({r.samples} calibration "
                    f"samples): held-out loss {m['loss_before']:.4g} → {m['loss_after']:.4g}, {self.measure} "
                    f"{f(m['before'], 4)} → {f(m['after'], 4)}: {verdict}")
            if r.skipped:
                site, why = next(iter(r.skipped.items()))
                line += f"; {len(r.skipped)} site(s) keep the affine alone ({site}: {why})"
            parts.append(Text(line))
        if self.readout is not None:
            parts.append(Text(self.readout.line()))
        if self.stages:
            parts.append(Text(" → ".join(f"{s.stage} {f(s.agreement.quality if hasattr(s.agreement, 'quality') else None, 4)}"
                                         for s in self.stages) + f" ({self.measure} on {self._on()})"))
        return Group(*parts)


def _refits_text(a: dict[str, Any]) -> str:
    """Which refits auto's all-sites model kept, as the report says it (``auto_all``'s counts)."""
    p = a.get("producers_refit") or 0
    return ((f"{p} producer(s) refit" if p else "no producer refit kept")
            + (", the readout refit" if a.get("readout_refit") else ", no readout refit kept"))


def _count(data: Any) -> int | None:
    from normswap.load.data import as_batches

    try:
        return sum(int(b[0].shape[0]) for b in as_batches(data))
    except Exception:  # an unsized one-shot source: the count is not known
        return None


def fit_and_choose(original: Any, calib: Any, *, heldout: Any = None, heldout_name: str | None = None,
                   output_kind: Any = None, fold_norms: Any = "auto", max_drop: float = DEFAULT_MAX_DROP,
                   recover_steps: int = 0, recover_batch: int | None = None, seed: int = 0, lr: float | None = None,
                   progress: Any = None, latency: bool = False, refit: bool = True) -> FoldNormsReport:
    """Steps 1–6 of the module docstring on ``original`` (never changed); see :class:`FoldNormsReport`.
    ``latency``: also time every front point (:func:`normswap.pipeline.fold_front.measure_front_latency`);
    ``refit``: step 5's least-squares refit of the producers (the readout refit always runs, kept by the same rule)."""
    from normswap.keep.calibrate import agreement
    from normswap.keep.heldout import HELDOUT_FRACTION, HELDOUT_SEED, split_heldout
    from normswap.keep.kinds import detect
    from normswap.keep.norm_fit import affine_model, fit_norm_affines, norm_site_names
    from normswap.keep.norm_readout import improves, refit_readout
    from normswap.keep.recover.keep import _split_eval
    from normswap.keep.recover.report import StageMetrics

    mode = parse_fold_norms(fold_norms)
    check_max_drop(max_drop)
    names = norm_site_names(original)
    if not names:
        raise InputError("--calib with --to fold fits the affines of per-sample norms (GroupNorm, LayerNorm, …); this "
                         "model has none — its BatchNorms fold exactly without data: drop --calib")
    if isinstance(mode, list):
        unknown = [n for n in mode if n not in names]
        if unknown:
            raise InputError(f"--fold-norms {unknown[0]} is not a per-sample norm site; choose from: {', '.join(names[:12])}")
    seconds: dict[str, float] = {}
    if heldout is None:
        split = split_heldout(calib, HELDOUT_FRACTION, HELDOUT_SEED)
        calib, heldout, heldout_name = split.calib, split.heldout, heldout_name or split.describe()
    eval_data, _, _ = _split_eval(heldout)
    outputs = detect(original, eval_data, output_kind, max_batches=1)

    def quality(model: Any) -> float | None:
        return agreement(original, model, eval_data, output_kind=outputs).quality

    t = time.perf_counter()
    fits = fit_norm_affines(original, calib)
    seconds["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    base = quality(original)
    cost = {n: None if base is None or (q := quality(affine_model(original, fits, [n], loop="open"))) is None else base - q
            for n in names}
    order = sorted(names, key=lambda n: (cost[n] is None, cost[n] if cost[n] is not None else 0.0))
    # the front: the first k sites (cheapest first) fitted closed loop with only them replaced — the
    # model that would be folded — one fit pass and one held-out evaluation per k
    prefix_fits: list[Any] = []
    front = []
    for k in range(1, len(order) + 1):
        fk = fits if k == len(order) else fit_norm_affines(original, calib, names=order[:k])
        prefix_fits.append(fk)
        front.append(FrontPoint(order[:k], quality(affine_model(original, fk, order[:k], loop="closed"))))
    seconds["measure"] = time.perf_counter() - t
    reasons: dict[str, str] = {}
    measure = getattr(outputs.kind, "labels", {}).get(outputs.primary, outputs.primary)
    if mode == "all":
        chosen = list(names)
    elif isinstance(mode, list):
        chosen = [n for n in names if n in set(mode)]
        reasons = {n: "not named in --fold-norms" for n in names if n not in set(mode)}
    else:
        within = [i + 1 for i, p in enumerate(front) if p.quality is not None and base is not None
                  and base - p.quality <= max_drop]
        k = max(within, default=0)  # the longest cheapest-first prefix within --max-drop
        chosen = [n for n in names if n in set(order[:k])]
        for i, n in enumerate(order[k:], start=k):
            q = front[i].quality
            drop = "unmeasured" if q is None or base is None else f"{base - q:.4f}"
            reasons[n] = (f"auto: folding it with the {i} cheaper site(s) would cost {drop} in held-out {measure} "
                          f"> --max-drop {max_drop:g}" + (f" (alone: {cost[n]:.4f})" if cost[n] is not None else ""))
    choices = [SiteChoice(fits[n], n in chosen, reasons.get(n), cost[n]) for n in names]
    rep = FoldNormsReport(model=None, fits=fits, choices=choices, front=front, evaluated_on=heldout_name or "held-out data",
                          heldout_samples=_count(eval_data), output_kind=outputs.describe(), measure=measure, mode=mode,
                          max_drop=max_drop, base=base, seconds=seconds)

    def calibrated(fits_for: Any, sites: list[str]) -> _Calibrated:
        """Step 5 on ``sites``: the closed-loop affines, the producers' refit, the readout refit."""
        from normswap.keep.calibrate.metrics import heldout_losses
        from normswap.keep.producer_fit import refit_producers_copy

        c = _Calibrated(affine_model(original, fits_for, sites, loop="closed"))
        if refit:
            # the producers' least-squares refit (normswap.keep.producer_fit), kept as the readout refit is:
            # when it lowers the held-out loss and does not lower the kind's primary measure
            t = time.perf_counter()
            refitted, c.refit = refit_producers_copy(original, c.model, calib, sites)
            if c.refit.producers:
                (mb, lb), (ma, la) = (heldout_losses(original, m_, eval_data, outputs) for m_ in (c.model, refitted))
                c.refit_measures = {"before": mb.quality, "after": ma.quality, "loss_before": float(lb.mean()),
                                    "loss_after": float(la.mean()), "samples": int(lb.numel())}
                c.refit_kept = improves(float(lb.mean()), float(la.mean()), mb.quality, ma.quality)
                if c.refit_kept:
                    c.model = refitted
            seconds["refit"] = seconds.get("refit", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        c.readout = refit_readout(original, c.model, calib, eval_data, outputs)
        seconds["readout"] = seconds.get("readout", 0.0) + time.perf_counter() - t
        return c

    result: _Calibrated | None = None
    if mode == "auto" and refit and len(chosen) < len(names):
        # the front measures the affines alone; the refits after them can win back what an affine cannot
        # divide by (digits_gn: all 9 sites 0.9867 alone, 0.9933 refit), so auto also measures every site
        # folded, refit, and folds them all when that stays within --max-drop
        trial = calibrated(fits, list(names))
        trial.agreement = agreement(original, trial.model, eval_data, output_kind=outputs)  # its "calibrated" stage if taken
        q = trial.agreement.quality
        drop = None if q is None or base is None else base - q
        accepted = drop is not None and drop <= max_drop
        rep.auto_all = {"sites": len(names), "affines_alone": len(chosen), "quality": q, "drop": drop, "accepted": accepted,
                        **trial.refits()}
        if accepted:
            chosen, result = list(names), trial
            rep.choices = choices = [SiteChoice(fits[n], True, None, cost[n]) for n in names]
        else:
            also = "unmeasured" if drop is None else f"{drop:.4f}"
            for c in choices:
                if not c.folded:
                    c.reason += f"; all {len(names)} folded ({_refits_text(rep.auto_all)}) cost {also}"
    if not chosen:
        rep.model = original
        _front_latency(rep, latency, original, prefix_fits, order, eval_data, chosen, None)
        return rep
    t = time.perf_counter()
    if set(chosen) == set(order[:len(chosen)]):  # a cheapest-first prefix: its fit is already made
        fits_for = prefix_fits[len(chosen) - 1]
    else:  # closed loop again, with only the chosen sites replaced upstream
        fits_for = fit_norm_affines(original, calib, names=chosen)
    for c in choices:
        if c.folded:
            c.fit = fits_for[c.fit.name]
    seconds["fit"] += time.perf_counter() - t
    _front_latency(rep, latency, original, prefix_fits, order, eval_data, chosen, fits_for)

    def stage(name: str, model: Any, measured: Any = None) -> None:
        rep.stages.append(StageMetrics(stage=name, agreement=measured if measured is not None
                                       else agreement(original, model, eval_data, output_kind=outputs)))

    stage("naive", affine_model(original, fits_for, chosen, loop="open"))
    if result is None:
        result = calibrated(fits_for, chosen)
    rep.model, rep.refit, rep.refit_measures, rep.refit_kept, rep.readout = (
        result.model, result.refit, result.refit_measures, result.refit_kept, result.readout)
    stage("calibrated", rep.model, result.agreement)
    if recover_steps:
        from normswap.defaults import DEFAULT_LR, DEFAULT_RECOVER_BATCH
        from normswap.keep.recover import recover

        t = time.perf_counter()
        rep.recovery = recover(original, rep.model, calib, steps=recover_steps, lr=DEFAULT_LR if lr is None else lr,
                               seed=seed, progress=progress if progress is not None else False,
                               # the one recovery default (as the swap path and `normswap recover`), not the
                               # calibration batches as given
                               batch_size=DEFAULT_RECOVER_BATCH if recover_batch is None else recover_batch,
                               output_kind=outputs, heldout=eval_data)
        seconds["recover"] = time.perf_counter() - t
        rep.model.eval()
        stage("recovered", rep.model)
    return rep


def _front_latency(rep: FoldNormsReport, latency: bool, original: Any, prefix_fits: list[Any], order: list[str],
                   eval_data: Any, chosen: list[str], chosen_fits: Any) -> None:
    if not latency:
        return
    from normswap.load.data import as_batches

    from .fold_front import measure_front_latency

    t = time.perf_counter()
    x = next(iter(as_batches(eval_data)))[0]
    rep.latency = measure_front_latency(original, prefix_fits, order, x, chosen=chosen, chosen_fits=chosen_fits)
    rep.seconds["latency"] = time.perf_counter() - t
