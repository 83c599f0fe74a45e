"""The ``normswap`` command.

Exit codes: 0 success · 1 unexpected internal error · 2 bad input (missing/corrupt file, bad model
spec, wrong keys, untrusted pickle, bad shape, refused rewrite) · 3 parity failed.
"""

from __future__ import annotations

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
