"""``run_conversion``: the stages of ``normswap convert`` in order, and the result object it returns."""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from normswap.defaults import DEFAULT_ATOL, DEFAULT_CALIB_BATCH, DEFAULT_LR, DEFAULT_RTOL
from normswap.progress import NullProgress, Progress

from . import image_lists
from .stages import BUNDLED_NAME, drift_plot_path, example_input, example_shape, load_stage, spec_file
from .verdict import Verdict, decide

__all__ = ["ConversionResult", "run_conversion"]


@dataclass
class ConversionResult:
    """Every stage's outcome; truthy when the verdict is good; renders as rich tables and JSON."""

    conversion: Any
    model_info: dict[str, Any]
    verdict: Verdict
    parity: Any = None
    export: Any = None
    kept: Any = None
    fitted: Any = None  # --to fold --calib: the per-sample norms' fits and choice (FoldNormsReport)
    drift: dict[str, Any] | None = None
    batch_independence: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # what was written: onnx / save / report
    notes: list[str] = field(default_factory=list)
    runtime: dict[str, Any] | None = None  # where calibration / recovery ran and how the data was read

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
        if self.fitted is not None:
            extra["fold_norms"] = self.fitted.to_dict()
        if self.drift is not None:
            extra["drift_vs_original"] = self.drift
        if self.batch_independence is not None:
            extra["batch_independence"] = self.batch_independence
        if self.notes:
            extra["notes"] = list(self.notes)
        if self.runtime is not None:
            extra["runtime"] = dict(self.runtime)
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
        head = f"normswap convert --to {conv.to}: {len(rows)} norm site(s): {counts}"
        if conv.to == "gn-ws":  # said here, not only per site: these sites are plain GN, as --to gn would give
            plain_gn = sum(any("GN without weight standardization" in n for n in (r.get("notes") or [])) for r in rows)
            if plain_gn:
                head += f"; {plain_gn} of them got GN without weight standardization (no plain conv feeds only that BN)"
        parts: list[Any] = [Text(head)]
        plain = {"into-producer", "into-producers", "merged"} if conv.to == "fold" else set()
        special = [r for r in rows if r["action"] not in plain or r.get("notes")]
        if special:
            parts.append(sites_table(special, title="sites needing more than a plain rewrite"))
        if self.kept is not None:
            parts.append(self.kept)
        if self.runtime is not None:
            from .runtime import Runtime

            parts.append(Text(Runtime.line(self.runtime)))
        if self.fitted is not None:
            parts.append(self.fitted)
        if self.parity is not None and self.parity.stats:
            parts.append(self.parity)
        if self.export is not None:
            parts.append(Text(self.export.line(self.outputs.get("onnx", "(not written)"))))
        if self.batch_independence is not None:
            bi = self.batch_independence
            parts.append(Text(
                "batch independence (training mode, sample alone vs in a batch of 8): original "
                f"{'yes' if bi['original']['independent'] else 'no'} (diff {bi['original']['max_rel_diff']:.1e}), "
                f"rewritten {'yes' if bi['rewritten']['independent'] else 'no'} (diff {bi['rewritten']['max_rel_diff']:.1e})"))
        if self.drift is not None:
            d = self.drift
            parts.append(Text(f"drift vs the original (eval, {d.get('inputs') or 'batches 1 and 3'}{' + samples' if d.get('samples') else ''}): "
                              f"max rel err {d['max_rel']:.2e}" + (f", top-1 agreement {d['top1']:.1%}" if d["top1"] is not None else "")))
        if conv.to != "fold":
            info = conv.target_info()
            parts.append(Text(f"target '{conv.to}': {info['summary']}; " + (
                "exact: reproduces the original eval function" if info["exact"] else
                "changes the function: calibrate (--calib) or fine-tune to recover accuracy")))
        for name in ("save", "report"):
            if name in self.outputs:
                parts.append(Text(f"{'saved conversion' if name == 'save' else 'report'}: {self.outputs[name]}"))
        style = {0: "bold green", 3: "bold red", 4: "bold yellow", 5: "bold yellow"}.get(self.exit_code, "bold")
        parts.append(Text(self.verdict.line, style=style))
        parts.append(Text(self.timing_line(), style="dim"))
        return Group(*parts)


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
    dtype: Any = None,
    images: int | None = None,
    output_kind: str | None = None,
    heldout: Any = None,
    decode: Any = None,
    decode_tol: float | None = None,
    device: Any = "auto",
    amp: str | None = None,
    workers: int = 0,
    size: Any = None,
    crop: float | None = None,
    mean: Any = None,
    std: Any = None,
    fold_norms: Any = None,
    max_drop: float | None = None,
    front_latency: bool = False,
    front_plot: str | Path | None = None,
) -> ConversionResult:
    """Run every stage of one conversion (module docstring) and return its :class:`ConversionResult`.

    ``model``: an ``nn.Module`` (never mutated), a MODEL spec (``pkg.mod:fn`` / ``file.py:fn`` / a pickled
    file with ``trust_pickle``) with ``args``/``weights``, or None for the bundled digits ResNet.
    ``samples``: extra parity inputs (a tensor, or a tensor file). ``calib``: calibration data for a
    swap (see :func:`normswap.calibration_batches`), with ``recover_steps`` of distillation after it.
    ``onnx``/``save``/``report``: outputs, checked before any work and written at the end.
    ``dtype``: ``"float16"``/``"bfloat16"`` (or the torch dtype) runs the conversion in half precision on a
    cast *copy* of the model, with inputs in that dtype and tolerances from :func:`half_tolerances`
    (stated in the report); default: the model's own parameter dtype when it is already half (fold only).
    bfloat16 cannot be combined with ``onnx`` (onnxruntime CPU lacks bfloat16 kernels).
    ``decode`` / ``decode_tol``: measure agreement through a decoder of the output (a callable or a
    ``module:fn`` spec, and its tolerance; default: the model's ``normswap_decode``): what the verdict cites.
    ``images``: the model is called with a list of this many images (``model([img, ...])``; torchvision's
    detectors are recognised and default to 1): ``input_shape`` is then one image's ``C,H,W``, the ONNX
    takes exactly that many images, and a detector is verified before and after post-processing
    (:mod:`normswap.pipeline.image_lists`).
    ``device`` (``auto`` = the GPU when there is one) and ``amp`` (``bf16``/``fp16``, recovery only): where
    calibration and recovery run; ``workers``, ``size``, ``crop``, ``mean``, ``std``: how an image folder
    given to ``calib`` is read (:mod:`normswap.load.images`); see :mod:`normswap.pipeline.runtime`.
    ``front_latency`` (``--front-latency``, with ``--to fold --calib``): also fold, export and time every point of
    the front (:mod:`normswap.pipeline.fold_front`) and draw latency against held-out quality as a PNG at
    ``front_plot`` (which implies it; default beside ``report`` as ``<report>.front.png``).
    """
    import torch

    from normswap import validate
    from normswap.errors import InputError, NormswapError

    progress = progress or NullProgress()
    onnx, save, report = (None if p is None else Path(p) for p in (onnx, save, report))
    # -- validate: nothing below may fail on something the user could have been told up front
    validate.options(atol=atol, rtol=rtol, groups=groups, calib_samples=calib_samples, calib_batch=calib_batch,
                     recover_steps=recover_steps, recover_batch=recover_batch, lr=lr)
    validate.positive_int("--images", images)
    validate.runtime_options(device=device, amp=amp, workers=workers, size=size, crop=crop, mean=mean, std=std,
                             calib=calib, recover_steps=recover_steps)
    if recover_steps and calib is None:
        raise InputError("--recover-steps needs calibration data: add --calib DATA (e.g. --calib digits)")
    if (fold_norms is not None or max_drop is not None) and (to != "fold" or calib is None):
        raise InputError("--fold-norms / --max-drop choose which per-sample norms --to fold replaces by fitted affines: "
                         "use them with --to fold --calib DATA")
    front_latency = bool(front_latency or front_plot is not None)
    if front_latency and (to != "fold" or calib is None):
        raise InputError("--front-latency / --front-plot time the front of per-sample norms --to fold replaces by fitted "
                         "affines: use them with --to fold --calib DATA")
    from .stages import front_plot_path

    front_png = front_plot_path(front_plot, report) if front_latency else None
    from normswap.keep.heldout import check_options

    check_options(output_kind, heldout, calib, decode, decode_tol)  # --output-kind, --heldout (with --calib)
    half = _parse_dtype(dtype)
    if half is not None and to != "fold":
        raise InputError(f"--dtype {_dtype_name(half)} applies to --to fold only (swap targets run in float32)")
    if to == "fold" and calib is not None and save is not None:
        raise InputError("--save cannot record a fold of fitted norms: a saved conversion is rebuilt by re-running the "
                         "pass on the architecture, which has no fitted affines; write the ONNX with --onnx instead")
    from .stages import saved_conversion_dir

    if save is not None and saved_conversion_dir(model):
        raise InputError(f"--save cannot record a conversion of the saved conversion {model}: its record could not "
                         "rebuild it from the architecture; write the result with --onnx (or re-save from Python)")
    if half is not None and calib is not None:
        raise InputError("--dtype cannot be combined with --calib: calibration fits run in float32; drop one of them")
    if half == torch.bfloat16 and onnx is not None:
        raise InputError(_BF16_ONNX)
    plot = drift_plot_path(report, save) if calib is not None and to != "fold" else None
    validate.output_paths(
        {"--onnx": onnx, "--report": report, "--report's drift plot": plot if report is not None else None, "--save": save,
         "--front-plot": front_png},
        {"--weights": weights, "--samples": samples if isinstance(samples, (str, Path)) else None,
         "--calib": calib if isinstance(calib, (str, Path)) else None, "MODEL": spec_file(model),
         "--heldout": heldout if isinstance(heldout, (str, Path)) else None},
        directories=("--save",),
    )
    seconds: dict[str, float] = {}

    with progress.stage("load", detail=str(model) if isinstance(model, str) else "") as _:
        t = time.perf_counter()
        loaded = load_stage(model, args=args, weights=weights, trust_pickle=trust_pickle, strict=strict)
        seconds["load"] = time.perf_counter() - t
    original = loaded.model
    if half is None and to == "fold" and dtype is None:
        own = _model_dtype(original)
        half = own if own in HALF_DTYPES else None
        if half == torch.bfloat16 and onnx is not None:
            raise InputError(_BF16_ONNX)
    if half is not None:
        import copy

        original = copy.deepcopy(original).to(half)  # a copy: the caller's (loaded) model is never cast
        atol, rtol = half_tolerances(atol, rtol, half)
        loaded.notes.append(
            f"dtype {_dtype_name(half)}: a cast copy of the model and inputs in {_dtype_name(half)}; tolerances "
            f"atol={atol:.3g} rtol={rtol:.3g} (float32's × √(ε_{_dtype_name(half)}/ε_float32) = "
            f"×{_eps_factor(half):.1f}), plus the noise floor: the original's own {_dtype_name(half)} error vs its float64 copy")
    for n in loaded.notes:
        progress.note(n)
    n_images = image_lists.image_count(original, images)
    batches = None
    if n_images is not None:  # model([img, ...]): a detector, or --images N
        if calib is not None:
            raise InputError("--calib is for models that take tensor batches; this model takes a list of images")
        shape, shape_src = image_lists.image_shape(original, input_shape, n_images)
        x = image_lists.example_images(shape, n_images, half)
        batches, sample_notes = image_lists.parity_batches(shape, n_images, samples, half, model=original)
        loaded.notes.extend(sample_notes)
        extra = None
    else:
        shape, shape_src = example_shape(loaded, input_shape)
        x = example_input(shape, half)
        extra = None if samples is None else image_lists.load_samples(samples, shape, model=original)
    if half is not None and extra is not None:
        extra = _cast_floats(extra, half)

    fitted = None
    if to == "fold" and calib is not None:  # per-sample norms → fitted affines (then folded exactly below)
        from normswap.load.data import calibration_batches
        from normswap.keep.heldout import heldout_data

        from .fold_norms import DEFAULT_MAX_DROP, fit_and_choose

        data = calibration_batches(calib, samples=calib_samples, batch=calib_batch, model=loaded.model)
        held, hname = heldout_data(heldout, model, loaded, batch=calib_batch)
        with progress.stage("fit norms", detail="per-channel affines on the calibration data"):
            t = time.perf_counter()
            fitted = fit_and_choose(loaded.model, data, heldout=held, heldout_name=hname, output_kind=output_kind,
                                    fold_norms=fold_norms, max_drop=DEFAULT_MAX_DROP if max_drop is None else max_drop,
                                    recover_steps=recover_steps, recover_batch=recover_batch, seed=seed, lr=lr,
                                    progress=progress, latency=front_latency)
            # the stage's wall time in its parts: fitting, measuring each site and the front, timing the
            # front (--front-latency), recovering
            spent = time.perf_counter() - t
            measure, rec = fitted.seconds.get("measure", 0.0), fitted.seconds.get("recover", 0.0)
            lat = fitted.seconds.get("latency", 0.0)
            seconds["fit norms"] = spent - measure - rec - lat
            seconds["measure norms"] = measure
            if lat:
                seconds["front latency"] = lat
            if rec:
                seconds["recover"] = rec
        original = fitted.model  # what the fold must reproduce exactly (and parity checks it against)

    from normswap.rewriting.convert import check_example_inputs, rewrite

    with progress.stage("rewrite", detail=f"--to {to}"):
        t = time.perf_counter()
        check_example_inputs(original, (x,))  # bad input shape: InputError before any work
        # verify=False: the parity stage checks every exact rewrite at batches 1 and 3 (noise floor
        # included) and, unlike an exception here, still lets the report and --keep-failed happen
        source = None if not isinstance(model, (str, type(None))) else {"spec": loaded.spec, "args": loaded.args, "weights": loaded.weights}
        conv = rewrite(original, to, (x,), groups=groups, atol=atol, rtol=rtol, verify=False, source=source,
                       skip=fitted.kept if fitted is not None else ())
        if fitted is not None:
            fitted.annotate(conv)
        seconds["rewrite"] = time.perf_counter() - t

    kept = runtime = None
    if calib is not None and to != "fold":
        from normswap.keep.recover import keep_function

        from .runtime import runtime_for

        run = runtime_for(device, amp, workers, size=size, crop=crop, mean=mean, std=std)
        data = run.batches(calib, samples=calib_samples, batch=calib_batch, model=loaded.model, spec=loaded.spec)
        from normswap.keep.heldout import heldout_data

        # --heldout DATA, else the held-out set normswap knows, else keep_function holds out 20% of the data
        held, hname = heldout_data(heldout, model, loaded, batch=calib_batch, **run.loader(loaded.spec))
        # keep_function draws its own "calibrate" and "recover" stages (the latter per step) on ``progress``
        with run.place(loaded.model, conv.model) as teacher:
            kept = keep_function(teacher, conv, data, heldout=held, heldout_name=hname, output_kind=output_kind,
                                 decode=decode, decode_tol=decode_tol,
                                 recover_steps=recover_steps, recover_batch=recover_batch, seed=seed, lr=lr,
                                 progress=progress, plot=None, amp=amp)
        seconds.update(kept.seconds)
        runtime = run.to_dict(data)

    with ExitStack() as stack:
        exported, onnx_tmp, export_error = None, None, None
        if onnx is not None:
            from normswap.atomic import staging_dir
            from normswap.export import export_onnx

            tmp = stack.enter_context(staging_dir(onnx))
            onnx_tmp = tmp / onnx.name
            t = time.perf_counter()
            try:
                with progress.stage("export"):
                    # the parity stage runs every pair at batches 1 and 3: no need for the exporter's own check
                    exported = export_onnx(conv.model, (x,), onnx_tmp, exporter=exporter, opset=opset, verify=False)
            except NormswapError as e:  # not InputError: the exporter could not; the rewrite itself may be fine
                if isinstance(e, InputError):
                    raise
                export_error, onnx_tmp = f"the ONNX export failed: {e}", None
            seconds["export"] = time.perf_counter() - t

        parity = None
        if conv.exact or onnx_tmp is not None:  # (a failed export leaves an exact rewrite to check in PyTorch)
            with progress.stage("parity"):
                t = time.perf_counter()
                if batches is not None:
                    parity = image_lists.list_parity(original, conv, onnx_tmp, batches, atol, rtol)
                else:
                    parity = _parity(original, conv, onnx_tmp, shape, extra, atol, rtol, dtype=half)
                if fitted is not None and parity is not None:  # the fold reproduces the affine-replaced model
                    parity.reference = f"the original with {len(fitted.folded)} per-sample norm(s) as fitted affines"
                seconds["parity"] = time.perf_counter() - t

        drift = bi = None
        if to != "fold":
            from normswap.checks import batch_independence

            with progress.stage("measure", detail="drift, batch independence"):
                t = time.perf_counter()
                if batches is not None:  # a list of images: drift on the parity draws; "batch" is the image count
                    from normswap.parity import check_parity

                    from normswap.detection import probed

                    # a detector's post-processed outputs may be empty: its drift is read before post-processing
                    drift = _drift(loaded.model, conv.model, shape, None,
                                   check_parity(probed(loaded.model), probed(conv.model), None, inputs=batches))
                    drift["inputs"] = ", ".join(str(label) for label, _ in batches)
                elif kept is None:  # after calibration the held-out agreement says more than random inputs
                    drift = _drift(loaded.model, conv.model, shape, extra, parity)
                if batches is None:
                    bi = {"original": batch_independence(loaded.model, shape).to_dict(),
                          "rewritten": batch_independence(conv.model, shape).to_dict()}
                seconds["measure"] = time.perf_counter() - t

        verdict = decide(conv, parity, exported=exported is not None, kept=kept, drift=drift, export_error=export_error,
                         fitted=fitted)
        model_info = {"spec": loaded.spec or (BUNDLED_NAME if isinstance(model, (str, type(None))) else f"<{type(loaded.model).__name__} instance>"),
                      "args": loaded.args, "weights": loaded.weights, "input_shape": list(shape), "input_shape_from": shape_src,
                      "images": n_images, "notes": loaded.notes, "dtype": _dtype_name(half) if half is not None else _dtype_name(_model_dtype(original)),
                      "tolerances": {"atol": atol, "rtol": rtol}}
        result = ConversionResult(conversion=conv, model_info=model_info, verdict=verdict, parity=parity, export=exported,
                                  kept=kept, fitted=fitted, drift=drift, batch_independence=bi, seconds=seconds, runtime=runtime)
        if exported is not None and n_images is not None:
            result.notes.append(f"the ONNX takes exactly {n_images} image(s) of {'×'.join(map(str, shape))} "
                                f"({', '.join(exported.input_names)}), the form torchvision's detector exports use")

        # -- write: the ONNX only on a good verdict (or keep_failed), the rest always
        t = time.perf_counter()
        if exported is not None and (result or keep_failed):
            exported.move_into(onnx.parent)
            result.outputs["onnx"] = str(onnx)
        elif exported is not None:
            why = "nothing was compared" if verdict.word == "NOTHING COMPARED" else "parity failed"
            result.notes.append(f"{why}: {onnx} was not written (pass --keep-failed to write it anyway)")
    if save is not None:  # before the drift plot, which may go into the same (new) directory
        from normswap.load.saved import save_conversion

        save_conversion(conv, save)
        result.outputs["save"] = str(save)
    if kept is not None and plot is not None:
        from normswap.keep.recover import save_drift_plot

        kept.plot = str(save_drift_plot(kept, plot))
    if front_png is not None and fitted is not None and fitted.latency is not None:
        from .front_plot import save_front_plot

        fitted.latency.plot = str(save_front_plot(fitted, front_png))
        result.outputs["front_plot"] = str(front_png)
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


def _parity(original: Any, conv: Any, onnx_path: Any, shape: Sequence[int], samples: Any, atol: float, rtol: float,
            dtype: Any = None) -> Any:
    """Exact rewrites: original ↔ rewritten (↔ onnxruntime), with the first diverging node on failure.
    Function-changing swaps: rewritten ↔ onnxruntime (the function changed on purpose)."""
    from normswap.parity import check_parity

    if conv.exact:
        res = check_parity(original, conv.model, onnx_path, input_shape=shape, samples=samples, atol=atol, rtol=rtol,
                           input_dtype=dtype)
        if res.verdict == "failed" and dtype is None:  # divergence draws float32 inputs
            res.divergence = conv.divergence(original, shape, atol=atol, rtol=rtol)
        return res
    res = check_parity(conv.model, None, onnx_path, input_shape=shape, samples=samples, atol=atol, rtol=rtol,
                       reference_name="rewritten")
    res.notes.append(f"'{conv.to}' changes the model's function by design: parity checks the export only")
    return res



# -- half precision ---------------------------------------------------------------------------

_BF16_ONNX = ("--dtype bfloat16 cannot be exported: onnxruntime CPU lacks bfloat16 kernels for Conv/Gemm/most ops, "
              "so the ONNX could not be verified; drop --onnx, or use --dtype float16")


def _half_dtypes() -> dict[str, Any]:
    import torch

    return {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class _HalfDtypes:
    def __contains__(self, d: Any) -> bool:
        return d in set(_half_dtypes().values())


HALF_DTYPES = _HalfDtypes()


def _parse_dtype(dtype: Any) -> Any:
    """None, or torch.float16 / torch.bfloat16 (from a name or a torch dtype); float32 means None."""
    import torch

    from normswap.errors import InputError

    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        d = dtype
    else:
        name = str(dtype).lower().removeprefix("torch.")
        if name in ("float32", "fp32", "float"):
            return None
        d = _half_dtypes().get(name)
        if d is None:
            raise InputError(f"--dtype {dtype} is not supported; pass float16 or bfloat16 (or omit it for float32)")
    if d == torch.float32:
        return None
    if d not in HALF_DTYPES:
        raise InputError(f"--dtype {dtype} is not supported; pass float16 or bfloat16 (or omit it for float32)")
    return d


def _dtype_name(d: Any) -> str:
    return str(d).replace("torch.", "")


def _model_dtype(model: Any) -> Any:
    """The dtype of the model's first floating parameter (or buffer); None if it has none."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _eps_factor(dtype: Any) -> float:
    import torch

    return (torch.finfo(dtype).eps / torch.finfo(torch.float32).eps) ** 0.5


def half_tolerances(atol: float, rtol: float, dtype: Any) -> tuple[float, float]:
    """The parity tolerances for a half-precision run: the float32 ones times √(ε_dtype / ε_float32).

    float16: ×√8192 ≈ 90.5 (defaults → atol 9.1e-4, rtol 9.1e-3 ≈ 9 float16 ulps of the output scale);
    bfloat16: ×√65536 = 256 (defaults → atol 2.6e-3, rtol 2.6e-2 ≈ 3 bfloat16 ulps).
    Why not linear in ε: the float32 defaults allow ~840 float32 ulps, which at float16 would be the
    whole precision (rtol 0.8) and judge nothing. The tolerance is only the first bar: an output that
    misses it still passes when within the noise-floor rule (:mod:`normswap.parity.rule`), i.e. no
    worse than 4× the original's own half-precision error against its float64 copy on the same inputs.
    Applies to user-given ``atol``/``rtol`` too (they are read as float32 tolerances)."""
    f = _eps_factor(dtype)
    return atol * f, rtol * f


def _cast_floats(x: Any, dtype: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_cast_floats(v, dtype) for v in x)
    return x
