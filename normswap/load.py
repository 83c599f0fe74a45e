"""Loading models and tensors safely: model specs, weights files, trust rules.

A MODEL spec is one of

* ``package.module:callable`` -- imported with importlib; the callable may be a dotted attribute
  path (``mod:Class.make``); it is called with the ``--arg key=value`` pairs and must return an
  ``nn.Module``;
* ``path/to/file.py:callable`` -- the file is executed as a module (its directory is on
  ``sys.path`` while it runs, so it can import its siblings), then as above;
* ``path/to/model.pt`` (``.pth``, ``.bin``, ``.ckpt``) -- a whole pickled ``nn.Module``; loading it
  runs arbitrary code, so it is refused unless ``trust_pickle`` (``--trust-pickle``) is given;
* ``None`` -- the bundled digits model (:data:`DEFAULT_MODEL_SPEC`).

Weights files are read without executing code: ``.safetensors`` with safetensors, torch files
(``.pt .pth .bin .ckpt .pth.tar``) with ``torch.load(weights_only=True)``.  Checkpoint wrappers
listed in :data:`CHECKPOINT_KEYS` are unwrapped (repeatedly), then :data:`EMA_CHECKPOINT_KEYS` if no
other is present, and the ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile)
prefixes are stripped when every key carries them.

A pickle that weights-only loading refuses is reported as ``pickle refused: 'FILE' imports
mod.name, ...`` naming the global it imports (read statically from the file, never executed),
whichever form the file has (zip or legacy ``torch.save``, a plain ``pickle.dump``, GLOBAL or
STACK_GLOBAL opcodes); torch's own warnings are silenced so the refusal is the only line.

A model built without weights and without a pretrained argument is checked for random weights
(built twice under different seeds, see :func:`load_model`): ``LoadedModel.random_init`` and a
note say so, since such a model can match no earlier export.

Every failure caused by the input raises :class:`~normswap.errors.InputError` with a one-line
message saying what is wrong and what to do.  torchvision and timm are never imported here.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from normswap.errors import InputError

__all__ = [
    "CHECKPOINT_KEYS",
    "DEFAULT_MODEL_SPEC",
    "EMA_CHECKPOINT_KEYS",
    "LoadedModel",
    "PRETRAINED_ARGS",
    "RANDOM_INIT_NOTE",
    "apply_state_dict",
    "load_model",
    "load_pickled_module",
    "load_state_dict_file",
    "load_tensor_file",
    "parse_kv_args",
    "resolve_callable",
]

DEFAULT_MODEL_SPEC = "normswap.models.digits:digits_resnet"
"""The model loaded when no MODEL spec is given (resolved lazily, on each call)."""

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pth.tar", ".pt.tar")
"""File endings read with ``torch.load``."""

MODEL_FILE_SUFFIXES = TORCH_SUFFIXES
"""A MODEL spec with one of these endings and no ``:`` names a whole pickled module."""

CHECKPOINT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "params",
)
"""Checkpoint wrapper keys unwrapped by :func:`load_state_dict_file`, first match wins."""

EMA_CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
"""EMA wrapper keys, used only when none of :data:`CHECKPOINT_KEYS` is present."""

STRIPPED_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes stripped when every key has them (DataParallel/DDP, torch.compile)."""

PRETRAINED_ARGS = (
    "pretrained",
    "weights",
    "pretrained_weights",
    "pretrained_path",
    "checkpoint_path",
    "checkpoint",
    "ckpt",
    "ckpt_path",
    "weights_path",
    "state_dict",
)
"""Builder arguments that, when set (not None/False/empty), make the builder load trained
weights: torchvision's ``weights=``, timm's ``pretrained`` / ``checkpoint_path`` and the like."""

RANDOM_INIT_NOTE = (
    "weights: random initialisation — pass --weights FILE (or the spec's pretrained argument) "
    "to load trained weights"
)
"""The note :func:`load_model` adds when the model's weights are a random initialisation."""

_MAX_UNWRAP = 8
_SHOW_KEYS = 5


@dataclass
class LoadedModel:
    """A loaded model (in ``eval()`` mode) and how it was obtained."""

    model: torch.nn.Module
    spec: str | None
    args: dict[str, Any]
    weights: str | None
    input_shape: tuple[int, ...] | None
    notes: list[str] = field(default_factory=list)
    #: True when the weights are a random initialisation: the spec was built without ``weights``
    #: and without a pretrained argument, and building it again under another seed gave other
    #: values (see :func:`load_model`).  Such a model cannot match any earlier export.
    random_init: bool = False


# --------------------------------------------------------------------------- helpers


def _one_line(text: object, limit: int = 300) -> str:
    """Collapse whitespace (and ANSI escapes) so ``text`` fits on one line, cut at ``limit``."""
    s = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _error(message: str) -> InputError:
    """An :class:`InputError` whose message is guaranteed to be one line."""
    return InputError(_one_line(message, limit=2000))


def _describe_exc(exc: BaseException) -> str:
    """``"TypeName: first part of the message"`` on one line."""
    msg = _one_line(exc, limit=200)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _show(keys: Sequence[str], n: int = _SHOW_KEYS) -> str:
    """The first ``n`` keys, comma separated, with ``", ..."`` if there are more."""
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def _natural_key(key: str) -> list[Any]:
    """Sort key comparing digit runs numerically (``x2 < x10``)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _existing_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path that exists and is a regular file, else :class:`InputError`."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(
            c.name
            for c in p.iterdir()
            if c.is_file() and _has_suffix(c, (*TORCH_SUFFIXES, ".safetensors", ".npy", ".npz"))
        )
        hint = f" (it contains: {_show(found)})" if found else ""
        raise _error(f"{what} '{p}' is a directory, not a file; pass the file itself{hint}")
    if not p.exists():
        raise _error(f"{what} '{p}' does not exist; check the path")
    if not p.is_file():
        raise _error(f"{what} '{p}' is not a regular file; pass a file")
    if p.stat().st_size == 0:
        raise _error(f"{what} '{p}' is empty (0 bytes); re-save or re-download it")
    return p


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


# --------------------------------------------------------------------------- specs


def parse_kv_args(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``["depth=18", "name=resnet18", "dims=(1,2)"]`` into keyword arguments.

    Values are read with :func:`ast.literal_eval`, falling back to the plain string; the words
    ``true``/``false``/``none``/``null`` (any case) mean ``True``/``False``/``None``, so that
    ``pretrained=false`` is not the (truthy) string ``"false"``.  Keys must be identifiers and
    appear once.
    """
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise _error(f"argument '{item}' is not key=value; write e.g. --arg depth=18")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key.isidentifier():
            raise _error(
                f"argument '{item}': '{key}' is not a valid keyword name; write e.g. --arg depth=18"
            )
        if key in out:
            raise _error(f"argument '{key}' is given twice; give each --arg key once")
        out[key] = _parse_value(raw.strip())
    return out


def _parse_value(raw: str) -> Any:
    """One ``--arg`` value: a Python literal, a true/false/none word, or the string itself."""
    words = {"true": True, "false": False, "none": None, "null": None}
    if raw.lower() in words:
        return words[raw.lower()]
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw


def _split_spec(spec: str) -> tuple[str, str]:
    """Split ``"where:attr.path"`` at its last colon (so ``C:\\dir\\f.py:fn`` works)."""
    where, sep, attr = spec.strip().rpartition(":")
    if not sep or not where or not attr or "/" in attr or "\\" in attr:
        raise _error(
            f"MODEL spec '{spec}' names no callable; write package.module:function or "
            "path/to/file.py:function (or a pickled model file .pt/.pth with --trust-pickle)"
        )
    if not all(part.isidentifier() for part in attr.split(".")):
        raise _error(
            f"MODEL spec '{spec}': '{attr}' is not a dotted Python name; write "
            "package.module:function or path/to/file.py:function"
        )
    return where, attr


def _is_file_spec(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where or where.startswith(".")


def _import_module(name: str, spec: str) -> Any:
    """Import ``name`` (retrying with the current directory on ``sys.path`` if not found)."""
    if not all(part.isidentifier() for part in name.split(".")):
        raise _error(
            f"MODEL spec '{spec}': '{name}' is not a module name; write package.module:function "
            "or path/to/file.py:function"
        )
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
            raise _error(
                f"importing '{name}' for MODEL spec '{spec}' failed: {_describe_exc(exc)}; "
                "install the missing dependency"
            ) from exc
        cwd = os.getcwd()
        top = name.split(".")[0]
        on_path = any(os.path.abspath(p or ".") == cwd for p in sys.path)
        if not on_path and (Path(cwd, top + ".py").is_file() or Path(cwd, top).is_dir()):
            sys.path.insert(0, cwd)
            try:
                return _import_module(name, spec)
            finally:
                sys.path.remove(cwd)
        raise _error(
            f"MODEL spec '{spec}': module '{exc.name}' not found; install it, check the "
            "spelling, or point to a file with path/to/file.py:function"
        ) from exc
    except InputError:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code failing at import
        raise _error(
            f"importing '{name}' for MODEL spec '{spec}' raised {_describe_exc(exc)}; fix the module"
        ) from exc


def _import_file(where: str, spec: str) -> Any:
    """Execute ``where`` (a .py file) as a module registered under a path-derived name."""
    path = Path(where).expanduser()
    if not path.name.endswith(".py"):
        raise _error(f"MODEL spec '{spec}': '{where}' is not a .py file; write path/to/file.py:function")
    if not path.is_file():
        raise _error(f"MODEL spec '{spec}': file '{path}' does not exist; check the path")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    mod_name = f"_normswap_user_{stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    mod_spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if mod_spec is None or mod_spec.loader is None:
        raise _error(f"MODEL spec '{spec}': cannot import '{path}' as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    # Registered so that dataclasses, pickling and relative lookups inside the file work.
    sys.modules[mod_name] = module
    parent = str(resolved.parent)
    sys.path.insert(0, parent)
    try:
        mod_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - user code failing at import
        del sys.modules[mod_name]
        hint = "install the missing dependency" if isinstance(exc, ImportError) else "fix the file"
        raise _error(f"running '{path}' for MODEL spec '{spec}' raised {_describe_exc(exc)}; {hint}") from exc
    finally:
        if parent in sys.path:
            sys.path.remove(parent)
    return module


def resolve_callable(spec: str) -> Callable[..., Any]:
    """The callable named by ``"package.module:attr.path"`` or ``"path/to/file.py:attr.path"``."""
    if not isinstance(spec, str) or not spec.strip():
        raise _error("MODEL spec is empty; write package.module:function or path/to/file.py:function")
    where, attr = _split_spec(spec)
    module = _import_file(where, spec) if _is_file_spec(where) else _import_module(where, spec)
    obj: Any = module
    walked: list[str] = []
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            owner = ".".join(walked) or where
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "check the name"
            raise _error(f"MODEL spec '{spec}': '{owner}' has no attribute '{part}'; {hint}") from None
        except Exception as exc:  # noqa: BLE001 - a property raising
            raise _error(f"MODEL spec '{spec}': reading '{part}' raised {_describe_exc(exc)}") from exc
        walked.append(part)
    if not callable(obj):
        raise _error(
            f"MODEL spec '{spec}': '{attr}' is a {type(obj).__name__}, not callable; name a "
            "function or class that returns an nn.Module"
        )
    return obj


# --------------------------------------------------------------------------- weights


def _unwrap_checkpoint(obj: Any, notes: list[str]) -> Any:
    """Peel checkpoint wrappers (``{"state_dict": {...}, "epoch": 3}``) off ``obj``."""
    path: list[str] = []
    for _ in range(_MAX_UNWRAP):
        if not isinstance(obj, Mapping):
            break
        key = next((k for k in CHECKPOINT_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            key = next((k for k in EMA_CHECKPOINT_KEYS if isinstance(obj.get(k), Mapping)), None)
        else:
            ema = [k for k in EMA_CHECKPOINT_KEYS if isinstance(obj.get(k), Mapping)]
            if ema:
                notes.append(f"the checkpoint also holds EMA weights under '{ema[0]}' (not used)")
        if key is None and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = [
                k
                for k, v in obj.items()
                if isinstance(v, Mapping) and any(isinstance(t, torch.Tensor) for t in v.values())
            ]
            key = inner[0] if len(inner) == 1 else None
        if key is None:
            break
        path.append(str(key))
        obj = obj[key]
    if path:
        notes.append("loaded from checkpoint key " + " -> ".join(f"'{k}'" for k in path))
    return obj


def _strip_prefixes(sd: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """Strip :data:`STRIPPED_PREFIXES` while every key carries one of them."""
    changed = True
    while changed and sd:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                notes.append(f"stripped '{prefix}' prefix from every key")
                changed = True
    return sd


def load_state_dict_file(
    path: str | Path, *, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a weights file into ``(state_dict, notes)`` without running code.

    ``.safetensors`` via safetensors; ``.pt .pth .bin .ckpt .pth.tar`` via
    ``torch.load(weights_only=True)`` (``weights_only=False`` only if ``trust_pickle``; a pickled
    ``nn.Module`` is then reduced to its ``state_dict()``).  Checkpoint wrappers are unwrapped,
    non-tensor entries dropped, and ``module.``/``_orig_mod.`` prefixes stripped (see module doc).
    """
    p = _existing_file(path, "weights file")
    notes: list[str] = []
    if _has_suffix(p, (".safetensors",)):
        obj: Any = _read_safetensors(p, "weights file", "re-save or re-download it")
    elif _has_suffix(p, TORCH_SUFFIXES):
        if trust_pickle:
            if _is_torchscript_zip(p):
                raise _error(_TORCHSCRIPT_MSG.format(path=p))
            try:
                obj = _quiet_torch_load(p, weights_only=False)
            except Exception as exc:  # noqa: BLE001
                raise _error(
                    f"weights file '{p}' could not be unpickled ({_describe_exc(exc)}); it may be "
                    "corrupt, or refer to classes that are not importable here"
                ) from exc
            if isinstance(obj, torch.nn.Module):
                notes.append("took state_dict() of the pickled module in the file (--trust-pickle)")
                obj = obj.state_dict()
        else:
            obj = _torch_load_weights_only(p, "weights file")
    else:
        raise _error(
            f"weights file '{p}' has an unknown extension; use .safetensors or a torch file "
            f"({', '.join(TORCH_SUFFIXES)})"
        )

    obj = _unwrap_checkpoint(obj, notes)
    if not isinstance(obj, Mapping):
        raise _error(
            f"weights file '{p}' holds a {type(obj).__name__}, not a dict of named tensors "
            "(state_dict); save model.state_dict()"
        )
    sd: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in obj.items():
        if isinstance(v, torch.Tensor) and isinstance(k, str):
            sd[k] = v
        else:
            dropped.append(str(k))
    if not sd:
        raise _error(
            f"weights file '{p}' contains no named tensors (top-level keys: "
            f"{_show([str(k) for k in obj.keys()]) or 'none'}); save model.state_dict()"
        )
    if dropped:
        notes.append(f"ignored {len(dropped)} non-tensor entries ({_show(dropped)})")
    return _strip_prefixes(sd, notes), notes


def _key_diff(
    model_keys: Sequence[str], file_keys: Sequence[str]
) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, tolerated)``; a missing ``num_batches_tracked`` is tolerated."""
    fset, mset = set(file_keys), set(model_keys)
    missing = [k for k in model_keys if k not in fset]
    tolerated = [k for k in missing if k.rsplit(".", 1)[-1] == "num_batches_tracked"]
    skip = set(tolerated)
    missing = [k for k in missing if k not in skip]
    unexpected = [k for k in file_keys if k not in mset]
    return missing, unexpected, tolerated


def _dot_prefixes(key: str) -> list[str]:
    """``"a.b.c"`` -> ``["a.", "a.b."]``."""
    parts = key.split(".")
    return [".".join(parts[:i]) + "." for i in range(1, len(parts))]


def _rekey_by_prefix(
    model_keys: Sequence[str], sd: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], str] | None:
    """Re-key ``sd`` by stripping or adding one dotted prefix if that makes the keys match exactly."""
    if not sd or not model_keys:
        return None
    first = next(iter(sd))
    for prefix in _dot_prefixes(first):  # the file has an extra prefix ("model." from Lightning)
        if all(k.startswith(prefix) for k in sd):
            cand = {k[len(prefix) :]: v for k, v in sd.items()}
            missing, unexpected, _ = _key_diff(model_keys, list(cand))
            if not missing and not unexpected:
                return cand, f"stripped prefix '{prefix}' from the file's keys to match the model"
    for prefix in _dot_prefixes(model_keys[0]):  # the model nests the weights one level deeper
        cand = {prefix + k: v for k, v in sd.items()}
        missing, unexpected, _ = _key_diff(model_keys, list(cand))
        if not missing and not unexpected:
            return cand, f"added prefix '{prefix}' to the file's keys to match the model"
    return None


def apply_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
) -> list[str]:
    """Load ``state_dict`` into ``model`` in place; return notes on what was adapted or skipped.

    Keys and shapes are checked before anything is copied.  With ``strict`` any missing or
    unexpected key or shape mismatch raises :class:`InputError` naming them (the model is left
    untouched); otherwise the tensors that fit are loaded and the rest listed in the notes.  A
    missing ``num_batches_tracked`` is tolerated; if every file key differs from the model's by
    one dotted prefix (e.g. Lightning's ``model.``) the keys are re-keyed, with a note.
    """
    bad = [str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise _error(f"state_dict values must be tensors; not tensors: {_show(bad)}")
    expected = model.state_dict()
    model_keys = list(expected)
    notes: list[str] = []
    sd: Mapping[str, torch.Tensor] = state_dict
    missing, unexpected, tolerated = _key_diff(model_keys, list(sd))
    if missing or unexpected:
        rekeyed = _rekey_by_prefix(model_keys, sd)
        if rekeyed is not None:
            sd, note = rekeyed
            notes.append(note)
            missing, unexpected, tolerated = _key_diff(model_keys, list(sd))
    mismatched = [  # in the model's order, so the first ones named are the first layers
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in model_keys
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_show(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_show(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} with the wrong shape ({_show(mismatched, 3)})")
        raise _error(
            f"the weights do not fit the model: {'; '.join(parts)}; check that MODEL and its "
            "--arg values build the architecture the weights were trained for, or pass "
            "--no-strict to load only what fits"
        )
    if missing:
        notes.append(f"{len(missing)} model keys not in the weights, left as built: {_show(missing)}")
    if unexpected:
        notes.append(f"{len(unexpected)} unexpected keys in the weights, ignored: {_show(unexpected)}")
    if mismatched:
        notes.append(f"{len(mismatched)} shape mismatches, skipped: {_show(mismatched, 3)}")
    if tolerated:
        notes.append(f"{len(tolerated)} 'num_batches_tracked' buffers not in the weights (harmless)")
    bad_shape = {m.split(":", 1)[0] for m in mismatched}
    to_load = {k: v for k, v in sd.items() if k in expected and k not in bad_shape}
    casts = sorted(
        {
            f"{str(v.dtype).removeprefix('torch.')}->{str(expected[k].dtype).removeprefix('torch.')}"
            for k, v in to_load.items()
            if v.dtype != expected[k].dtype
        }
    )
    if casts:
        notes.append(f"cast weights to the model's dtypes ({', '.join(casts)})")
    try:
        model.load_state_dict(to_load, strict=False)
    except Exception as exc:  # noqa: BLE001 - a custom load hook rejecting the weights
        raise _error(f"loading the weights into the model failed: {_describe_exc(exc)}") from exc
    return notes


# --------------------------------------------------------------------------- pickled modules


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


# --------------------------------------------------------------------------- tensors


def _read_safetensors(p: Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` on the CPU; a bad file is one clear error saying ``fix``."""
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError and I/O errors
        raise _error(
            f"{what} '{p}' is not a valid safetensors file ({_describe_exc(exc)}); "
            f"it may be truncated or corrupt: {fix}"
        ) from exc


def _one_or_tuple(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """One model input as a tensor, several as the tuple."""
    return tensors[0] if len(tensors) == 1 else tensors


def _check_samples(p: Path, tensors: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """Every item a tensor with a non-empty, shared leading (batch) dimension."""
    if not tensors:
        raise _error(f"sample file '{p}' holds no tensors; save at least one batch of inputs")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise _error(
                f"sample file '{p}': item {i} is a {type(t).__name__}, not a tensor; save tensors only"
            )
        if t.dim() == 0:
            raise _error(f"sample file '{p}' holds a scalar; samples need a leading batch dimension")
        if t.shape[0] == 0:
            raise _error(f"sample file '{p}' holds 0 samples (shape {tuple(t.shape)}); save at least one")
    batches = {int(t.shape[0]) for t in tensors}
    if len(batches) > 1:
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise _error(
            f"sample file '{p}': the inputs have different batch sizes ({shapes}); give every "
            "input the same number of samples"
        )
    return tuple(tensors)


def _from_numpy(p: Path, arr: Any) -> torch.Tensor:
    import numpy as np

    try:
        arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(arr))
    except Exception as exc:  # noqa: BLE001 - e.g. string arrays
        raise _error(
            f"sample file '{p}' holds an array of dtype {arr.dtype} that torch cannot use "
            f"({_describe_exc(exc)}); save numeric arrays"
        ) from exc


def load_tensor_file(path: str | Path) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Read example inputs (``--samples``, calibration data) without running code.

    * ``.pt``/``.pth``: ``torch.load(weights_only=True)`` of a tensor, a tuple/list of tensors
      (one per model input), or a dict holding exactly one tensor;
    * ``.npy``: ``numpy.load(allow_pickle=False)``;
    * ``.npz``/``.safetensors``: one array/tensor, or several -> a tuple ordered by key name with
      digit runs compared as numbers (``x0, x1, ..., x10``).

    The leading dimension is the batch: it must be non-zero and shared by all inputs.
    Returns a tensor for one input, a tuple for several.
    """
    p = _existing_file(path, "sample file")
    if _has_suffix(p, (".pt", ".pth")):
        obj: Any = _torch_load_weights_only(p, "sample file")
        if isinstance(obj, Mapping):
            tensors = [(str(k), v) for k, v in obj.items() if isinstance(v, torch.Tensor)]
            if len(tensors) != 1:
                raise _error(
                    f"sample file '{p}' holds a dict with {len(tensors)} tensors "
                    f"({_show([k for k, _ in tensors])}); save a single tensor, or a tuple with "
                    "one tensor per model input"
                )
            obj = tensors[0][1]
        if isinstance(obj, (torch.Tensor, tuple, list)):
            return _one_or_tuple(_check_samples(p, [obj] if isinstance(obj, torch.Tensor) else list(obj)))
        raise _error(
            f"sample file '{p}' holds a {type(obj).__name__}; save a tensor or a tuple of tensors"
        )
    if _has_suffix(p, (".npy", ".npz")):
        import numpy as np

        try:
            with open(p, "rb") as fh:
                loaded = np.load(fh, allow_pickle=False)
                if isinstance(loaded, np.ndarray):
                    arrays = [loaded]
                else:
                    with loaded:
                        arrays = [loaded[k] for k in sorted(loaded.files, key=_natural_key)]
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, ValueError) and "allow_pickle" in str(exc):
                raise _error(
                    f"sample file '{p}' holds Python objects (pickled), which are refused; save "
                    "a numeric array"
                ) from exc
            raise _error(
                f"sample file '{p}' is not a valid numpy file ({_describe_exc(exc)}); it may be "
                "truncated or corrupt: re-save it"
            ) from exc
        return _one_or_tuple(_check_samples(p, [_from_numpy(p, a) for a in arrays]))
    if _has_suffix(p, (".safetensors",)):
        loaded_st = _read_safetensors(p, "sample file", "re-save it")
        return _one_or_tuple(_check_samples(p, [loaded_st[k] for k in sorted(loaded_st, key=_natural_key)]))
    raise _error(f"sample file '{p}' has an unknown extension; use .pt, .npy, .npz or .safetensors")


# --------------------------------------------------------------------------- models


def _input_shape(model: torch.nn.Module) -> tuple[int, ...] | None:
    """``model.normswap_input_shape``, else ``(1, *input_size)`` from timm's config, else None."""
    shape = getattr(model, "normswap_input_shape", None)
    if isinstance(shape, (tuple, list)) and shape and all(isinstance(d, int) for d in shape):
        return tuple(int(d) for d in shape)
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
        if isinstance(size, (tuple, list)) and size and all(isinstance(d, int) for d in size):
            return (1, *(int(d) for d in size))
    return None


def _build(spec: str, args: dict[str, Any]) -> torch.nn.Module:
    """Call the spec's callable with ``args``; it must return an ``nn.Module``."""
    fn = resolve_callable(spec)
    try:
        sig: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        try:
            sig.bind(**args)
        except TypeError as exc:
            params = ", ".join(str(q.replace(annotation=q.empty)) for q in sig.parameters.values())
            name = getattr(fn, "__name__", spec.rpartition(":")[2])
            raise _error(
                f"MODEL '{spec}' does not accept these arguments ({_one_line(exc, 150)}); its "
                f"signature is {_one_line(f'{name}({params})', 300)}"
            ) from exc
    shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
    try:
        model = fn(**args)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the builder rejecting its arguments, a download, ...
        with_args = f" with {shown}" if shown else ""
        raise _error(
            f"building MODEL '{spec}'{with_args} raised {_describe_exc(exc)}; check the MODEL "
            "spec and its --arg values"
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise _error(
            f"MODEL '{spec}' returned a {type(model).__name__}, not a torch.nn.Module; name a "
            "function or class that builds the model"
        )
    return model


def _pretrained_arg(args: Mapping[str, Any]) -> str | None:
    """The first of :data:`PRETRAINED_ARGS` given a value that asks for trained weights."""
    for key in PRETRAINED_ARGS:
        value = args.get(key)
        if value is None or value is False or (isinstance(value, (str, int, float)) and not value):
            continue
        return key
    return None


def _rebuilds_differently(spec: str, args: dict[str, Any], model: torch.nn.Module) -> bool | None:
    """Build ``spec`` again under another torch (and Python, numpy) seed and compare its state
    with ``model``'s: True if any value differs (the builder draws its weights at random), False
    if all are equal (it loads or computes them), None if it cannot be told (the second build
    failed, returned the same object, or holds uninitialised lazy/meta tensors).

    The global RNG states are restored afterwards, so the caller's random stream is the same as
    after a single build."""
    import random

    from torch.nn.parameter import UninitializedTensorMixin

    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    if any(isinstance(v, UninitializedTensorMixin) or v.is_meta for v in tensors.values()):
        return None  # lazy modules / meta tensors: no values to compare yet
    if not any(v.numel() for v in tensors.values()):
        return False  # nothing to initialise
    np_mod = sys.modules.get("numpy")
    py_state = random.getstate()
    np_state = np_mod.random.get_state() if np_mod is not None else None
    try:
        with torch.random.fork_rng(devices=[]):
            seed = (torch.initial_seed() + 0x5EED) % (2**63)
            torch.manual_seed(seed)
            random.seed(seed)
            if np_mod is not None:
                np_mod.random.seed(seed % (2**32))
            other = _build(spec, args)
    except Exception:  # noqa: BLE001 - it built once; a failing second build proves nothing
        return None
    finally:
        random.setstate(py_state)
        if np_mod is not None and np_state is not None:
            np_mod.random.set_state(np_state)
    if other is model:
        return None
    second = {k: v for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
    if second.keys() != tensors.keys():
        return True
    try:
        for key, a in tensors.items():
            b = second[key]
            if isinstance(b, UninitializedTensorMixin) or b.is_meta:
                return None
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                return True
    except Exception:  # noqa: BLE001 - e.g. uninitialised lazy parameters
        return None
    return False


def load_model(
    spec: str | None = None,
    *,
    args: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
    detect_random_init: bool = True,
) -> LoadedModel:
    """Build or load the model named by ``spec``, apply ``weights``, put it in ``eval()``.

    See the module docstring for the spec forms.  ``args`` go to the spec's callable (not allowed
    with a pickled model file).  ``weights`` is read by :func:`load_state_dict_file` and applied
    by :func:`apply_state_dict` (``strict``).  ``trust_pickle`` allows unpickling a model file
    (and a weights file that holds pickled objects).

    Random weights are never silent: when a spec is built without ``weights`` and without a
    pretrained argument (:data:`PRETRAINED_ARGS`), it is built a second time under another seed
    (``detect_random_init``, on by default) and the two compared.  Different values mean the
    builder draws its weights at random: ``random_init`` is set and :data:`RANDOM_INIT_NOTE` added
    to ``notes``.  Equal values mean it loads (or computes) them, like the bundled default model,
    which loads its shipped weights.  This certainty costs one more build -- a few milliseconds
    for the digits model, about 0.5 s for torchvision's resnet50, seconds for the largest timm
    models -- and never a download (a builder given a pretrained argument is not rebuilt).  With
    ``detect_random_init=False`` the check is skipped and ``random_init`` is True exactly when no
    weights and no pretrained argument were given (a guess: it cannot see builders that load
    their own weights).  A pickled whole-model file is never random.
    """
    kwargs = dict(args or {})
    notes: list[str] = []
    target = DEFAULT_MODEL_SPEC if spec is None else spec
    if not isinstance(target, str) or not target.strip():
        raise _error("MODEL spec is empty; write package.module:function or path/to/file.py:function")
    target = target.strip()
    looks_like_file = ":" not in target.replace(":\\", "").replace(":/", "")
    random_init = False
    if looks_like_file and _has_suffix(Path(target), MODEL_FILE_SUFFIXES):
        if kwargs:
            raise _error(
                f"--arg values ({', '.join(kwargs)}) apply only to pkg.mod:fn / file.py:fn specs, "
                f"not to the pickled model file '{target}'; drop them"
            )
        model = load_pickled_module(target, trust_pickle=trust_pickle)
        notes.append(f"unpickled the whole model from '{target}' (--trust-pickle)")
    elif looks_like_file and _has_suffix(Path(target), (".safetensors",)):
        raise _error(
            f"MODEL '{target}' is a weights file, not a model; give the architecture as MODEL "
            "(pkg.mod:fn or file.py:fn) and pass this file as --weights"
        )
    elif looks_like_file and _has_suffix(Path(target), (".onnx",)):
        raise _error(
            f"MODEL '{target}' is an ONNX file; normswap rewrites PyTorch models: give the "
            "PyTorch model as pkg.mod:fn or file.py:fn"
        )
    else:
        model = _build(target, kwargs)
        if weights is None and _pretrained_arg(kwargs) is None:
            random_init = (
                bool(_rebuilds_differently(target, kwargs, model)) if detect_random_init else True
            )
    if weights is not None:
        sd, wnotes = load_state_dict_file(weights, trust_pickle=trust_pickle)
        notes.extend(wnotes)
        notes.extend(apply_state_dict(model, sd, strict=strict))
    if random_init:
        notes.append(RANDOM_INIT_NOTE)
    model.eval()
    return LoadedModel(
        model=model,
        spec=spec,
        args=kwargs,
        weights=None if weights is None else str(weights),
        input_shape=_input_shape(model),
        notes=notes,
        random_init=random_init,
    )
