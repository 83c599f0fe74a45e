"""Stages shared by the jobs: loading a model or spec, the held-out data normswap knows, output names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

__all__ = ["BUNDLED_NAME", "load_stage", "example_shape", "example_input", "heldout_for", "drift_plot_path"]

BUNDLED_NAME = "normswap.models.digits:digits_resnet (bundled)"


def load_stage(model: Any, *, args: Mapping[str, Any] | None = None, weights: Any = None, trust_pickle: bool = False,
               strict: bool = True) -> Any:
    """A :class:`~normswap.load.LoadedModel` from a spec (None = the bundled model) or an nn.Module."""
    from torch import nn

    from normswap.errors import InputError
    from normswap.load import LoadedModel, _input_shape, load_model

    if isinstance(model, nn.Module):  # the caller's module: used as it is (every pass works on a copy)
        if weights is not None:
            raise InputError("weights= applies to a model spec; load them into your module yourself")
        return LoadedModel(model=model, spec=None, args={}, weights=None, input_shape=_input_shape(model), notes=[],
                           random_init=False)
    if isinstance(model, (str, Path)) and saved_conversion_dir(model):
        return load_saved(Path(model), args=args, weights=weights)
    return load_model(model, args=dict(args or {}), weights=weights, trust_pickle=trust_pickle, strict=strict)


def saved_conversion_dir(model: Any) -> bool:
    """Whether MODEL names a saved conversion directory (``--save DIR``: conversion.json + weights)."""
    from normswap.load.saved import CONVERSION_JSON

    return isinstance(model, (str, Path)) and Path(model).is_dir() and (Path(model) / CONVERSION_JSON).is_file()


def load_saved(directory: Path, *, args: Mapping[str, Any] | None = None, weights: Any = None) -> Any:
    """A saved conversion as the MODEL of a new conversion (e.g. a fine-tuned GN+WS model → ``--to fold``).

    Data only, as ``normswap recover`` reads it: the record is validated and hashed, and the architecture
    is the bundled digits model the record names; a record naming another model is refused (its spec is
    code the directory chooses) with the way to pass the model from Python."""
    from normswap.errors import InputError
    from normswap.load import LoadedModel, _input_shape
    from normswap.load.saved import load_conversion, read_record, uses_bundled_model

    if args or weights is not None:
        raise InputError(f"--arg / --weights apply to a model spec; {directory} is a saved conversion that holds its weights")
    rec = read_record(directory)
    if not uses_bundled_model(rec):
        spec = (rec.get("source") or {}).get("spec")
        raise InputError(
            f"{directory} is a conversion of {spec!r:.200}; a saved conversion never runs the code it names, so "
            f"convert reads only conversions of the bundled model: from Python, pass "
            f"run_conversion(model=load_conversion({str(directory)!r}, model=YOUR_MODEL).model, ...)")
    conv = load_conversion(directory, record=rec)
    model = conv.model.eval()
    shapes = rec.get("input_shapes") or []
    shape = tuple(shapes[0]) if shapes else _input_shape(model)
    note = (f"MODEL {directory}: a saved '{rec['to']}' conversion of the bundled digits ResNet (weights sha256 "
            f"{str(rec.get('weights_sha256'))[:12]}…), read as data")
    return LoadedModel(model=model, spec=None, args={}, weights=None, input_shape=shape, notes=[note], random_init=False)


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


def front_plot_path(plot: Any, report: Any) -> Path | None:
    """The front's PNG (``--front-latency``): ``plot`` when given, else beside the JSON report
    (``<report>.front.png``), else none (the table still prints)."""
    if plot is not None:
        return Path(plot)
    if report is not None:
        report = Path(report)
        return report.with_name(report.stem + ".front.png")
    return None


def spec_file(model: Any) -> str | None:
    from normswap import validate

    return validate.spec_path(model) if isinstance(model, str) else None


def example_shape(loaded: Any, given: Any = None, *, batch_sizes: tuple[int, ...] = (1, 3)) -> tuple[tuple[int, ...], str]:
    """The example input shape and where it came from: the caller's, else the model's own
    (``normswap_input_shape`` / timm's config), else the default — checked to be allocatable at the
    largest of ``batch_sizes`` (the parity batches by default)."""
    from normswap import validate
    from normswap.defaults import DEFAULT_INPUT_SHAPE

    if given is not None:
        shape, src = tuple(int(d) for d in given), "--input-shape"
    elif loaded.input_shape:
        shape, src = tuple(loaded.input_shape), "the model's default"
    else:
        shape, src = tuple(DEFAULT_INPUT_SHAPE), "default (pass --input-shape to change)"
    validate.input_size(shape, batch_sizes=batch_sizes)
    return shape, src


def example_input(shape: tuple[int, ...], dtype: Any = None) -> Any:
    """The seeded example input every job traces and exports with (float32, then cast to ``dtype``)."""
    import torch

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return x if dtype is None else x.to(dtype)
