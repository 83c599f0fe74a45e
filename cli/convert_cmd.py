"""``normswap convert``: load → rewrite → (export) → parity → outputs and report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

import normswap
from normswap import validate
from normswap.atomic import staging_dir
from normswap.recover import DEFAULT_LR
from normswap.report import build_report, sites_table

from .calibrate_cmd import (
    DEFAULT_CALIB_BATCH,
    CalibBatchOpt,
    CalibOpt,
    CalibSamplesOpt,
    LrOpt,
    RecoverBatchOpt,
    RecoverStepsOpt,
    SeedOpt,
    keep_function_step,
    plot_path,
)
from .common import (
    ArgOpt,
    AtolOpt,
    DebugOpt,
    JsonOpt,
    ModelArg,
    NoStrictOpt,
    RtolOpt,
    SamplesOpt,
    ShapeOpt,
    TrustOpt,
    WeightsOpt,
    console,
    err_console,
    example_input,
    guarded,
    input_shape,
    load,
    load_samples,
    print_json,
    torchrun_aware,
    validate_options,
    verdict_exit_code,
    write_json,
)


@guarded
@torchrun_aware("onnx", "save", "report")
def convert(
    model: ModelArg = None,
    to: Annotated[str, typer.Option("--to", "-t", help="fold, or a norm target (see `normswap targets`).")] = "fold",
    onnx: Annotated[Optional[Path], typer.Option("--onnx", "-o", help="write the rewritten model as ONNX here (only if parity passes).")] = None,
    save: Annotated[Optional[Path], typer.Option("--save", help="save the conversion (safetensors + JSON record) into this directory.")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="write the JSON report here.")] = None,
    arg: ArgOpt = [],
    weights: WeightsOpt = None,
    trust_pickle: TrustOpt = False,
    no_strict: NoStrictOpt = False,
    input_shape_: ShapeOpt = None,
    samples: SamplesOpt = None,
    groups: Annotated[Optional[int], typer.Option("--groups", help="GroupNorm groups (default: 32, else the divisor of C closest to it).")] = None,
    exporter: Annotated[str, typer.Option("--exporter", help="auto, dynamo or torchscript.")] = "auto",
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default chosen per exporter).")] = None,
    atol: AtolOpt = normswap.parity.DEFAULT_ATOL,
    rtol: RtolOpt = normswap.parity.DEFAULT_RTOL,
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="write the ONNX even when parity fails.")] = False,
    calib: CalibOpt = None,
    calib_samples: CalibSamplesOpt = None,
    calib_batch: CalibBatchOpt = DEFAULT_CALIB_BATCH,
    recover_steps: RecoverStepsOpt = 0,
    recover_batch: RecoverBatchOpt = None,
    seed: SeedOpt = 0,
    lr: LrOpt = DEFAULT_LR,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rewrite the model's BatchNorms (fold them, or swap them for another norm), export, verify."""
    # every option and output path is checked before any work: nothing is written, then refused
    validate_options(atol=atol, rtol=rtol, groups=groups, calib_samples=calib_samples, calib_batch=calib_batch,
                     recover_steps=recover_steps, recover_batch=recover_batch, lr=lr, input_shape=input_shape_)
    validate.output_paths(
        {"--onnx": onnx, "--report": report, "--report's drift plot": plot_path(report, None), "--save": save},
        {"--weights": weights, "--samples": samples, "--calib": calib, "MODEL": validate.spec_path(model)},
        directories=("--save",),
    )
    times: dict[str, float] = {}
    t = time.perf_counter()
    loaded = load(model, arg, weights, trust_pickle, no_strict)
    times["load"] = time.perf_counter() - t
    shape, shape_src = input_shape(loaded, input_shape_)
    validate.input_size(shape)
    x = example_input(shape)
    extra = load_samples(samples)

    t = time.perf_counter()
    # verify=False: the parity stage below checks every exact rewrite at batches 1 and 3 (noise floor
    # included) and, unlike a raised error, still writes the report and honours --keep-failed
    conv = normswap.rewrite(
        loaded.model, to, (x,), groups=groups, atol=atol, rtol=rtol, verify=False,
        source={"spec": loaded.spec, "args": loaded.args, "weights": loaded.weights},
    )
    times["rewrite"] = time.perf_counter() - t
    kept = None
    if calib is not None or recover_steps:
        t = time.perf_counter()
        kept = keep_function_step(loaded, conv, calib=calib, samples=calib_samples, batch=calib_batch,
                                  recover_steps=recover_steps, recover_batch=recover_batch, seed=seed, lr=lr, report=report, save=save,
                                  progress=not json_out)
        times["calibrate"] = time.perf_counter() - t

    exported = None
    if onnx is not None:
        with staging_dir(onnx) as tmp:
            t = time.perf_counter()
            # parity right below runs every pair at batch 1 and 3: no need for the exporter's own check
            exported = normswap.export_onnx(conv.model, (x,), tmp / onnx.name, exporter=exporter, opset=opset, verify=False)
            times["export"] = time.perf_counter() - t
            parity = _parity(loaded.model, conv, tmp / onnx.name, shape, extra, atol, rtol, times)
            if parity or keep_failed:  # "nothing compared" proves nothing: kept only on request too
                exported.move_into(onnx.parent)
    else:
        parity = _parity(loaded.model, conv, None, shape, extra, atol, rtol, times)

    if save is not None:
        normswap.save_conversion(conv, save)
    model_info = {"spec": loaded.spec or "normswap.models.digits:digits_resnet (bundled)", "args": loaded.args,
                  "weights": loaded.weights, "input_shape": list(shape), "input_shape_from": shape_src, "notes": loaded.notes}
    extra_rep = {} if kept is None else {"keep_function": kept.to_dict()}
    if to != "fold":  # the point of most swaps: show it, measured, next to the original's behaviour
        from normswap.checks import batch_independence

        if kept is None:  # after calibration the held-out agreement above says more than random inputs
            extra_rep["drift_vs_original"] = _drift(loaded.model, conv.model, shape, extra, parity)
        extra_rep["batch_independence"] = {
            "original": batch_independence(loaded.model, shape).to_dict(),
            "rewritten": batch_independence(conv.model, shape).to_dict(),
        }
    rep = build_report(conv, model=model_info, export=exported, parity=parity, timings=times, extra=extra_rep)
    if report is not None:
        write_json(report, rep)

    if json_out:
        print_json(rep)
    else:
        for note in loaded.notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        if kept is not None:
            console.print(kept)
        _print_summary(conv, exported, parity, onnx, save, report, times)
        if "batch_independence" in extra_rep:
            bi = extra_rep["batch_independence"]
            console.print(
                "batch independence (training mode, sample alone vs in a batch of 8): original "
                f"{'yes' if bi['original']['independent'] else 'no'} (diff {bi['original']['max_rel_diff']:.1e}), "
                f"rewritten {'yes' if bi['rewritten']['independent'] else 'no'} (diff {bi['rewritten']['max_rel_diff']:.1e})"
            )
        if "drift_vs_original" in extra_rep:
            d = extra_rep["drift_vs_original"]
            console.print(f"drift vs the original (eval, batches 1 and 3{' + samples' if extra is not None else ''}): "
                          f"max rel err {d['max_rel']:.2e}" + (f", top-1 agreement {d['top1']:.1%}" if d["top1"] is not None else ""))
        if to != "fold":
            info = conv.target_info()
            console.print(f"target '{to}': {info['summary']}; "
                          + ("exact: reproduces the original eval function" if info["exact"] else
                             "changes the function: calibrate (--calib) or fine-tune to recover accuracy"))
    if parity is not None and not parity:
        if onnx is not None and not keep_failed:
            why = "nothing was compared" if parity.nothing_compared else "parity failed"
            err_console.print(f"{why}: {onnx} was not written (pass --keep-failed to write it anyway)")
        raise typer.Exit(verdict_exit_code(parity))


def _drift(original, rewritten, shape, samples, parity=None) -> dict:
    """How far the swap moved the outputs (informational, not a pass/fail). An exact target's parity
    check already compared original and rewritten on these inputs: its numbers are reused."""
    from normswap.parity import PAIR_ORIGINAL_REWRITTEN

    stats = [s for s in (parity.stats if parity is not None else []) if s.pair == PAIR_ORIGINAL_REWRITTEN]
    if not stats:
        stats = normswap.check_parity(original, rewritten, None, input_shape=shape, samples=samples).stats
    top1 = [s.top1 for s in stats if s.top1 is not None]
    return {"max_rel": max(s.max_rel for s in stats), "top1": min(top1) if top1 else None}


def _parity(original, conv, onnx_path, shape, samples, atol, rtol, times):
    """None when there is nothing that must match: a function-changing swap with no export."""
    if not conv.exact and onnx_path is None:
        return None
    t = time.perf_counter()
    if conv.exact:
        res = normswap.check_parity(original, conv.model, onnx_path, input_shape=shape, samples=samples, atol=atol, rtol=rtol)
    else:
        # the target changes the function on purpose: what must hold is rewritten ↔ onnxruntime
        res = normswap.check_parity(conv.model, None, onnx_path, input_shape=shape, samples=samples, atol=atol, rtol=rtol,
                                    reference_name="rewritten")
        res.notes.append(f"'{conv.to}' changes the model's function by design: parity checks the export only")
    if res.verdict == "failed" and conv.exact:
        res.divergence = conv.divergence(original, shape, atol=atol, rtol=rtol)
    times["parity"] = time.perf_counter() - t
    return res


def _print_summary(conv, exported, parity, onnx, save, report, times) -> None:
    rows = [a.to_dict() for a in conv.actions]
    counts = ", ".join(f"{n} {k}" for k, n in conv.summary().items())
    # the plain cases are summed up; every site that needed something else is listed with why
    plain = {"into-producer"} if conv.to == "fold" else set()
    special = [r for r in rows if r["action"] not in plain or r.get("notes")]
    console.print(f"normswap convert --to {conv.to}: {len(rows)} norm site(s): {counts}")
    if special:
        console.print(sites_table(special, title="sites needing more than a plain rewrite"))
    if parity is not None and parity.stats:
        console.print(parity)
    if exported is not None:
        bn = exported.op_counts.get("BatchNormalization", 0)
        nodes = sum(exported.op_counts.values())
        where = onnx if (parity or onnx is None) else "(not written)"
        console.print(f"ONNX: {where} — {nodes} nodes, {bn} BatchNormalization, exporter {exported.exporter}, opset {exported.opset}")
    if save is not None:
        console.print(f"saved conversion: {save}")
    if report is not None:
        console.print(f"report: {report}")
    total = sum(times.values())
    verdict = "DONE (nothing to verify: no export of a function-changing swap)" if parity is None else parity.verdict.upper()
    console.print(f"{verdict}: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()) + f" (total {total:.2f}s)")
