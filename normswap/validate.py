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

__all__ = ["options", "output_paths", "positive_int", "non_negative_int", "finite_positive", "input_size", "spec_path"]

# the files `--save DIR` writes (normswap.saved); an output or input naming one of them collides
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
