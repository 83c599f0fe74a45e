"""``run_comparison``: every requested target side by side (``normswap compare``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from normswap.defaults import DEFAULT_CALIB_BATCH
from normswap.progress import NullProgress

from .stages import example_input, example_shape, load_stage, spec_file

__all__ = ["run_comparison"]


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
    output_kind: str | None = None,
    heldout: Any = None,
    latency_budget: float | None = None,
    decode: Any = None,
    decode_tol: float | None = None,
    device: Any = "auto",
    workers: int = 0,
    size: Any = None,
    crop: float | None = None,
    mean: Any = None,
    std: Any = None,
) -> Any:
    """Every requested target side by side on one model (:func:`normswap.compare.compare_targets`):
    the same validate → load stages as :func:`run_conversion`, calibration data and held-out data
    chosen the same way, the report written last. ``batch_sizes`` / ``batch_samples``: the batch-size
    sweep (passed through); ``plot``: its PNG, written with the report. ``heldout`` (``--heldout DATA``):
    the held-out data every quality number is measured on (default: the model's known held-out set, else
    20% of the calibration data, seeded); ``output_kind``: see :mod:`normswap.keep.kinds`;
    ``latency_budget``: the recommendation's limit, × the folded model's latency (default 2.0).
    ``device``: where calibration and the agreement measures run (:mod:`normswap.pipeline.runtime`; the
    rewrites, ONNX latency and the batch sweep stay on the CPU); ``workers``, ``size``, ``crop``, ``mean``,
    ``std``: how an image folder given to ``calib`` is read;
    ``decode`` / ``decode_tol``: rank by agreement read through a decoder (default: the model's ``normswap_decode``)."""
    from normswap import validate
    from normswap.compare import batch_sizes_from, compare_targets
    from normswap.errors import InputError

    progress = progress or NullProgress()
    names = [t.strip() for t in targets if t and t.strip()]
    if not names:
        raise InputError("--targets is empty; e.g. --targets fold,gn-ws,ln,sn")
    validate.options(groups=groups, calib_samples=calib_samples, calib_batch=calib_batch, runs=runs, threads=threads)
    from normswap.keep.heldout import check_options

    check_options(output_kind, heldout, calib, decode, decode_tol)
    validate.runtime_options(device=device, workers=workers, size=size, crop=crop, mean=mean, std=std, calib=calib)
    if latency_budget is not None:
        validate.finite_positive("--latency-budget", latency_budget)
    sizes = None if batch_sizes is None else batch_sizes_from(batch_sizes)
    if sizes is not None:
        validate.positive_int("--batch-samples", batch_samples)
    elif plot is not None:
        raise InputError("--plot draws the batch-size sweep; add --batch-sizes (e.g. --batch-sizes 1,2,8,32)")
    validate.output_paths({"--report": report, "--plot": plot}, {"--weights": weights, "--calib": calib if isinstance(calib, (str, Path)) else None,
                                                  "MODEL": spec_file(model), "--heldout": heldout if isinstance(heldout, (str, Path)) else None})
    with progress.stage("load", detail=str(model) if isinstance(model, str) else ""):
        loaded = load_stage(model, args=args, weights=weights, trust_pickle=trust_pickle, strict=strict)
    from .image_lists import refuse_image_lists

    refuse_image_lists(loaded.model, "compare")
    for n in loaded.notes:
        progress.note(n)
    shape, _ = example_shape(loaded, input_shape)
    x = example_input(shape)
    from .runtime import runtime_for

    run = runtime_for(device, None, workers, size=size, crop=crop, mean=mean, std=std)
    data = heldout = hname = None
    if calib is not None:
        data = run.batches(calib, samples=calib_samples, batch=calib_batch, model=loaded.model, spec=loaded.spec)
        from normswap.keep.heldout import heldout_data

        heldout, hname = heldout_data(heldout, model, loaded, batch=calib_batch, **run.loader(loaded.spec))
        if isinstance(heldout, tuple) and len(heldout) == 2:  # labelled (x, y): the inputs
            hx = heldout[0]
            heldout = [(hx[i:i + 256],) for i in range(0, len(hx), 256)]
    if data is not None and (decode is not None or decode_tol is not None):
        from normswap.keep.kinds import detect

        output_kind = detect(loaded.model, heldout if heldout is not None else data, output_kind, max_batches=1,
                             decode=decode, decode_tol=decode_tol)
    rep = compare_targets(loaded.model, names, (x,), calib=data, heldout=heldout, heldout_name=hname, groups=groups,
                          latency=latency, runs=runs, threads=threads, progress=progress,  # one stage per target
                          batch_sizes=sizes, batch_samples=batch_samples, output_kind=output_kind, device=run.device,
                          **({} if latency_budget is None else {"latency_budget": latency_budget}),
                          model_name=loaded.spec or ("bundled digits ResNet" if isinstance(model, (str, type(None))) else type(loaded.model).__name__))
    rep.runtime = run.to_dict(data)
    if plot is not None and write and rep.batch_sweep is not None:
        rep.batch_sweep.save_plot(plot)
    if report is not None and write:
        import json

        from normswap.atomic import atomic_write_text

        atomic_write_text(report, json.dumps(rep.to_dict(), indent=2, default=str))
    return rep

