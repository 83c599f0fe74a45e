"""The ``normswap`` command.

Exit codes: 0 success · 1 unexpected internal error · 2 bad input (missing/corrupt file, bad model
spec, wrong keys, untrusted pickle, bad shape, refused rewrite) · 3 parity failed · 4 nothing
compared · 5 the ONNX export failed (the rewrite is still checked and saved) · 130 interrupted (Ctrl-C).

Importing this module is cheap: typer and the commands are imported inside :func:`main` (or on
first access to :data:`app`), so that a Ctrl-C while they load is caught like one during a command:
one line, ``interrupted``, exit 130, no traceback.

Start-up is instant: ``--help``, ``COMMAND --help``, ``targets`` and ``version`` never import torch
(``import torch`` takes 1.5 s warm, many more on a cold cache). ``normswap`` itself imports lazily,
the command modules import torch (and any normswap module that does) inside their functions only,
option defaults come from :mod:`normswap.defaults`, and ``targets`` reads the norm catalog from the
family modules' source (:mod:`normswap.norms.catalog`). ``tests/test_startup.py`` keeps it so.
"""

from __future__ import annotations

import sys
from typing import Any

EXIT_INTERRUPTED = 130

_APP: Any = None


def build_app() -> Any:
    """The typer application (built once; imports typer and every command module, not torch)."""
    global _APP
    if _APP is not None:
        return _APP
    import typer

    from .check_cmd import check
    from .compare_cmd import compare
    from .convert_cmd import convert
    from .inspect_cmd import inspect
    from .recover_cmd import recover

    app = typer.Typer(
        name="normswap",
        help="Rewrite the normalization layers of trained PyTorch networks: fold BatchNorm for deployment, "
        "or swap it for batch-independent norms; export to ONNX and verify parity.\n\n"
        "Exit codes: 0 ok, 1 internal error, 2 bad input, 3 parity failed, 4 nothing compared, 5 ONNX export failed.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    app.command("inspect")(inspect)
    app.command("convert")(convert)
    app.command("check")(check)
    app.command("recover")(recover)
    app.command("compare")(compare)
    app.command("targets")(targets_cmd)
    app.command("version")(version_cmd)

    _APP = app
    return app


def norm_catalog() -> Any:
    """:mod:`normswap.norms.catalog`, without running ``normswap/norms/__init__.py`` (it imports every
    family module, hence torch) unless something already did: the catalog is stdlib-only and is
    loaded from its file, under a private name."""
    if "normswap.norms" in sys.modules:
        import normswap.norms.catalog as catalog

        return catalog
    import importlib.util
    from pathlib import Path

    import normswap

    name = "_normswap_norms_catalog"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(normswap.__file__).resolve().parent / "norms" / "catalog.py"
    spec = importlib.util.spec_from_file_location(name, path)
    catalog = importlib.util.module_from_spec(spec)
    sys.modules[name] = catalog  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(catalog)  # type: ignore[union-attr]
    except BaseException:
        del sys.modules[name]
        raise
    return catalog


def targets_cmd() -> None:
    """List the --to targets and what each promises.

    exact: the same eval function as the original before any training. batch-independent: a sample's
    output does not depend on the rest of its batch, in training too."""
    rows = [(t.name, "yes" if t.exact else "no", "yes" if t.batch_independent else "no", t.summary)
            for t in norm_catalog().all_targets().values()]
    import shutil
    import textwrap

    header = ("name", "exact", "batch-indep.", "summary")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lead = sum(widths) + 2 * 3
    # the summary wraps under itself at the terminal's width (80 when piped), so no cell is cut
    room = max(30, shutil.get_terminal_size((80, 24)).columns - lead)
    for r in [header, *rows]:
        lines = textwrap.wrap(r[3], room) or [""]
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + lines[0])
        for more in lines[1:]:
            print(" " * lead + more)


def version_cmd() -> None:
    """Print the version."""
    import normswap

    print(normswap.__version__)


def __getattr__(name: str) -> Any:
    """``from cli.main import app`` still works: the app is built on first access."""
    if name == "app":
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _interrupted() -> int:
    try:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - stderr closed: the exit code still says it
        pass
    return EXIT_INTERRUPTED


def main() -> int:
    """Run the command line; a Ctrl-C anywhere -- imports, start-up, a command -- is one line."""
    try:
        try:
            app = build_app()
            app()  # typer exits through SystemExit (a command's Ctrl-C is handled in cli.common.guarded)
        except KeyboardInterrupt:
            return _interrupted()
    except KeyboardInterrupt:  # a second Ctrl-C while the first was being reported
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
