"""The calibration pass (see the package docstring)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ...load.data import as_batches, local_batch
from ...errors import InputError, NormswapError
from ...norms.ws import standardized_once
from ...parity import eval_mode
from ..kinds import Meter, Outputs, outputs_for
from .advice import AdviceTap
from .never_worse import _Heldout, _state, never_worse
from .readout import READOUT_MIN_REL, _Readout, _ReadoutProbe
from .report import LOW_R2, MIN_R2_GAIN, CalibrationReport, SiteCalibration
from .solvers import SN_BATCHES, SN_LR, SN_STEPS, _BinFit, _Fit, _fit_quality, _Scratch, _SNFit, _why_lossy
from .dist import _all_reduce, _dist_group
from .taps import _TeacherTap, _inner, _kind, _leaves, _model_device, _to, swapped_sites

def calibrate(
    original: nn.Module,
    conversion_or_model: Any,
    batches: Any,
    *,
    sites: Iterable[str] | None = None,
    dist: Any = None,
    passes: int = 1,
    readout: bool | None = None,
    shard_batches: bool = True,
    sn_steps: int = SN_STEPS,
    sn_lr: float = SN_LR,
    sn_batches: int = SN_BATCHES,
    on_batch: Any = None,
    output_kind: Any = None,
    heldout: Any = None,
    heldout_name: str | None = None,
    check: bool = True,
    readout_ridge: float | None = None,
    heldout_record: Any = None,
) -> CalibrationReport:
    """Fit the swapped norms' γ, β (Switchable Norm: also its mixture; Batch-Instance Norm: also ρ) so
    each site's output matches the original BatchNorm's on ``batches`` (see the module docstring).

    ``conversion_or_model``: a :class:`~normswap.Conversion` (its ``.model`` is calibrated *in place*)
    or the swapped ``nn.Module`` itself. ``original`` is not modified (it runs as the teacher with temporary hooks; its flags are restored).
    ``batches``: :func:`normswap.load.data.calibration_batches` output, a tensor, or an iterable of
    tensors / tuples of input tensors (re-iterable when ``passes`` > 1). ``sites``: calibrate only
    these site names. ``readout``: refit the final Linear to the original's outputs (None = when the
    outputs still differ, rel err > READOUT_MIN_REL, and ``sites`` is not given). ``dist``: None (use
    torch.distributed when initialized with > 1 process), False (never), or a process group.
    ``on_batch``: called with no argument after each calibration batch (progress).
    ``output_kind``: the outputs' kind (a name of :data:`normswap.keep.kinds.KIND_NAMES` or
    :class:`~normswap.keep.kinds.Outputs`; default: detected from the original's outputs on the first batch).
    ``heldout``: data the fit never sees (batches, or a tensor). With it, the report's agreement is
    measured on it before and after, and (``check``) calibration never makes the held-out loss worse:
    the readout refit, then the sites whose held-out error the fit raised beyond noise (together),
    keep their previous parameters when that lowers the kind's loss on ``heldout`` (status
    ``kept-previous``), and if the result is still worse than the naive swap everything is put back
    (:mod:`normswap.keep.calibrate.never_worse`: two or three passes over ``heldout``). ``readout_ridge``: the readout's ridge
    strength (default :data:`READOUT_RIDGE`). ``heldout_record``: a
    :class:`~normswap.keep.calibrate.never_worse.HeldoutRecord` of one pass of ``original`` and the still
    naive swap over ``heldout`` (what :func:`~normswap.keep.recover.keep_function`'s naive measure leaves):
    the checks then take the original's outputs and the naive swap's loss from it instead of running them
    again (its batches are the held-out data; ignored under torch.distributed).
    """
    from ...rewriting.convert import Conversion

    if passes < 1:
        raise InputError(f"passes must be at least 1, got {passes}")
    conv = conversion_or_model if isinstance(conversion_or_model, Conversion) else None
    student = conv.model if conv is not None else conversion_or_model
    if not isinstance(student, nn.Module) or not isinstance(original, nn.Module):
        raise InputError("calibrate(original, conversion_or_model, batches): give the original nn.Module and a Conversion or nn.Module")
    if readout is None:
        readout_mode = "auto" if sites is None else "off"
    else:
        readout_mode = "on" if readout else "off"
    names = swapped_sites(original, student, conv, sites)
    active, group, rank, world = _dist_group(dist)
    data = as_batches(batches)

    if student is original:
        raise InputError("calibrate needs the original model and a swapped copy, not the same module twice")
    t_start = time.perf_counter()
    teacher = original  # forward hooks only, removed after; its training flags are restored
    smods = dict(student.named_modules())
    report_sites: list[SiteCalibration] = []
    fits: dict[str, _Fit] = {}
    for n in names:
        if n not in smods:
            raise InputError(f"site {n} is not a module of the swapped model")
        norm = _inner(smods[n])
        kind = _kind(norm)
        rs = SiteCalibration(site=n, norm=type(norm).__name__, kind=kind)
        if kind == "exact":
            rs.status, rs.note = "exact", "the swap keeps the eval function: nothing to fit"
        elif kind == "unsupported":
            rs.status, rs.note = "unsupported", f"{type(norm).__name__} has no per-channel weight and bias to fit"
        else:
            cls = {"affine": _Fit, "bin": _BinFit, "sn": _SNFit}[kind]
            kw = {"steps": sn_steps, "lr": sn_lr, "batches": sn_batches} if kind == "sn" else {}
            fits[n] = cls(n, norm, kind, active, group, **kw)
            rs.channels = fits[n].c
        report_sites.append(rs)

    smod_of = {n: _inner(smods[n]) for n in fits}
    naive_state = {n: _state(m) for n, m in smod_of.items()}
    device = _model_device(student)
    held: _Heldout | None = None
    if heldout is not None:  # kept on the device; the original runs on it once, in the first check pass
        held = _Heldout(student, heldout, active, group, rank, world, shard_batches, device, heldout_record)
    # GroupNorm sites keep a few samples' (x, y) for the advice, should their fit fail
    advice = AdviceTap(smod_of) if any(isinstance(m, nn.GroupNorm) for m in smod_of.values()) else None

    scratch = _Scratch()
    for f in fits.values():
        f.scratch = scratch
    tap = _TeacherTap(teacher, list(fits), stats=True, scratch=scratch, reuse=True)
    order: list[str] = []

    def student_hook(name: str, fit: _Fit):
        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
            if fit.busy:
                return None
            y = tap.pop(name)
            if y is None:
                raise NormswapError(
                    f"site {name} ran more often in the swapped model than in the original; calibration needs "
                    "the same call sequence (data-dependent control flow?)"
                )
            y_stats = tap.stats[name].popleft() if tap.stats is not None else None
            x = args[0]
            if out.shape != y.shape:
                raise NormswapError(f"site {name}: the new norm's output {list(out.shape)} and the original's {list(y.shape)} differ")
            if fit.calls == 0:
                order.append(name)
            fit.calls += 1
            if advice is not None and advice.wants(name):
                advice.add(name, x, y)
            fit.before_batch(x, y)
            fs = fit.feats(x, out)
            fit.add(fs, y, y_stats)
            fit.solve()
            return fit.output(fs, x)
        return hook

    samples = nbatches = 0
    teacher_seconds = 0.0
    outputs = output_kind if isinstance(output_kind, Outputs) else None  # known up front, else from the first batch
    agree = Meter(outputs if outputs is not None else output_kind, teacher)
    head: _Readout | None = None
    # the readout: when asked for (readout=True), or by default when some site was fitted
    probe: _ReadoutProbe | None = _ReadoutProbe(student) if readout_mode == "on" or (readout_mode == "auto" and fits) else None
    readout_why: str | None = None
    handles = []
    entered: list[_Fit] = []
    try:
        for f in fits.values():
            f.enter()
            entered.append(f)
        handles = [_inner(smods[n]).register_forward_hook(student_hook(n, f)) for n, f in fits.items()]
        with eval_mode(teacher, student), standardized_once(student), torch.no_grad():
            for p in range(passes):
                if p > 0:
                    for f in fits.values():
                        f.reset_sums()
                    if head is not None:
                        head.S.zero_()
                agree = Meter(outputs if outputs is not None else output_kind, teacher)
                samples = nbatches = 0
                for batch in data:
                    if active and shard_batches:
                        batch = local_batch(batch, rank, world)
                        if batch is None:
                            continue
                    batch = _to(batch, device)
                    t0, hooks0 = time.perf_counter(), tap.seconds
                    ref = teacher(*batch)
                    teacher_seconds += time.perf_counter() - t0 - (tap.seconds - hooks0)
                    out = student(*batch)
                    if outputs is None:
                        outputs = outputs_for(ref, output_kind, teacher)
                        agree = Meter(outputs)
                    agree.add(ref, out)
                    if on_batch is not None:
                        on_batch()
                    if probe is not None:
                        name, feats, link = probe.find(out)
                        readout_why = probe.why
                        probe.remove()
                        probe = None
                        lin = smods.get(name) if name is not None else None
                        if lin is not None:
                            head = _Readout(name, lin, active, group, link, readout_ridge)
                            head_h = lin.register_forward_hook(lambda m, a, o, h=head: setattr(h, "_last", a[0]))
                            handles.append(head_h)
                            head._last = feats  # type: ignore[attr-defined]
                    if head is not None:
                        head.add(head._last, _leaves(ref)[0])  # type: ignore[attr-defined]
                        head._last = None  # type: ignore[attr-defined]
                    tap.clear()
                    samples += int(batch[0].shape[0])
                    nbatches += 1
                if nbatches == 0:
                    if p > 0:
                        raise InputError(f"passes={passes} needs re-iterable calibration data (a list or calibration_batches(...)); "
                                         "the iterator was used up by the first pass")
                    raise InputError("calibration data yielded no batches; give at least one sample")
            agree.reduce(active, group, device)
            if active:
                t = _all_reduce(torch.tensor([float(samples)], dtype=torch.float64, device=device), active, group)
                samples = int(t.item())
    finally:
        if probe is not None:
            probe.remove()
        for h in handles:
            h.remove()
        tap.remove()
        for f in entered:
            f.exit()

    t_fit = time.perf_counter()
    readout_info: dict[str, Any] | None = None
    if head is not None:
        rel_now = agree.result()["rel_err"] or 0.0
        do = readout_mode == "on" or (readout_mode == "auto" and rel_now > READOUT_MIN_REL)
        if do:
            head.solve()
            head.write()
        q = head.quality()
        readout_info = {"module": head.name, "link": head.link.name, "refit": do, "ridge": head.ridge,
                        "rel_before": round(q["rel_before"], 6), "rel_after": round(q["rel_after"], 6)}
        if not do:
            readout_info["note"] = f"no readout refit: the outputs already match (rel err {rel_now:.1e} ≤ {READOUT_MIN_REL})"
    elif not fits:
        readout_info = {"refit": False, "note": "no readout refit: no swapped site to calibrate, the outputs are unchanged"}
    elif readout_mode == "off":
        readout_info = {"refit": False, "note": "no readout refit: turned off (readout=False)" if readout is False
                        else "no readout refit: only the given sites are calibrated"}
    else:
        readout_info = {"refit": False, "note": readout_why or "no readout refit: no readout found"}

    warnings: list[str] = []
    qualities = _fit_quality(list(fits.values()))
    for rs in report_sites:
        f = fits.get(rs.site)
        if f is None:
            continue
        rs.calls = f.calls
        if f.calls == 0:
            rs.status, rs.note = "not-run", "the site never ran on the calibration data"
            continue
        q = qualities[rs.site]
        rs.r2_before, rs.r2_after, rs.rel_before, rs.rel_after = q["r2_before"], q["r2_after"], q["rel_before"], q["rel_after"]
        rs.extra = f.describe()
        if rs.r2_after is not None and rs.r2_after < LOW_R2:
            gain = rs.r2_after - (rs.r2_before if rs.r2_before is not None else rs.r2_after)
            if gain < MIN_R2_GAIN:
                rs.status = "cannot-help"
                rs.note = (f"R² {rs.r2_after:.2f}, and the naive γ/β already had {rs.r2_before:.2f}: no per-channel "
                           f"scale/shift restores what {rs.norm} removes here")
            else:
                rs.status = "low-r2"
                rs.note = f"calibration raised R² {rs.r2_before:.2f} → {rs.r2_after:.2f}, still below {LOW_R2}"
            why = _why_lossy(rs.norm, conv)
            if why:
                rs.note += f" ({why})"

    t_readout = time.perf_counter()

    # -- calibration never makes the held-out loss worse (normswap.keep.calibrate.never_worse)
    heldout_info: dict[str, Any] | None = None
    if held is not None:
        held.set_outputs(outputs)
        heldout_info = never_worse(held, teacher, fits, {n: m for n, m in smod_of.items() if fits[n].calls}, naive_state,
                                   head, readout_info, report_sites, check and bool(fits))
        heldout_info["data"] = heldout_name or "held-out data"
        heldout_info["seconds"] = round(time.perf_counter() - t_readout, 4)
        kept = [s for s in report_sites if s.status == "kept-previous"]
        if kept:
            warnings.append(f"{len(kept)} site(s) kept their previous parameters: the fitted ones raised the held-out "
                            f"{held.loss_name} ({', '.join(s.site for s in kept[:4])}{', ...' if len(kept) > 4 else ''})")
    t_check = time.perf_counter()
    warnings += advice.advise(report_sites) if advice is not None else []

    def names(sites: list[SiteCalibration]) -> str:
        return ", ".join(s.site for s in sites[:4]) + (", ..." if len(sites) > 4 else "")

    stuck = [s for s in report_sites if s.status == "cannot-help"]
    partial = [s for s in report_sites if s.status == "low-r2"]
    if stuck:
        why = _why_lossy(stuck[0].norm, conv)
        warnings.append(f"calibration cannot help at {len(stuck)} site(s) ({names(stuck)}): R² stays below {LOW_R2} and "
                        f"barely moves{f' — {why}' if why else ''}; recover by training (normswap recover)")
    if partial:
        warnings.append(f"{len(partial)} site(s) ({names(partial)}) stay below R² {LOW_R2} after calibration; "
                        "a short recovery (normswap recover) usually closes the gap")
    rank_of = {n: i for i, n in enumerate(order)}
    report_sites.sort(key=lambda s: rank_of.get(s.site, len(order)))
    t_end = time.perf_counter()
    parts = {"fit pass": t_fit - t_start, "readout": t_readout - t_fit, "held-out checks": t_check - t_readout,
             "advice": t_end - t_check}
    return CalibrationReport(
        sites=report_sites, samples=samples, batches=nbatches, passes=passes, seconds=t_end - t_start, parts=parts,
        teacher_seconds=teacher_seconds, world_size=world, agreement=dict(agree.result()), readout=readout_info,
        warnings=warnings, output_kind=None if outputs is None else outputs.describe(), heldout=heldout_info,
    )
