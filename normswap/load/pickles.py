"""Trust rules for pickled files: weights-only ``torch.load`` and why a file is refused.

A pickle that weights-only loading refuses is reported as ``pickle refused: 'FILE' imports
mod.name, ...`` naming the global it imports (read statically from the file, never executed),
whichever form the file has (zip or legacy ``torch.save``, a plain ``pickle.dump``, GLOBAL or
STACK_GLOBAL opcodes); torch's own warnings are silenced so the refusal is the only line.

A whole pickled ``nn.Module`` (:func:`load_pickled_module`) runs arbitrary code when loaded, so it
is refused unless ``trust_pickle`` (``--trust-pickle``) is given.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from normswap.errors import InputError

from .common import _describe_exc, _error, _existing_file, _one_line

def _is_torchscript_zip(path: Path) -> bool:
    """True if ``path`` is a TorchScript archive (``torch.jit.save``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


_TORCHSCRIPT_MSG = (
    "'{path}' is a TorchScript archive (torch.jit.save); normswap rewrites Python modules with "
    "torch.fx, so pass the Python model as MODEL (pkg.mod:fn or file.py:fn) and its weights as "
    "a state_dict (--weights)"
)


_DANGEROUS_MODULES = frozenset(
    {
        "os", "posix", "nt", "sys", "subprocess", "builtins", "__builtin__", "shutil", "socket",
        "importlib", "runpy", "pickle", "_pickle", "marshal", "ctypes", "code", "codeop", "pty",
        "webbrowser", "multiprocessing", "signal", "io", "_io", "codecs", "types", "functools",
        "operator", "pdb", "bdb", "timeit", "asyncio", "http", "urllib", "platform", "commands",
        "popen2", "tempfile", "glob", "pathlib", "posixpath", "ntpath", "zipimport", "ensurepip",
        "pip", "setuptools", "distutils", "threading", "_thread", "gc", "inspect",
    }
)
"""Modules whose globals in a pickle mean code execution, not data (anything can be a gadget,
but these are what exploits use); a refusal naming one of them gets the plain "pickle refused"
message rather than the "whole pickled model" advice."""

_DATA_MODULES = ("numpy", "argparse", "collections", "datetime", "decimal", "fractions", "enum", "omegaconf")
"""Modules whose globals in a checkpoint are usually harmless extra data (an epoch counter as a
numpy scalar, the training ``argparse.Namespace``) that weights-only loading still refuses."""


def _refused_global_in_message(exc: BaseException) -> str | None:
    """The global named in a weights-only unpickling refusal message, if any.

    torch 2.14 words it ``Unsupported global: GLOBAL mod.name was not an allowed global`` (with
    ``builtins.`` stripped: ``GLOBAL eval``) or ``Trying to load unsupported GLOBAL posix.system
    whose module posix is blocked``."""
    text = str(exc)
    m = re.search(r"unsupported GLOBAL ([\w.]+) whose module", text)
    if m:
        return m.group(1)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        name = m.group(1)
        return name if "." in name else f"builtins.{name}"
    return None


def _pickle_stream_globals(data: Any, limit: int) -> list[str]:
    """The globals (``module.name``) one pickle in ``data`` (a binary file object) refers to.

    Read statically with :func:`pickletools.genops` -- nothing is imported or executed.
    ``STACK_GLOBAL`` (protocol 4+) takes its two names from the strings pushed before it
    (directly or through the memo)."""
    import _compat_pickle
    import pickletools

    found: list[str] = []
    pushed: list[Any] = []
    memo: dict[int, Any] = {}
    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name in ("GLOBAL", "INST") and isinstance(arg, str):
            module, _, attr = arg.partition(" ")
            # protocol <= 2 pickles spell Python 3 modules the Python 2 way (__builtin__)
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            found.append(f"{module}.{attr}")
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            if isinstance(module, str) and isinstance(attr, str):
                found.append(f"{module}.{attr}")
            pushed = pushed[:-2] + [None]
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(arg)))
        elif name in ("FRAME", "PROTO", "STOP"):
            pass
        elif isinstance(arg, str) and ("UNICODE" in name or "STRING" in name):
            pushed.append(arg)
        else:
            pushed.append(None)
        if len(pushed) > 64:
            del pushed[:-16]
        if len(found) >= limit:
            break
    return found


def _pickle_globals(path: Path, limit: int = 10_000) -> list[str]:
    """Every global a torch file's pickle refers to, read statically (best effort, never raises).

    A zip file (``torch.save`` default) holds its pickle in ``<archive>/data.pkl``; a legacy file
    (``_use_new_zipfile_serialization=False``, or a plain ``pickle.dump``) is a few pickles in a
    row (magic number, protocol, sys info, the object) followed by raw storage bytes."""
    import io

    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if names:
                    with zf.open(names[0]) as fh:
                        found.extend(_pickle_stream_globals(io.BufferedReader(fh), limit))  # type: ignore[arg-type]
            return found
        with open(path, "rb") as fh:
            for _ in range(4):  # legacy torch files: magic, protocol, sys_info, then the object
                found.extend(_pickle_stream_globals(fh, limit))
    except Exception:  # noqa: BLE001 - a best-effort diagnosis: a corrupt pickle ends the scan
        pass
    return found


def _weights_only_allowed(glob: str) -> bool:
    """True if torch's weights-only unpickler accepts ``glob`` (its allowlist, or the user's)."""
    try:
        from torch import _weights_only_unpickler as wou

        return glob in wou._get_allowed_globals() or glob in wou._get_user_allowed_globals()
    except Exception:  # noqa: BLE001 - private API: fall back to "torch's own globals are fine"
        return glob.startswith("torch.") or glob in ("collections.OrderedDict", "_codecs.encode")


def _is_dangerous_global(glob: str) -> bool:
    """A global that means code execution rather than data: a function (lower-case name) or
    anything from :data:`_DANGEROUS_MODULES` -- never a class of a model or of numpy."""
    module, _, attr = glob.rpartition(".")
    top = module.split(".")[0]
    if top in _DANGEROUS_MODULES:
        return True
    if top in _DATA_MODULES or top == "torch":
        return False
    return bool(attr) and not attr[:1].isupper()


def _refused_global(path: Path, exc: BaseException) -> str | None:
    """The global that a weights-only ``torch.load`` of ``path`` refused (or would refuse).

    From torch's message when it names one; the file's pickle is also read statically, because
    torch stops at the first refused global (a harmless-looking class may come before
    ``os.system``) and some refusals (``Unsupported operand 149`` for a protocol-4 pickle) name
    none.  A dangerous global (:func:`_is_dangerous_global`) anywhere in the file wins."""
    named = _refused_global_in_message(exc)
    if named is None and not isinstance(exc, pickle.UnpicklingError):
        return None
    refused = [g for g in _pickle_globals(path) if not _weights_only_allowed(g)]
    dangerous = [g for g in refused if _is_dangerous_global(g)]
    if dangerous:
        return dangerous[0]
    return named if named is not None else (refused[0] if refused else None)


def _pickle_refused(path: Path, glob: str) -> InputError:
    """The refusal of a file whose pickle imports a code-executing global."""
    return _error(
        f"pickle refused: '{path}' imports {glob}, which weights-only loading does not allow; "
        "pass --trust-pickle only for files you trust"
    )


def _quiet_torch_load(path: Path, *, weights_only: bool) -> Any:
    """``torch.load`` on the CPU with its warnings silenced (a legacy or protocol-4 file makes the
    weights-only unpickler warn before it refuses: the refusal is the one line the user sees)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def _torch_load_weights_only(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into one-line InputError."""
    if _is_torchscript_zip(path):
        raise _error(_TORCHSCRIPT_MSG.format(path=path))
    try:
        return _quiet_torch_load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader failure is bad input here
        raise _torch_load_error(path, exc, what) from exc


def _torch_load_error(path: Path, exc: BaseException, what: str) -> InputError:
    """Explain why a weights-only ``torch.load`` of ``path`` failed."""
    if "TorchScript" in str(exc) or _is_torchscript_zip(path):
        return _error(_TORCHSCRIPT_MSG.format(path=path))
    glob = _refused_global(path, exc)
    if glob is not None:
        if _is_dangerous_global(glob):
            return _pickle_refused(path, glob)
        if glob.split(".")[0] in _DATA_MODULES:
            return _error(
                f"pickle refused: {what} '{path}' holds non-tensor Python objects ({glob}) that "
                "weights-only loading does not allow (unpickling can run arbitrary code); pass "
                "--trust-pickle only if you trust the file, or re-save just the tensors "
                "(torch.save(model.state_dict(), path))"
            )
        return _error(
            f"pickle refused: {what} '{path}' holds a pickled Python object ({glob}), likely a "
            "whole pickled model rather than a state_dict; unpickling it can run arbitrary code, "
            "so pass --trust-pickle only if you trust the file, or re-save it with "
            "torch.save(model.state_dict(), path) (or as .safetensors)"
        )
    if isinstance(exc, EOFError) or "central directory" in str(exc):
        return _error(
            f"{what} '{path}' is truncated or corrupt (not a readable torch file); "
            "re-save or re-download it"
        )
    if isinstance(exc, pickle.UnpicklingError) and "WeightsUnpickler error:" in str(exc):
        detail = str(exc).split("WeightsUnpickler error:", 1)[1].split(".")[0]
        return _error(
            f"{what} '{path}' is not a weights-only torch file ({_one_line(detail, 150)}); "
            "pass --trust-pickle only if you trust the file, or re-save it with torch.save"
        )
    return _error(
        f"{what} '{path}' could not be read as a torch file ({_describe_exc(exc)}); "
        "it may be corrupt or in another format: re-save or re-download it"
    )


def load_pickled_module(path: str | Path, *, trust_pickle: bool) -> torch.nn.Module:
    """Load a whole pickled ``nn.Module`` (``torch.save(model, path)``); needs ``trust_pickle``."""
    p = _existing_file(path, "model file")
    if _is_torchscript_zip(p):
        raise _error(_TORCHSCRIPT_MSG.format(path=p))
    if not trust_pickle:
        try:
            _quiet_torch_load(p, weights_only=True)
        except Exception as exc:  # noqa: BLE001
            glob = _refused_global(p, exc)
            if glob is None:
                raise _torch_load_error(p, exc, "model file") from exc
            if _is_dangerous_global(glob):
                raise _pickle_refused(p, glob) from None
            raise _error(
                f"pickle refused: model file '{p}' is a pickled Python object ({glob}); loading it "
                "runs arbitrary code from the file, so it is refused: pass --trust-pickle only if "
                "you trust the file, or give the model as pkg.mod:fn / file.py:fn with --weights "
                "state_dict"
            ) from None
        raise _error(
            f"model file '{p}' holds weights (tensors), not a model; give the architecture as "
            f"MODEL (pkg.mod:fn or file.py:fn) and pass this file as --weights"
        )
    try:
        obj = _quiet_torch_load(p, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, (ModuleNotFoundError, AttributeError)):
            raise _error(
                f"model file '{p}' refers to code that cannot be imported here "
                f"({_describe_exc(exc)}); make the model's module importable (PYTHONPATH) or "
                "use pkg.mod:fn with --weights"
            ) from exc
        raise _error(
            f"model file '{p}' could not be unpickled ({_describe_exc(exc)}); it may be "
            "truncated or corrupt: re-save or re-download it"
        ) from exc
    if not isinstance(obj, torch.nn.Module):
        kind = "a state_dict-like dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise _error(
            f"model file '{p}' holds {kind}, not an nn.Module; give the architecture as MODEL "
            "(pkg.mod:fn or file.py:fn) and pass this file as --weights"
        )
    return obj
