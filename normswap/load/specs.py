"""MODEL specs: ``--arg key=value`` parsing, importing the named callable, building the model.

A spec naming a callable is one of

* ``package.module:callable`` -- imported with importlib; the callable may be a dotted attribute
  path (``mod:Class.make``); it is called with the ``--arg key=value`` pairs and must return an
  ``nn.Module``;
* ``path/to/file.py:callable`` -- the file is executed as a module (its directory is on
  ``sys.path`` while it runs, so it can import its siblings), then as above.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from normswap.errors import InputError

from .common import _describe_exc, _error, _one_line

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
