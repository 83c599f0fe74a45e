"""Refuse bad options before any work: output paths, numbers, input sizes.

Every check raises :class:`~normswap.errors.InputError` with one line naming the option, what is
wrong and what to do; none imports torch, so a command can run them all before it loads a model.
A pipeline that writes files calls :func:`output_paths` first, so an error about an output never
surfaces after another output was already written.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from normswap.errors import InputError

__all__ = ["options", "output_paths", "positive_int", "non_negative_int", "finite_positive", "input_size", "spec_path",
           "device_name", "amp_name", "image_size", "float_list", "crop_fraction", "runtime_options"]

# the files `--save DIR` writes (normswap.load.saved); an output or input naming one of them collides
SAVED_FILES = ("conversion.json", "model.safetensors")


def _key(p: Path) -> str:
    return os.path.normcase(str(p.expanduser().resolve(strict=False)))


def _nearest_existing(p: Path) -> Path:
    q = p
    while not q.exists() and q != q.parent:
        q = q.parent
    return q


def _check_writable(option: str, path: Path, where: Path) -> None:
    """``where``'s nearest existing ancestor must be a directory in which a file can be created."""
    anc = _nearest_existing(where)
    if not anc.is_dir():
        raise InputError(f"{option} {path}: {anc} is a file, not a directory; choose a path inside a directory")
    try:
        with tempfile.TemporaryFile(dir=anc, prefix=".normswap-probe-"):
            pass
    except OSError as e:
        raise InputError(f"{option} {path}: cannot write in {anc} ({e.strerror or e}); choose a writable location") from None


def output_paths(
    outputs: Mapping[str, str | os.PathLike[str] | None],
    inputs: Mapping[str, str | os.PathLike[str] | None] = {},  # noqa: B006 - read only
    *,
    directories: Iterable[str] = (),
) -> None:
    """Check every output path before anything is written.

    ``outputs`` maps an option name (``"--onnx"``) to its path (None = not given); the options in
    ``directories`` name directories (``--save``), the others files. Refused: a file output that is
    an existing directory, a directory output that is an existing file, a path below a file, a
    location where no file can be created, two outputs with the same path (including the files a
    ``--save`` directory holds), and an output that would overwrite an input (``inputs``).
    """
    dirs = set(directories)
    taken: dict[str, str] = {}  # resolved path -> the option that writes it
    for opt, raw in inputs.items():
        if raw is not None:
            taken[_key(Path(raw))] = f"the input {opt}"
    for opt, raw in outputs.items():
        if raw is None:
            continue
        p = Path(raw)
        if str(raw).strip() == "":
            raise InputError(f"{opt} is empty; give a path")
        if opt in dirs:
            if p.exists() and not p.is_dir():
                raise InputError(f"{opt} {p} exists and is a file; {opt} takes a directory path")
            _check_writable(opt, p, p)
            claims = [(p, opt)] + [(p / f, f"{opt}'s {f}") for f in SAVED_FILES]
        else:
            if p.is_dir():
                raise InputError(f"{opt} {p} is an existing directory; give a file path (a new name, or one inside it)")
            _check_writable(opt, p, p.parent)
            claims = [(p, opt)]
        for path, who in claims:
            k = _key(path)
            if k in taken:
                other = taken[k]
                verb = "would overwrite" if other.startswith("the input") else "is also"
                raise InputError(f"{who} {path} {verb} {other}; give each output its own path")
            taken[k] = who


def spec_path(spec: str | None) -> str | None:
    """The file a MODEL spec reads (``path/file.py:fn`` or a pickled ``model.pt``), if it names one."""
    if not spec:
        return None
    where = spec.rsplit(":", 1)[0] if ":" in spec.replace(":\\", "").replace(":/", "") else spec
    return where if Path(where).is_file() else None


def positive_int(option: str, value: int | None) -> None:
    """``value`` (when given) must be an integer ≥ 1."""
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
        raise InputError(f"{option} {value} must be a positive integer")


def non_negative_int(option: str, value: int | None) -> None:
    """``value`` (when given) must be an integer ≥ 0."""
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
        raise InputError(f"{option} {value} must be 0 or a positive integer")


def finite_positive(option: str, value: float | None, *, allow_zero: bool = False) -> None:
    """``value`` (when given) must be a finite number > 0 (≥ 0 with ``allow_zero``)."""
    if value is None:
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        need = "finite and non-negative" if allow_zero else "finite and positive"
        raise InputError(f"{option} {value} must be {need}")


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def input_size(shape: Sequence[int], *, batch_sizes: Sequence[int] = (1, 3), itemsize: int = 4,
               option: str = "--input-shape") -> None:
    """Refuse an example input that cannot be allocated: one input at the largest batch that will be
    run must fit in a quarter of this machine's memory (the model's activations need the rest)."""
    n = 1
    for d in shape[1:]:
        n *= int(d)
    need = n * max(max(batch_sizes, default=1), int(shape[0]) if shape else 1) * itemsize
    mem = _memory_bytes()
    if mem is not None and need > mem // 4:
        dims = ",".join(str(int(d)) for d in shape)
        raise InputError(
            f"{option} {dims} needs {need / 2**30:.1f} GiB for one input at batch {max(batch_sizes)}, more than a quarter "
            f"of this machine's {mem / 2**30:.1f} GiB; pass a smaller shape"
        )


#: option name -> its check, for :func:`options`
_CHECKS = {
    "groups": positive_int, "calib_samples": positive_int, "calib_batch": positive_int, "recover_batch": positive_int,
    "steps": positive_int, "runs": positive_int, "threads": positive_int, "checkpoint_every": positive_int,
    "recover_steps": non_negative_int, "lr": finite_positive, "temperature": finite_positive,
    "feature_weight": lambda o, v: finite_positive(o, v, allow_zero=True),
}


def options(*, atol: float | None = None, rtol: float | None = None, target_agreement: float | None = None, **values: object) -> None:
    """Check the numeric options shared by the commands and the pipeline (given ones only), each
    message naming the option as the CLI spells it (``--calib-batch``)."""
    for name, v in (("atol", atol), ("rtol", rtol)):
        if v is not None:
            finite_positive(f"--{name}", v, allow_zero=True)
    if target_agreement is not None and not 0.0 < float(target_agreement) <= 1.0:
        raise InputError(f"--target-agreement {target_agreement} must be in (0, 1], e.g. 0.99")
    for name, v in values.items():
        _CHECKS[name](f"--{name.replace('_', '-')}", v)  # type: ignore[operator]


# ---- where and how the model runs (torch-free: checked before any work) -----------------------

DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
AMP_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}


def device_name(value: str | None) -> str:
    """``--device``: ``auto`` (the GPU when there is one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``;
    returned normalized (lower case, no spaces). Whether the device exists is checked by
    :func:`normswap.devices.resolve_device` (it needs torch)."""
    text = "auto" if value is None else str(value).strip().lower()
    if text in ("auto", "cpu", "cuda", "mps"):
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return f"cuda:{int(text[5:])}"
    raise InputError(f"--device {value!r} is not a device; pass {DEVICE_FORMS}")


def amp_name(value: str | None) -> str | None:
    """``--amp``: None (float32), ``bf16`` or ``fp16`` (``bfloat16`` / ``float16`` accepted)."""
    if value is None or str(value).strip().lower() in ("", "off", "none", "fp32", "float32"):
        return None
    name = AMP_NAMES.get(str(value).strip().lower())
    if name is None:
        raise InputError(f"--amp {value!r} is not a precision; pass bf16 or fp16 (or omit it for float32)")
    return name


def image_size(value: str | int | Sequence[int] | None, option: str = "--size") -> tuple[int, int] | None:
    """``--size``: ``S`` (square) or ``H,W`` in pixels, each ≥ 1 and at most 8192."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        parts: list[object] = [value]
    elif isinstance(value, str):
        parts = [p.strip() for p in value.replace("x", ",").split(",")]
    else:
        parts = list(value)
    try:
        dims = [int(p) for p in parts if str(p) != ""]  # type: ignore[call-overload]
        ok = len(dims) in (1, 2) and all(str(int(p)) == str(p).strip() for p in parts)
    except (TypeError, ValueError):
        dims, ok = [], False
    if not ok or any(d < 1 or d > 8192 for d in dims):
        raise InputError(f"{option} {value!r} must be a side S or H,W in pixels (1 to 8192), e.g. 224 or 224,160")
    return (dims[0], dims[0]) if len(dims) == 1 else (dims[0], dims[1])


def crop_fraction(value: float | None, option: str = "--crop") -> float | None:
    """``--crop``: the center crop's share of the resized short side, in (0, 1] (timm's ``crop_pct``;
    0.875 = resize to 256, crop 224)."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and 0.0 < v <= 1.0):
        raise InputError(f"{option} {value!r} must be a fraction in (0, 1], e.g. 0.875 (resize 256, crop 224)")
    return v


def float_list(value: str | Sequence[float] | None, option: str, *, positive: bool = False) -> tuple[float, ...] | None:
    """``--mean`` / ``--std``: one value or one per channel (``0.485,0.456,0.406``), finite (``--std``: > 0)."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    try:
        vals = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        vals = ()
    if not vals or len(vals) > 4 or not all(math.isfinite(v) for v in vals) or (positive and min(vals) <= 0):
        need = "positive" if positive else "finite"
        raise InputError(f"{option} {value!r} must be 1 or one {need} number per channel, comma-separated, e.g. 0.5 or 0.485,0.456,0.406")
    return vals


def runtime_options(*, device: str | None = None, amp: str | None = None, workers: int | None = None,
                    size: object = None, crop: object = None, mean: object = None, std: object = None,
                    calib: object = None, recover_steps: int | None = None, amp_needs_steps: bool = True) -> None:
    """Every option of where the model runs and how image folders are read, checked together before
    any work: the forms above, and that the image options have a folder to apply to and ``--amp`` a
    recovery to run in."""
    device_name(device)
    precision = amp_name(amp)
    non_negative_int("--workers", workers)
    given = [o for o, v in (("--size", image_size(size)), ("--crop", crop_fraction(crop)),
                            ("--mean", float_list(mean, "--mean")), ("--std", float_list(std, "--std", positive=True)),
                            ("--workers", workers or None)) if v is not None]
    if given and not (isinstance(calib, (str, os.PathLike)) and Path(str(calib)).expanduser().is_dir()):
        what = "no --calib" if calib is None else f"--calib {calib} is not a folder"
        raise InputError(f"{given[0]} applies to a folder of images given to --calib, and {what}; drop {given[0]} "
                         "(tensor files, digits and module:callable data are read as they are)")
    if precision is not None and amp_needs_steps and not recover_steps:
        raise InputError(f"--amp {amp} is mixed precision for recovery; add --recover-steps N (calibration sums stay in float64)")
