"""Saved conversions are data, not code: ``model.safetensors`` + ``conversion.json``.

:func:`save_conversion` writes the rewritten model's weights (safetensors, no pickle) and a JSON
record of how it was made (target, options, refused sites, example input shapes, the model's source,
the weights' sha256 and a ``conversion_id``), atomically. :func:`load_conversion` re-applies the
recorded rewrite to the architecture and loads the weights strictly.

Nothing a directory names is ever imported or called unless the caller says so: the architecture
comes from the ``model`` argument, from the bundled digits model (a record whose ``source.spec`` is
null), or — only with ``trust_spec=True`` — from the record's ``source.spec``. Every field of the
record is validated before use, and the weights must have the sha256 the record carries.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import clean_leftovers, default_file_mode, staging_dir
from ..errors import InputError, first_line

if TYPE_CHECKING:
    from torch import nn

    from ..rewriting.convert import Conversion

__all__ = [
    "CONVERSION_JSON",
    "WEIGHTS_FILE",
    "SAVED_DIR_ENTRIES",
    "MAX_INPUT_ELEMENTS",
    "load_conversion",
    "read_record",
    "save_conversion",
    "untrusted_spec_message",
    "uses_bundled_model",
]

CONVERSION_JSON = "conversion.json"
WEIGHTS_FILE = "model.safetensors"
#: what a saved-conversion directory may hold (the CLI's recovery checkpoints and drift plot too);
#: saving into a directory with anything else is refused.
SAVED_DIR_ENTRIES = frozenset({CONVERSION_JSON, WEIGHTS_FILE, "recover-checkpoints", "drift.png"})
#: the largest example input a record may ask for (elements over all inputs: 1 GiB of float32).
MAX_INPUT_ELEMENTS = 2**28
#: options ``rewrite`` accepts from a record, with their validators.
_RECORD_OPTIONS = {"groups": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONVERSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_LEFTOVER = re.compile(r"^\..+\.normswap-\d+-[A-Za-z0-9_]+\.(?:tmp|tmpdir)$")


# ---------------------------------------------------------------------------------------------
# saving


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _check_target_dir(out: Path) -> None:
    """Refuse to save into a directory that holds anything but a saved conversion."""
    other = sorted(
        e.name for e in os.scandir(out) if e.name not in SAVED_DIR_ENTRIES and not _LEFTOVER.match(e.name)
    )
    if other:
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise InputError(
            f"cannot save a conversion into {out}: it holds other files ({shown}); save into a new or empty "
            "directory, or one that holds only a saved conversion"
        )


def save_conversion(conv: Conversion, directory: str | os.PathLike[str]) -> Path:
    """Write ``model.safetensors`` and ``conversion.json`` into ``directory``, atomically.

    A new directory is built beside it and renamed into place in one step. Into an existing one
    (allowed only when it holds nothing but a saved conversion) the weights are replaced first
    and the record last; the record carries the weights' sha256, so a crash in between is
    detected on load. The record keeps ``conv.conversion_id`` (a new one is made at first save).
    """
    from safetensors.torch import save_model

    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise InputError(f"--save {out} exists and is not a directory; choose a directory path")
    if out.is_dir():
        _check_target_dir(out)
        clean_leftovers(out.parent, out.name)  # a killed first save's staging directory beside it
    if not conv.conversion_id:
        conv.conversion_id = uuid.uuid4().hex
    record = conv.to_dict()
    record["skip"] = [a.site for a in conv.result.actions if not a.rewritten]
    record["conversion_id"] = conv.conversion_id

    def write(stage: Path) -> None:
        save_model(conv.model, str(stage / WEIGHTS_FILE))
        _fsync(stage / WEIGHTS_FILE)
        record["weights_sha256"] = _sha256(stage / WEIGHTS_FILE)
        (stage / CONVERSION_JSON).write_text(json.dumps(record, indent=2, default=str))
        _fsync(stage / CONVERSION_JSON)

    if not out.exists():
        with staging_dir(out) as stage:
            write(stage)
            for name in (WEIGHTS_FILE, CONVERSION_JSON):
                os.chmod(stage / name, default_file_mode())
            os.chmod(stage, 0o777 & ~_umask())
            try:
                os.rename(stage, out)  # one step: the directory appears complete or not at all
                return out
            except OSError as e:
                if not out.is_dir():
                    raise InputError(f"cannot create {out} ({first_line(e, 160)}); choose another path") from None
                _check_target_dir(out)  # created meanwhile by someone else: fall through
    with staging_dir(out / WEIGHTS_FILE) as stage:  # inside ``out``: same filesystem
        write(stage)
        for name in (WEIGHTS_FILE, CONVERSION_JSON):  # the record last: it names the weights' hash
            dest = out / name
            os.chmod(stage / name, (dest.stat().st_mode & 0o7777) if dest.is_file() else default_file_mode())
            os.replace(stage / name, dest)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# reading and validating


def _bad(rec_path: Path, field: str, what: str) -> InputError:
    return InputError(f"{rec_path}: field '{field}' {what}; the record was edited or is damaged: save the conversion again")


def _check_record(rec: Any, rec_path: Path) -> dict[str, Any]:
    """Validate every field load_conversion uses; return the record with defaults filled in."""
    if not isinstance(rec, dict):
        raise InputError(f"{rec_path} holds a JSON {type(rec).__name__}, not an object; save the conversion again")
    from ..rewriting.convert import targets

    to = rec.get("to")
    names = list(targets())
    if to is None:
        raise _bad(rec_path, "to", f"is missing (one of: {', '.join(names)})")
    if not isinstance(to, str) or to not in names:
        raise _bad(rec_path, "to", f"is {to!r:.80}, not a known target (one of: {', '.join(names)})")

    skip = rec.get("skip", [])
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise _bad(rec_path, "skip", "must be a list of site names (strings)")

    options = rec.get("options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise _bad(rec_path, "options", f"must be an object, not a {type(options).__name__}")
    for k, v in options.items():
        if k not in _RECORD_OPTIONS:
            raise _bad(rec_path, f"options.{k}"[:100], f"is not an option a saved conversion can carry (only: {', '.join(_RECORD_OPTIONS)})")
        if v is not None and not _RECORD_OPTIONS[k](v):
            raise _bad(rec_path, f"options.{k}", f"is {v!r:.80}, not an integer >= 1")
    options = {k: v for k, v in options.items() if v is not None}

    shapes = rec.get("input_shapes")
    if shapes is not None:
        ok = isinstance(shapes, list) and all(
            isinstance(s, list) and s and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s)
            for s in shapes
        )
        if not ok:
            raise _bad(rec_path, "input_shapes", "must be a list of shapes, each a non-empty list of positive integers")
        total = 0
        for s in shapes:
            n = 1
            for d in s:
                n *= d
            total += n
        if total > MAX_INPUT_ELEMENTS:
            raise _bad(rec_path, "input_shapes", f"asks for {total:,} input elements (at most {MAX_INPUT_ELEMENTS:,})")

    src = rec.get("source")
    if src is not None:
        if not isinstance(src, dict):
            raise _bad(rec_path, "source", f"must be an object or null, not a {type(src).__name__}")
        if src.get("spec") is not None and not isinstance(src["spec"], str):
            raise _bad(rec_path, "source.spec", "must be a string (package.module:callable or file.py:callable) or null")
        if src.get("args") is not None and not isinstance(src["args"], dict):
            raise _bad(rec_path, "source.args", "must be an object of keyword arguments")
        if src.get("weights") is not None and not isinstance(src["weights"], str):
            raise _bad(rec_path, "source.weights", "must be a path (string) or null")
        src = {**src, "args": src.get("args") or {}}

    cid = rec.get("conversion_id")
    if cid is not None and (not isinstance(cid, str) or not _CONVERSION_ID.match(cid)):
        raise _bad(rec_path, "conversion_id", "must be a short identifier (letters, digits, '-', '_')")
    digest = rec.get("weights_sha256")
    if digest is not None and (not isinstance(digest, str) or not _SHA256.match(digest)):
        raise _bad(rec_path, "weights_sha256", "must be 64 lowercase hex digits")
    return {**rec, "skip": skip, "options": options, "input_shapes": shapes, "source": src}


def read_record(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated ``conversion.json`` of a saved conversion whose weights match it (sha256).

    Raises :class:`InputError` naming the field and file for any problem. Runs no code."""
    d = Path(directory)
    rec_path, w_path = d / CONVERSION_JSON, d / WEIGHTS_FILE
    if not rec_path.is_file() or not w_path.is_file():
        raise InputError(f"{d} is not a saved conversion (needs {CONVERSION_JSON} and {WEIGHTS_FILE}); save one with --save DIR")
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{rec_path} is not valid JSON ({first_line(e, 160)}); save the conversion again") from None
    rec = _check_record(rec, rec_path)
    digest = rec.get("weights_sha256")
    if digest is None:
        if rec.get("conversion_id") is not None:  # written by this version: the hash must be there
            raise _bad(rec_path, "weights_sha256", "is missing")
        # a record from before weights were hashed: nothing to compare against
        import warnings

        warnings.warn(f"{rec_path} carries no weights hash (saved by an older normswap); re-save it to add one",
                      stacklevel=3)
    elif _sha256(w_path) != digest:
        raise InputError(
            f"{w_path} does not belong to {rec_path} (sha256 differs); the directory was edited or "
            "half-written: re-save the conversion"
        )
    return rec


def uses_bundled_model(rec: dict[str, Any]) -> bool:
    """Whether the record's model is normswap's bundled digits model (``source.spec`` null), which
    can be built without running anything the directory names."""
    from . import DEFAULT_MODEL_SPEC

    src = rec.get("source")
    return isinstance(src, dict) and src.get("spec") in (None, DEFAULT_MODEL_SPEC)


def untrusted_spec_message(directory: str | os.PathLike[str], rec: dict[str, Any]) -> str:
    """The one-line refusal to build a model from a record's spec without trust."""
    src = rec.get("source") or {}
    spec, args = src.get("spec"), src.get("args") or {}
    shown = repr(args)
    if len(shown) > 200:
        shown = shown[:199] + "…"
    return (
        f"{CONVERSION_JSON} in {directory} names its model as {spec!r:.200} with args {shown}; loading a saved "
        "conversion never runs code it names: pass the model (load_conversion(DIR, model=...) / normswap "
        "recover DIR MODEL) or trust_spec=True / --trust-spec if you trust this directory"
    )


# ---------------------------------------------------------------------------------------------
# loading


def load_conversion(
    directory: str | os.PathLike[str], model: nn.Module | None = None, *, trust_spec: bool = False,
    record: dict[str, Any] | None = None,
) -> Conversion:
    """Rebuild a saved conversion: ``model`` is rewritten with the recorded options (on a copy),
    then the saved weights are loaded strictly.

    Without ``model`` the architecture is the bundled digits model when the record says so;
    a record naming another model (``source.spec``) is imported and called only with
    ``trust_spec=True`` — otherwise :class:`InputError`. The record is validated and the weights
    must match its sha256. ``record``: what :func:`read_record` just returned for ``directory`` (the
    caller already validated and hashed it: not done twice)."""
    import torch
    from safetensors.torch import load_model

    from ..rewriting.convert import rewrite

    d = Path(directory)
    rec = read_record(d) if record is None else record
    src = rec["source"]
    if model is None:
        if src is None:
            raise InputError(
                f"{d / CONVERSION_JSON} does not name its model; pass the model: load_conversion(DIR, model=...) "
                "or normswap recover DIR MODEL"
            )
        if not uses_bundled_model(rec) and not trust_spec:
            raise InputError(untrusted_spec_message(d, rec))
        from . import load_model as load_spec

        model = load_spec(src.get("spec"), args=src["args"]).model
    shapes = rec["input_shapes"]
    inputs = tuple(torch.zeros(s) for s in shapes) if shapes else None
    conv = rewrite(model, rec["to"], inputs, skip=rec["skip"], verify=False, source=src, **rec["options"])
    try:
        load_model(conv.model, str(d / WEIGHTS_FILE), strict=True)
    except Exception as e:
        raise InputError(
            f"the saved weights {d / WEIGHTS_FILE} do not fit the re-applied conversion ({first_line(e, 200)}); "
            "load it with the same model and normswap version that saved it"
        ) from None
    conv.conversion_id = rec.get("conversion_id")
    return conv
