"""What every ``--to`` target promises, read from the family modules' *source*, without importing torch.

``normswap targets`` (and ``--help``) must answer instantly, but the registry
(:data:`normswap.norms.registry.TARGETS`) is only complete once every family module -- and so torch --
is imported. Each family module registers its targets with literal arguments::

    GN = register(NormTarget(
        name="gn",
        summary="GroupNorm ...",
        exact=False,
        batch_independent=True,
        build=_build_gn,
        ...
    ))

so this module parses ``normswap/norms/*.py`` with :mod:`ast` and reads ``name``, ``summary``,
``exact`` and ``batch_independent`` from those calls. Adding a norm still touches one family file;
``tests/test_startup.py`` checks that this catalog equals the runtime registry field for field.

Only the standard library is imported here, and this file must stay importable on its own (the CLI
may load it by path, without running ``normswap/norms/__init__.py``, which imports every family).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

#: the fields read from each ``NormTarget(...)`` call (all required, all literals)
FIELDS = ("name", "summary", "exact", "batch_independent")

NORMS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TargetInfo:
    """One ``--to`` value as ``normswap targets`` shows it."""

    name: str
    summary: str
    exact: bool  #: reproduces the original eval function before any training
    batch_independent: bool  #: a sample's output does not depend on the rest of the batch, in training too
    module: str  #: where it is defined (``normswap.norms.group``; ``normswap.rewriting.fold`` for fold)


#: ``fold`` is not a norm target (it removes the BN): the one --to value outside the registry
FOLD = TargetInfo(
    name="fold",
    summary="fold eval BatchNorm into the neighbouring Conv/ConvTranspose/Linear",
    exact=True,
    batch_independent=True,
    module="normswap.rewriting.fold",
)


def _is_call_to(node: ast.AST, name: str) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name)


def targets_in_source(source: str, filename: str = "<source>", module: str = "?") -> list[TargetInfo]:
    """The ``register(NormTarget(...))`` calls of one module's source, in source order."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not (_is_call_to(node, "register") and node.args and _is_call_to(node.args[0], "NormTarget")):
            continue
        call = node.args[0]
        where = f"{filename}:{call.lineno}"
        if call.args:
            raise ValueError(f"{where}: NormTarget(...) must be called with keyword arguments for the catalog to read it")
        kw = {k.arg: k.value for k in call.keywords if k.arg is not None}
        values = {}
        for field in FIELDS:
            if field not in kw:
                raise ValueError(f"{where}: NormTarget(...) has no {field}= keyword")
            try:
                values[field] = ast.literal_eval(kw[field])
            except ValueError:
                raise ValueError(f"{where}: NormTarget({field}=...) must be a literal for normswap targets "
                                 "to read it without importing torch") from None
        found.append((call.lineno, TargetInfo(**values, module=module)))
    return [info for _, info in sorted(found, key=lambda t: t[0])]


def norm_targets(directory: Path = NORMS_DIR) -> dict[str, TargetInfo]:
    """name -> :class:`TargetInfo` of every registered norm target, by family file name, then source order
    (the order ``normswap/norms/__init__.py`` imports the families in, so the order of ``TARGETS``)."""
    out: dict[str, TargetInfo] = {}
    for path in sorted(directory.glob("*.py")):
        if path.name in ("__init__.py", "catalog.py", "registry.py"):
            continue
        for info in targets_in_source(path.read_text(encoding="utf-8"), str(path), f"normswap.norms.{path.stem}"):
            if info.name in out:
                raise ValueError(f"{path}: norm target '{info.name}' is also registered in {out[info.name].module}")
            out[info.name] = info
    return out


def all_targets(directory: Path = NORMS_DIR) -> dict[str, TargetInfo]:
    """Every ``--to`` value, as ``normswap.targets()`` lists them: ``fold`` first, then the norm targets."""
    return {FOLD.name: FOLD, **norm_targets(directory)}
