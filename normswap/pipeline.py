"""One conversion job, as ``normswap convert`` runs it: the stages in order, the verdict rules, and
the result object a pipeline reads.

    result = normswap.run_conversion("torchvision.models:resnet50", to="fold", onnx="r50.onnx", report="r50.json")
    if not result:                      # truthy when the verdict is good
        raise SystemExit(result.verdict.line)

**Stages** (each timed and shown through ``progress``; nothing is written before the last one)::

    validate ─ every option and output path, before any work (InputError)
    load     ─ the model spec / weights (or the nn.Module given)
    rewrite  ─ fold, or swap for a norm target, on a copy
    calibrate, recover ─ with ``calib`` (function-changing swaps only)
    export   ─ with ``onnx``, into a staging directory
    parity   ─ exact rewrites: original ↔ rewritten (↔ onnxruntime); swaps: rewritten ↔ onnxruntime
    measure  ─ swaps: drift vs the original, batch independence
    write    ─ the ONNX (if the verdict allows), ``save``, ``report``

**Verdict rules** (:func:`decide`, the only place they live):

=================== ==== =================================================================
verdict             exit when
=================== ==== =================================================================
PASSED              0    an exact rewrite whose parity passed (the rewrite is proven)
EXPORTED            0    a function-changing swap, exported, its ONNX matching it; says how
                         far the function moved ("top-1 agreement 33% (naive swap; …)")
CONVERTED           0    the same without an export
FAILED              3    a parity comparison failed (see :mod:`normswap.parity`)
NOTHING COMPARED    4    every comparison passed only vacuously (empty/constant outputs)
=================== ==== =================================================================

Bad input is :class:`~normswap.errors.InputError` (exit 2) before anything runs; a real bug is any
other exception (exit 1). On FAILED and NOTHING COMPARED the ONNX is not written unless
``keep_failed``; ``save`` and ``report`` are written whatever the verdict, so a failure explains itself.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from normswap.defaults import DEFAULT_ATOL, DEFAULT_CALIB_BATCH, DEFAULT_INPUT_SHAPE, DEFAULT_LR, DEFAULT_RTOL
from normswap.progress import NullProgress, Progress

__all__ = ["Verdict", "ConversionResult", "run_conversion", "decide", "EXIT_CODES", "load_stage"]

EXIT_CODES = {"PASSED": 0, "EXPORTED": 0, "CONVERTED": 0, "FAILED": 3, "NOTHING COMPARED": 4}
BUNDLED_NAME = "normswap.models.digits:digits_resnet (bundled)"


@dataclass
class Verdict:
    """What happened, in one word (``word``), the sentence behind it and the exit code."""

    word: str
    detail: str

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.word]

    @property
    def line(self) -> str:
        return f"{self.word} — {self.detail}" if self.detail else self.word

    def to_dict(self) -> dict[str, Any]:
        return {"word": self.word, "detail": self.detail, "exit_code": self.exit_code}


def _agreement_text(kept: Any, drift: Mapping[str, Any] | None) -> str:
    """How far a function-changing swap moved the outputs, from the best measure available."""
    if kept is not None and kept.stages:
        last = kept.stages[-1]
        a, r = last.agreement.get("top1_agreement"), last.agreement.get("rel_err")
        how = {"naive": "naive swap", "calibrated": "calibrated", "recovered": "calibrated and recovered"}.get(last.stage, last.stage)
        measure = f"top-1 agreement {a:.1%}" if a is not None else f"output rel err {r:.3g}"
        return f"{measure} on {kept.evaluated_on} ({how})"
    if drift is not None:
        if drift.get("top1") is not None:
            return f"top-1 agreement {drift['top1']:.0%} on random inputs (naive swap; calibrate with --calib)"
        return f"max rel err {drift['max_rel']:.2g} on random inputs (naive swap; calibrate with --calib)"
    return "not measured"


def decide(conversion: Any, parity: Any, *, exported: bool, kept: Any = None, drift: Mapping[str, Any] | None = None) -> Verdict:
    """The verdict rules of the module docstring."""
    if parity is not None and parity.verdict == "failed":
        what = "the rewritten model" if conversion.exact else "the ONNX export of the rewritten model"
        return Verdict("FAILED", f"{what} does not compute what it must: {parity.summary()}")
    if parity is not None and parity.nothing_compared:
        return Verdict("NOTHING COMPARED", parity.summary())
    if conversion.exact:
        n = len(parity.stats) if parity is not None else 0
        where = " and its ONNX" if exported else ""
        return Verdict("PASSED", f"the rewritten model{where} {'compute' if exported else 'computes'} what the original did ({n} comparisons)")
    change = f"function changed: {_agreement_text(kept, drift)}"
    return Verdict("EXPORTED", f"ONNX matches the rewritten model; {change}") if exported else Verdict("CONVERTED", change)


@dataclass
class ConversionResult:
    """Every stage's outcome; truthy when the verdict is good; renders as rich tables and JSON."""

    conversion: Any
    model_info: dict[str, Any]
    verdict: Verdict
    parity: Any = None
    export: Any = None
    kept: Any = None
    drift: dict[str, Any] | None = None
    batch_independence: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # what was written: onnx / save / report
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.verdict.exit_code == 0

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code

    @property
    def model(self) -> Any:
        return self.conversion.model

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (what ``--report`` writes)."""
        from normswap.report import build_report

        extra: dict[str, Any] = {"verdict": self.verdict.to_dict(), "outputs": dict(self.outputs)}
        if self.kept is not None:
            extra["keep_function"] = self.kept.to_dict()
        if self.drift is not None:
            extra["drift_vs_original"] = self.drift
        if self.batch_independence is not None:
            extra["batch_independence"] = self.batch_independence
        if self.notes:
            extra["notes"] = list(self.notes)
        return build_report(self.conversion, model=self.model_info, export=self.export, parity=self.parity,
                            timings=self.seconds, extra=extra)

    def timing_line(self) -> str:
        total = sum(self.seconds.values())
        return " · ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()) + f" (total {total:.2f}s)"

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        from normswap.report import sites_table

        conv = self.conversion
        rows = [a.to_dict() for a in conv.actions]
        counts = ", ".join(f"{n} {k}" for k, n in conv.summary().items())
        parts: list[Any] = [Text(f"normswap convert --to {conv.to}: {len(rows)} norm site(s): {counts}")]
        plain = {"into-producer"} if conv.to == "fold" else set()
        special = [r for r in rows if r["action"] not in plain or r.get("notes")]
        if special:
            parts.append(sites_table(special, title="sites needing more than a plain rewrite"))
        if self.kept is not None:
            parts.append(self.kept)
        if self.parity is not None and self.parity.stats:
            parts.append(self.parity)
        if self.export is not None:
            bn = self.export.op_counts.get("BatchNormalization", 0)
            nodes = sum(self.export.op_counts.values())
            where = self.outputs.get("onnx", "(not written)")
            parts.append(Text(f"ONNX: {where} — {nodes} nodes, {bn} BatchNormalization, exporter {self.export.exporter}, opset {self.export.opset}"))
        if self.batch_independence is not None:
            bi = self.batch_independence
            parts.append(Text(
                "batch independence (training mode, sample alone vs in a batch of 8): original "
                f"{'yes' if bi['original']['independent'] else 'no'} (diff {bi['original']['max_rel_diff']:.1e}), "
                f"rewritten {'yes' if bi['rewritten']['independent'] else 'no'} (diff {bi['rewritten']['max_rel_diff']:.1e})"))
        if self.drift is not None:
            d = self.drift
            parts.append(Text(f"drift vs the original (eval, batches 1 and 3{' + samples' if d.get('samples') else ''}): "
                              f"max rel err {d['max_rel']:.2e}" + (f", top-1 agreement {d['top1']:.1%}" if d["top1"] is not None else "")))
        if conv.to != "fold":
            info = conv.target_info()
            parts.append(Text(f"target '{conv.to}': {info['summary']}; " + (
                "exact: reproduces the original eval function" if info["exact"] else
                "changes the function: calibrate (--calib) or fine-tune to recover accuracy")))
        for name in ("save", "report"):
            if name in self.outputs:
                parts.append(Text(f"{'saved conversion' if name == 'save' else 'report'}: {self.outputs[name]}"))
        style = {0: "bold green", 3: "bold red", 4: "bold yellow"}.get(self.exit_code, "bold")
        parts.append(Text(self.verdict.line, style=style))
        parts.append(Text(self.timing_line(), style="dim"))
        return Group(*parts)


# ---------------------------------------------------------------------------------------------
# stages


def load_stage(model: Any, *, args: Mapping[str, Any] | None = None, weights: Any = None, trust_pickle: bool = False,
               strict: bool = True) -> Any:
    """A :class:`~normswap.load.LoadedModel` from a spec (None = the bundled model) or an nn.Module."""
    from torch import nn

    from normswap.load import LoadedModel, _input_shape, load_model

    if isinstance(model, nn.Module):
        if weights is not None:
            raise _input_error("weights= applies to a model spec; load them into your module yourself")
        return LoadedModel(model=model, spec=None, args={}, weights=None, input_shape=_input_shape(model),
                           notes=[], **({"random_init": False} if "random_init" in LoadedModel.__dataclass_fields__ else {}))
    return load_model(model, args=dict(args or {}), weights=weights, trust_pickle=trust_pickle, strict=strict)


def _input_error(msg: str) -> Exception:
    from normswap.errors import InputError

    return InputError(msg)


def _is_bundled(model: Any, loaded: Any) -> bool:
    from normswap.load import DEFAULT_MODEL_SPEC

    return isinstance(model, (str, type(None))) and loaded.spec in (None, DEFAULT_MODEL_SPEC) and loaded.weights is None


def heldout_for(model: Any, loaded: Any) -> tuple[Any, str | None]:
    """Labelled held-out data when normswap knows it (the bundled model: the digits test split)."""
    if _is_bundled(model, loaded):
        from normswap.models.digits import load_digits

        return load_digits("test"), "the digits test split (held out)"
    return None, None


def drift_plot_path(report: Any, save: Any) -> Path | None:
    """The drift plot goes next to the JSON report (``<report>.drift.png``), else into ``save``."""
    if report is not None:
        report = Path(report)
        return report.with_name(report.stem + ".drift.png")
    if save is not None:
        return Path(save) / "drift.png"
    return None


def _spec_file(model: Any) -> str | None:
    from normswap import validate

    return validate.spec_path(model) if isinstance(model, str) else None


def run_conversion(
    model: Any = None,
    to: str = "fold",
    *,
    args: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
    input_shape: Sequence[int] | None = None,
    samples: Any = None,
    groups: int | None = None,
    exporter: str = "auto",
    opset: int | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    keep_failed: bool = False,
    calib: Any = None,
    calib_samples: int | None = None,
    calib_batch: int = DEFAULT_CALIB_BATCH,
    recover_steps: int = 0,
    recover_batch: int | None = None,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    onnx: str | Path | None = None,
    save: str | Path | None = None,
    report: str | Path | None = None,
    progress: Progress | None = None,
) -> ConversionResult:
    """Run every stage of one conversion (module docstring) and return its :class:`ConversionResult`.

    ``model``: an ``nn.Module`` (never mutated), a MODEL spec (``pkg.mod:fn`` / ``file.py:fn`` / a pickled
    file with ``trust_pickle``) with ``args``/``weights``, or None for the bundled digits ResNet.
    ``samples``: extra parity inputs (a tensor, or a tensor file). ``calib``: calibration data for a
    swap (see :func:`normswap.calibration_batches`), with ``recover_steps`` of distillation after it.
    ``onnx``/``save``/``report``: outputs, checked before any work and written at the end.
    """
    import torch

    from normswap import validate
    from normswap.errors import InputError

    progress = progress or NullProgress()
    onnx, save, report = (None if p is None else Path(p) for p in (onnx, save, report))
    # -- validate: nothing below may fail on something the user could have been told up front
    validate.options(atol=atol, rtol=rtol, groups=groups, calib_samples=calib_samples, calib_batch=calib_batch,
                     recover_steps=recover_steps, recover_batch=recover_batch, lr=lr)
    if recover_steps and calib is None:
        raise InputError("--recover-steps needs calibration data: add --calib DATA (e.g. --calib digits)")
    if calib is not None and to == "fold":
        raise InputError("--calib applies to swap targets; 'fold' is exact and has nothing to calibrate")
    plot = drift_plot_path(report, save) if calib is not None else None
    validate.output_paths(
        {"--onnx": onnx, "--report": report, "--report's drift plot": plot if report is not None else None, "--save": save},
        {"--weights": weights, "--samples": samples if isinstance(samples, (str, Path)) else None,
         "--calib": calib if isinstance(calib, (str, Path)) else None, "MODEL": _spec_file(model)},
        directories=("--save",),
    )
    seconds: dict[str, float] = {}

    with progress.stage("load", detail=str(model) if isinstance(model, str) else "") as _:
        t = time.perf_counter()
        loaded = load_stage(model, args=args, weights=weights, trust_pickle=trust_pickle, strict=strict)
        seconds["load"] = time.perf_counter() - t
    for n in loaded.notes:
        progress.note(n)
    if input_shape is not None:
        shape, shape_src = tuple(int(d) for d in input_shape), "--input-shape"
    elif loaded.input_shape:
        shape, shape_src = tuple(loaded.input_shape), "the model's default"
    else:
        shape, shape_src = DEFAULT_INPUT_SHAPE, "default (pass --input-shape to change)"
    validate.input_size(shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    extra = samples
    if isinstance(samples, (str, Path)):
        from normswap.load import load_tensor_file

        extra = load_tensor_file(samples)

    from normswap.convert import rewrite

    with progress.stage("rewrite", detail=f"--to {to}"):
        t = time.perf_counter()
        # verify=False: the parity stage checks every exact rewrite at batches 1 and 3 (noise floor
        # included) and, unlike an exception here, still lets the report and --keep-failed happen
        source = None if not isinstance(model, (str, type(None))) else {"spec": loaded.spec, "args": loaded.args, "weights": loaded.weights}
        conv = rewrite(loaded.model, to, (x,), groups=groups, atol=atol, rtol=rtol, verify=False, source=source)
        seconds["rewrite"] = time.perf_counter() - t

    kept = None
    if calib is not None:
        from normswap.data import calibration_batches
        from normswap.recover import keep_function

        data = calibration_batches(calib, samples=calib_samples, batch=calib_batch, model=loaded.model)
        heldout, hname = heldout_for(model, loaded)
        # keep_function draws its own "calibrate" and "recover" stages (the latter per step) on ``progress``
        kept = keep_function(loaded.model, conv, data, heldout=heldout, heldout_name=hname, recover_steps=recover_steps,
                             recover_batch=recover_batch, seed=seed, lr=lr, progress=progress, plot=None)
        seconds.update(kept.seconds)

    with ExitStack() as stack:
        exported, onnx_tmp = None, None
        if onnx is not None:
            from normswap.atomic import staging_dir
            from normswap.export import export_onnx

            tmp = stack.enter_context(staging_dir(onnx))
            onnx_tmp = tmp / onnx.name
            with progress.stage("export"):
                t = time.perf_counter()
                # the parity stage runs every pair at batches 1 and 3: no need for the exporter's own check
                exported = export_onnx(conv.model, (x,), onnx_tmp, exporter=exporter, opset=opset, verify=False)
                seconds["export"] = time.perf_counter() - t

        parity = None
        if conv.exact or onnx_tmp is not None:
            with progress.stage("parity"):
                t = time.perf_counter()
                parity = _parity(loaded.model, conv, onnx_tmp, shape, extra, atol, rtol)
                seconds["parity"] = time.perf_counter() - t

        drift = bi = None
        if to != "fold":
            from normswap.checks import batch_independence

            with progress.stage("measure", detail="drift, batch independence"):
                t = time.perf_counter()
                if kept is None:  # after calibration the held-out agreement says more than random inputs
                    drift = _drift(loaded.model, conv.model, shape, extra, parity)
                bi = {"original": batch_independence(loaded.model, shape).to_dict(),
                      "rewritten": batch_independence(conv.model, shape).to_dict()}
                seconds["measure"] = time.perf_counter() - t

        verdict = decide(conv, parity, exported=exported is not None, kept=kept, drift=drift)
        model_info = {"spec": loaded.spec or (BUNDLED_NAME if isinstance(model, (str, type(None))) else f"<{type(loaded.model).__name__} instance>"),
                      "args": loaded.args, "weights": loaded.weights, "input_shape": list(shape), "input_shape_from": shape_src,
                      "notes": loaded.notes}
        result = ConversionResult(conversion=conv, model_info=model_info, verdict=verdict, parity=parity, export=exported,
                                  kept=kept, drift=drift, batch_independence=bi, seconds=seconds)

        # -- write: the ONNX only on a good verdict (or keep_failed), the rest always
        t = time.perf_counter()
        if exported is not None and (result or keep_failed):
            exported.move_into(onnx.parent)
            result.outputs["onnx"] = str(onnx)
        elif exported is not None:
            why = "nothing was compared" if verdict.word == "NOTHING COMPARED" else "parity failed"
            result.notes.append(f"{why}: {onnx} was not written (pass --keep-failed to write it anyway)")
    if kept is not None and plot is not None:
        from normswap.recover import save_drift_plot

        kept.plot = str(save_drift_plot(kept, plot))
    if save is not None:
        from normswap.saved import save_conversion

        save_conversion(conv, save)
        result.outputs["save"] = str(save)
    if report is not None:
        import json

        from normswap.atomic import atomic_write_text

        result.outputs["report"] = str(report)
        atomic_write_text(report, json.dumps(result.to_dict(), indent=2, default=str))
    seconds["write"] = time.perf_counter() - t
    return result


def _drift(original: Any, rewritten: Any, shape: Sequence[int], samples: Any, parity: Any = None) -> dict[str, Any]:
    """How far the swap moved the outputs (informational, not a pass/fail). An exact target's parity
    check already compared original and rewritten on these inputs: its numbers are reused."""
    from normswap.parity import PAIR_ORIGINAL_REWRITTEN, check_parity

    stats = [s for s in (parity.stats if parity is not None else []) if s.pair == PAIR_ORIGINAL_REWRITTEN]
    if not stats:
        stats = check_parity(original, rewritten, None, input_shape=shape, samples=samples).stats
    top1 = [s.top1 for s in stats if s.top1 is not None]
    rel = [s.max_rel for s in stats]
    return {"max_rel": max(rel) if rel else float("nan"), "top1": min(top1) if top1 else None, "samples": samples is not None}


def _parity(original: Any, conv: Any, onnx_path: Any, shape: Sequence[int], samples: Any, atol: float, rtol: float) -> Any:
    """Exact rewrites: original ↔ rewritten (↔ onnxruntime), with the first diverging node on failure.
    Function-changing swaps: rewritten ↔ onnxruntime (the function changed on purpose)."""
    from normswap.parity import check_parity

    if conv.exact:
        res = check_parity(original, conv.model, onnx_path, input_shape=shape, samples=samples, atol=atol, rtol=rtol)
        if res.verdict == "failed":
            res.divergence = conv.divergence(original, shape, atol=atol, rtol=rtol)
        return res
    res = check_parity(conv.model, None, onnx_path, input_shape=shape, samples=samples, atol=atol, rtol=rtol,
                       reference_name="rewritten")
    res.notes.append(f"'{conv.to}' changes the model's function by design: parity checks the export only")
    return res


# ---------------------------------------------------------------------------------------------
# recovery of a saved conversion (``normswap recover``)


@dataclass
class RecoveryResult:
    """A recovery run on a saved conversion: the report, held-out numbers before and after, and
    whether the result was saved (a worse one is not, unless ``keep_last``)."""

    to: str
    recovery: Any
    saved: str | None
    before: float | None  # the measure that decides "better": held-out top-1 agreement when known,
    after: float | None   # else top-1 agreement on the calibration data
    measured_on: str
    heldout: dict[str, Any] | None = None
    checkpoints: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        if self.saved is None:
            return Verdict("CONVERTED", f"recovery did not improve agreement on {self.measured_on} ({_f(self.before)} → {_f(self.after)}): "
                                        "the saved conversion was kept (pass --keep-last to save it anyway)")
        return Verdict("CONVERTED", f"function changed: top-1 agreement {_f(self.after)} on {self.measured_on} "
                                    f"(was {_f(self.before)}); saved to {self.saved}")

    def __bool__(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"saved": self.saved, "to": self.to, "recovery": self.recovery.to_dict(), "measured_on": self.measured_on,
                "agreement_before": self.before, "agreement_after": self.after, "heldout": self.heldout,
                "checkpoints": self.checkpoints, "notes": list(self.notes), "verdict": self.verdict.to_dict()}

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = [self.recovery]
        parts += [Text(f"note: {n}", style="yellow") for n in [*self.recovery.notes, *self.notes]]
        if self.heldout is not None:
            h = self.heldout
            parts.append(Text(f"on {h['data']}: top-1 agreement {h['top1_agreement']:.4f}, accuracy {h['accuracy']:.4f} "
                              f"(original {h['original_accuracy']:.4f})"))
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
) -> RecoveryResult:
    """Distil the original into a saved (swapped) conversion and save it back — only if top-1
    agreement with the original improved (held-out data when normswap knows it, else the calibration
    data), unless ``keep_last``. The original is ``model`` (a module or spec); without it, the bundled
    model, or the spec the record names only with ``trust_spec`` (a saved directory is data)."""
    from normswap import validate
    from normswap.calibrate import accuracy, agreement
    from normswap.data import calibration_batches
    from normswap.defaults import DEFAULT_TEMPERATURE
    from normswap.errors import InputError
    from normswap.recover import recover
    from normswap.saved import load_conversion, read_record, save_conversion, untrusted_spec_message, uses_bundled_model

    saved_dir = Path(saved_dir)
    progress = progress or NullProgress()
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    validate.options(steps=steps, calib_samples=calib_samples, calib_batch=calib_batch, recover_batch=recover_batch, lr=lr,
                     temperature=temperature, feature_weight=feature_weight, checkpoint_every=checkpoint_every,
                     target_agreement=target_agreement)
    validate.output_paths(
        {"--report": report, "--out": out, "--checkpoint-dir": checkpoint_dir},
        {"--weights": weights, "--calib": calib if isinstance(calib, (str, Path)) else None, "MODEL": _spec_file(model)},
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
        if getattr(teacher, "random_init", False):  # a fresh random model is not the one that was converted
            raise InputError(
                f"the original model for {saved_dir} builds random weights on every load, so it is not the model that was "
                "converted; pass --weights FILE (the weights it was converted from) or the spec's pretrained argument")
        conv = load_conversion(saved_dir, model=teacher.model)  # rewrites a copy: the teacher stays as it is
    data = calibration_batches(calib, samples=calib_samples, batch=calib_batch, model=teacher.model)
    heldout, hname = heldout_for(model, teacher)
    hx = heldout[0] if heldout is not None else None

    def measure() -> float | None:
        return agreement(teacher.model, conv.model, hx)["top1_agreement"] if hx is not None else None

    before_state = {k: v.detach().clone() for k, v in conv.model.state_dict().items()}
    before = measure()
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else saved_dir / "recover-checkpoints"
    # with held-out data, recovery itself ends on its best evaluated step (unless keep_last)
    rep = recover(teacher.model, conv, data, steps=steps, lr=lr, temperature=temperature, feature_weight=feature_weight,
                  seed=seed, augment=augment, checkpoint_dir=ckdir, checkpoint_every=checkpoint_every, resume=resume,
                  target_agreement=target_agreement, progress=progress, batch_size=recover_batch,
                  heldout=hx, keep_best=not keep_last)
    after = measure()
    where = hname or "the calibration data"
    if hx is None:
        before, after = rep.agreement_before.get("top1_agreement"), rep.agreement_after.get("top1_agreement")
    worse = before is not None and after is not None and after < before
    result = RecoveryResult(to=conv.to, recovery=rep, saved=None, before=before, after=after, measured_on=where, checkpoints=str(ckdir))
    if worse and not keep_last:
        conv.model.load_state_dict(before_state)
        result.notes.append(f"recovery lowered top-1 agreement on {where} ({before:.4f} → {after:.4f}); the saved conversion "
                            "was left as it was (--keep-last saves the last step anyway)")
    elif write:
        dest = Path(out) if out is not None else saved_dir
        save_conversion(conv, dest)
        result.saved = str(dest)
    if heldout is not None:
        x, y = heldout
        result.heldout = {"data": hname, "top1_agreement": agreement(teacher.model, conv.model, x)["top1_agreement"],
                          "accuracy": accuracy(conv.model, x, y), "original_accuracy": accuracy(teacher.model, x, y)}
    if report is not None and write:
        import json

        from normswap.atomic import atomic_write_text

        atomic_write_text(report, json.dumps(result.to_dict(), indent=2, default=str))
    return result


# ---------------------------------------------------------------------------------------------
# comparing targets (``normswap compare``)


def run_comparison(
    model: Any = None,
    targets: Sequence[str] = ("fold", "gn-ws", "gn", "ln", "ln-channels", "in", "sn", "bin", "wn", "frozen"),
    *,
    args: Mapping[str, Any] | None = None,
    weights: Any = None,
    trust_pickle: bool = False,
    strict: bool = True,
    input_shape: Sequence[int] | None = None,
    calib: Any = None,
    calib_samples: int | None = 256,
    calib_batch: int = DEFAULT_CALIB_BATCH,
    groups: int | None = None,
    latency: bool = True,
    runs: int = 20,
    threads: int = 1,
    report: str | Path | None = None,
    progress: Any = None,
    write: bool = True,
    batch_sizes: Sequence[int] | str | None = None,
    batch_samples: int = 256,
    plot: str | Path | None = None,
) -> Any:
    """Every requested target side by side on one model (:func:`normswap.compare.compare_targets`):
    the same validate → load stages as :func:`run_conversion`, calibration data and held-out data
    chosen the same way, the report written last. ``batch_sizes`` / ``batch_samples``: the batch-size
    sweep (passed through); ``plot``: its PNG, written with the report."""
    import torch

    from normswap import validate
    from normswap.compare import batch_sizes_from, compare_targets
    from normswap.errors import InputError

    progress = progress or NullProgress()
    names = [t.strip() for t in targets if t and t.strip()]
    if not names:
        raise InputError("--targets is empty; e.g. --targets fold,gn-ws,ln,sn")
    validate.options(groups=groups, calib_samples=calib_samples, calib_batch=calib_batch, runs=runs, threads=threads)
    sizes = None if batch_sizes is None else batch_sizes_from(batch_sizes)
    if sizes is not None:
        validate.positive_int("--batch-samples", batch_samples)
    elif plot is not None:
        raise InputError("--plot draws the batch-size sweep; add --batch-sizes (e.g. --batch-sizes 1,2,8,32)")
    validate.output_paths({"--report": report, "--plot": plot}, {"--weights": weights, "--calib": calib if isinstance(calib, (str, Path)) else None,
                                                  "MODEL": _spec_file(model)})
    with progress.stage("load", detail=str(model) if isinstance(model, str) else ""):
        loaded = load_stage(model, args=args, weights=weights, trust_pickle=trust_pickle, strict=strict)
    for n in loaded.notes:
        progress.note(n)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else tuple(loaded.input_shape or DEFAULT_INPUT_SHAPE)
    validate.input_size(shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    data = heldout = hname = None
    if calib is not None:
        from normswap.data import calibration_batches

        data = calibration_batches(calib, samples=calib_samples, batch=calib_batch, model=loaded.model)
        heldout, hname = heldout_for(model, loaded)
        if heldout is not None:
            hx = heldout[0]
            heldout = [(hx[i:i + 256],) for i in range(0, len(hx), 256)]
    rep = compare_targets(loaded.model, names, (x,), calib=data, heldout=heldout, heldout_name=hname, groups=groups,
                          latency=latency, runs=runs, threads=threads, progress=progress,  # one stage per target
                          batch_sizes=sizes, batch_samples=batch_samples,
                          model_name=loaded.spec or ("bundled digits ResNet" if isinstance(model, (str, type(None))) else type(loaded.model).__name__))
    if plot is not None and write and rep.batch_sweep is not None:
        rep.batch_sweep.save_plot(plot)
    if report is not None and write:
        import json

        from normswap.atomic import atomic_write_text

        atomic_write_text(report, json.dumps(rep.to_dict(), indent=2, default=str))
    return rep
