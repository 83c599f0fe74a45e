"""``run_recovery``: distil the original into a saved conversion, keep the better model, save it back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from normswap.defaults import DEFAULT_CALIB_BATCH, DEFAULT_LR, DEFAULT_RECOVER_BATCH
from normswap.progress import NullProgress

from .stages import load_stage, spec_file
from .verdict import Verdict

__all__ = ["RecoveryResult", "run_recovery"]


@dataclass
class RecoveryResult:
    """A recovery run on a saved conversion: the report, held-out numbers before and after, and
    whether the result was saved (a worse one is not, unless ``keep_last``)."""

    to: str
    recovery: Any
    saved: str | None
    before: float | None  # the measure that decides "better": the output kind's quality (top-1 agreement for a
    after: float | None   # classifier, R² for regression, ...) on held-out data
    measured_on: str
    measure: str = "top-1 agreement"
    output_kind: str | None = None
    heldout: dict[str, Any] | None = None
    checkpoints: str | None = None
    notes: list[str] = field(default_factory=list)
    runtime: dict[str, Any] | None = None  # device, precision, workers, preprocessing

    @property
    def verdict(self) -> Verdict:
        if self.saved is None:
            return Verdict("CONVERTED", f"recovery did not improve held-out {self.measure} on {self.measured_on} ({_f(self.before)} → "
                                        f"{_f(self.after)}): the saved conversion was kept (pass --keep-last to save it anyway)")
        return Verdict("CONVERTED", f"function changed: held-out {self.measure} {_f(self.after)} on {self.measured_on} "
                                    f"(was {_f(self.before)}); saved to {self.saved}")

    def __bool__(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"saved": self.saved, "to": self.to, "recovery": self.recovery.to_dict(), "measured_on": self.measured_on,
                "agreement_before": self.before, "agreement_after": self.after, "measure": self.measure,
                "output_kind": self.output_kind, "heldout": self.heldout,
                "checkpoints": self.checkpoints, "notes": list(self.notes), "verdict": self.verdict.to_dict(),
                "runtime": self.runtime}

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = [self.recovery]
        parts += [Text(f"note: {n}", style="yellow") for n in [*self.recovery.notes, *self.notes]]
        if self.heldout is not None:
            h = self.heldout
            line = f"on {h['data']}: {h['measures']}"
            if h.get("accuracy") is not None:
                line += f", {h['truth']} {h['accuracy']:.4f} (original {h['original_accuracy']:.4f})"
            parts.append(Text(line))
        if self.runtime is not None:
            from .runtime import Runtime

            parts.append(Text(Runtime.line(self.runtime)))
        parts.append(Text(self.verdict.line, style="bold green"))
        return Group(*parts)


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.4f}"


def run_recovery(
    saved_dir: str | Path,
    calib: Any,
    *,
    model: Any = None,
    args: Mapping[str, Any] | None = None,
    weights: Any = None,
    trust_spec: bool = False,
    trust_pickle: bool = False,
    strict: bool = True,
    steps: int = 200,
    calib_samples: int | None = None,
    calib_batch: int = DEFAULT_CALIB_BATCH,
    recover_batch: int | None = None,
    lr: float = DEFAULT_LR,
    temperature: float | None = None,
    feature_weight: float = 0.0,
    seed: int = 0,
    target_agreement: float | None = None,
    augment: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = True,
    keep_last: bool = False,
    out: str | Path | None = None,
    report: str | Path | None = None,
    progress: Any = None,
    write: bool = True,
    output_kind: str | None = None,
    decode: Any = None,
    decode_tol: float | None = None,
    heldout: Any = None,
    device: Any = "auto",
    amp: str | None = None,
    workers: int = 0,
    size: Any = None,
    crop: float | None = None,
    mean: Any = None,
    std: Any = None,
) -> RecoveryResult:
    """Distil the original into a saved (swapped) conversion and save it back — only if top-1
    agreement with the original improved (held-out data when normswap knows it, else the calibration
    data), unless ``keep_last``. The original is ``model`` (a module or spec); without it, the bundled
    model, or the spec the record names only with ``trust_spec`` (a saved directory is data).
    ``heldout`` (``--heldout DATA``): the held-out data; default: the model's known held-out set, else
    20% of the calibration data (seeded split; recovery trains on the rest). ``output_kind``: see
    :mod:`normswap.keep.kinds` (default: detected). ``device``, ``amp``, ``workers``, ``size``, ``crop``, ``mean``,
    ``std``: where recovery runs and how an image folder is read (:mod:`normswap.pipeline.runtime`)."""
    from normswap import validate
    from normswap.keep.calibrate import accuracy, agreement
    from normswap.defaults import DEFAULT_TEMPERATURE
    from normswap.errors import InputError
    from normswap.keep.recover import recover
    from normswap.load.saved import load_conversion, read_record, save_conversion, untrusted_spec_message, uses_bundled_model

    saved_dir = Path(saved_dir)
    progress = progress or NullProgress()
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    validate.options(steps=steps, calib_samples=calib_samples, calib_batch=calib_batch, recover_batch=recover_batch, lr=lr,
                     temperature=temperature, feature_weight=feature_weight, checkpoint_every=checkpoint_every,
                     target_agreement=target_agreement)
    from normswap.keep.heldout import check_options

    check_options(output_kind, heldout, calib, decode, decode_tol)
    validate.runtime_options(device=device, amp=amp, workers=workers, size=size, crop=crop, mean=mean, std=std,
                             calib=calib, recover_steps=steps)
    validate.output_paths(
        {"--report": report, "--out": out, "--checkpoint-dir": checkpoint_dir},
        {"--weights": weights, "--calib": calib if isinstance(calib, (str, Path)) else None, "MODEL": spec_file(model),
         "--heldout": heldout if isinstance(heldout, (str, Path)) else None},
        directories=("--out", "--checkpoint-dir"),
    )
    rec = read_record(saved_dir)  # validated, weights hash checked; runs nothing
    if rec["to"] == "fold":
        raise InputError(f"{saved_dir} holds a 'fold' conversion, which is exact: there is nothing to recover")
    src = rec["source"] or {}
    with progress.stage("load"):
        if model is not None:  # the user's model, with their weights or the recorded weights file
            teacher = load_stage(model, args=args, weights=weights or (src.get("weights") if isinstance(model, str) else None),
                                 trust_pickle=trust_pickle, strict=strict)
        else:
            if args:
                raise InputError("--arg applies to MODEL; give the model too: normswap recover SAVED_DIR MODEL --arg ...")
            if rec["source"] is None:
                raise InputError(f"{saved_dir / 'conversion.json'} does not name its model; pass it: normswap recover {saved_dir} MODEL")
            if not uses_bundled_model(rec) and not trust_spec:
                raise InputError(untrusted_spec_message(saved_dir, rec))
            from normswap.load import load_model

            teacher = load_model(src.get("spec"), args=src.get("args") or {}, weights=weights or src.get("weights"),
                                 trust_pickle=trust_pickle, strict=strict)
        from .image_lists import refuse_image_lists

        refuse_image_lists(teacher.model, "recover")
        if getattr(teacher, "random_init", False):  # a fresh random model is not the one that was converted
            raise InputError(
                f"the original model for {saved_dir} builds random weights on every load, so it is not the model that was "
                "converted; pass --weights FILE (the weights it was converted from) or the spec's pretrained argument")
        conv = load_conversion(saved_dir, model=teacher.model, record=rec)  # rewrites a copy: the teacher stays as it is
    from normswap.keep.heldout import heldout_data, split_heldout
    from normswap.keep.kinds import detect

    plain_gn = 0
    if conv.to == "gn-ws":  # as convert's summary line says it
        plain_gn = sum(any("GN without weight standardization" in n for n in (a.to_dict().get("notes") or [])) for a in conv.actions)
    from .runtime import runtime_for

    run = runtime_for(device, amp, workers, size=size, crop=crop, mean=mean, std=std)
    data = run.batches(calib, samples=calib_samples, batch=calib_batch, model=teacher.model, spec=teacher.spec)
    held, hname = heldout_data(heldout, model, teacher, batch=calib_batch, **run.loader(teacher.spec))
    labelled = isinstance(held, tuple) and len(held) == 2
    split = None
    if held is None:  # no held-out set known: hold out 20% of the calibration data, train on the rest
        split = split_heldout(data)
        data, held, hname = split.calib, split.heldout, split.describe()
    hx = held[0] if labelled else held
    with run.place(teacher.model, conv.model) as original:
        outputs = detect(original, hx, output_kind, max_batches=1, decode=decode, decode_tol=decode_tol)

        def measure() -> float | None:
            return agreement(original, conv.model, hx, output_kind=outputs).quality

        before_state = {k: v.detach().clone() for k, v in conv.model.state_dict().items()}
        before = measure()
        from normswap.keep.calibrate import heldout_losses

        losses_before = heldout_losses(original, conv.model, hx, outputs)[1]
        ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else saved_dir / "recover-checkpoints"
        # with held-out data, recovery itself ends on its best evaluated step (unless keep_last)
        rep = recover(original, conv, data, steps=steps, lr=lr, temperature=temperature, feature_weight=feature_weight,
                      seed=seed, augment=augment, checkpoint_dir=ckdir, checkpoint_every=checkpoint_every, resume=resume,
                      target_agreement=target_agreement, progress=progress,
                      batch_size=DEFAULT_RECOVER_BATCH if recover_batch is None else recover_batch,
                      heldout=hx, keep_best=not keep_last, output_kind=outputs, amp=amp)
        from normswap.keep.recover import check_finite_model

        check_finite_model(conv.model, "recovery")
        after = measure()
        from normswap.keep.heldout import compare_losses

        # worse only when the held-out loss rose beyond its noise (paired over the same samples), not on a
        # top-1 difference of a sample or two
        change = compare_losses(heldout_losses(original, conv.model, hx, outputs)[1], losses_before).to_dict()
    where = hname or "held-out data"
    worse = change["verdict"] == "higher"
    result = RecoveryResult(to=conv.to, recovery=rep, saved=None, before=before, after=after, measured_on=where, checkpoints=str(ckdir),
                            measure=outputs.label, output_kind=outputs.describe(), runtime=run.to_dict(data))
    if plain_gn:
        result.notes.append(f"{plain_gn} of the {sum(a.action == 'swapped' for a in conv.actions)} swapped site(s) got GN without "
                            "weight standardization (no plain conv feeds only that BN)")
    if worse and not keep_last:
        conv.model.load_state_dict(before_state)
        result.notes.append(f"recovery raised the held-out loss on {where} beyond its noise (Δ {change['mean_diff']:+.3g} ± "
                            f"{change['se']:.2g}, n = {change['samples']}; {outputs.label} {before:.4f} → {after:.4f}); the saved "
                            "conversion was left as it was (--keep-last saves the last step anyway)")
    elif write:
        dest = Path(out) if out is not None else saved_dir
        save_conversion(conv, dest)
        result.saved = str(dest)
    m = agreement(teacher.model, conv.model, hx, output_kind=outputs)
    result.heldout = {"data": hname, **{k: v for k, v in m.items()}, "measures": m.describe(),
                      "split": None if split is None else split.to_dict(), "truth": outputs.kind.truth_label,
                      "accuracy": None, "original_accuracy": None}
    if labelled:
        x, y = held
        result.heldout.update(accuracy=accuracy(conv.model, x, y, output_kind=outputs),
                              original_accuracy=accuracy(teacher.model, x, y, output_kind=outputs))
    if report is not None and write:
        import json

        from normswap.atomic import atomic_write_text

        atomic_write_text(report, json.dumps(result.to_dict(), indent=2, default=str))
    return result

