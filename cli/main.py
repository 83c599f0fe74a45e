"""The ``normswap`` command.

Exit codes: 0 success · 1 unexpected internal error · 2 bad input (missing/corrupt file, bad model
spec, wrong keys, untrusted pickle, bad shape, refused rewrite) · 3 parity failed · 130
interrupted (Ctrl-C).

Importing this module is cheap: typer, torch and the commands are imported inside :func:`main`
(or on first access to :data:`app`), so that a Ctrl-C while they load -- ``import torch`` takes
seconds on a cold cache -- is caught like one during a command: one line, ``interrupted``, exit
130, no traceback.
"""

from __future__ import annotations

import sys
from typing import Any

EXIT_INTERRUPTED = 130

_APP: Any = None


def build_app() -> Any:
    """The typer application (built once; imports typer, torch and every command)."""
    global _APP
    if _APP is not None:
        return _APP
    import typer

    import normswap

    from .check_cmd import check
    from .compare_cmd import compare
    from .convert_cmd import convert
    from .inspect_cmd import inspect
    from .recover_cmd import recover

    app = typer.Typer(
        name="normswap",
        help="Rewrite the normalization layers of trained PyTorch networks: fold BatchNorm for deployment, "
        "or swap it for batch-independent norms; export to ONNX and verify parity.\n\n"
        "Exit codes: 0 ok, 1 internal error, 2 bad input, 3 parity failed.",
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

    @app.command("targets")
    def targets_cmd() -> None:
        """List the --to targets."""
        from .common import console

        for name, tgt in normswap.targets().items():
            if tgt is None:
                console.print(f"{name:12s} exact      fold eval BatchNorm into the neighbouring Conv/ConvTranspose/Linear")
            else:
                console.print(f"{name:12s} {'exact' if tgt.exact else 'retrains':10s} {tgt.summary}")

    @app.command("version")
    def version_cmd() -> None:
        """Print the version."""
        print(normswap.__version__)

    _APP = app
    return app


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
