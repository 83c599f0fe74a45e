"""``python -m normswap ...`` = the ``normswap`` command.

Installed (``pip install .`` or ``pip install -e .``), the command line is the subpackage
``normswap.cli`` (pyproject.toml maps the repository's ``cli/`` folder to it). In a source checkout
run from the repository root without an editable install -- e.g. ``python -m pytest`` or
``python -m normswap`` there, with normswap installed as a regular wheel or not at all -- the
repository's ``normswap/`` (first on sys.path) shadows the installed package and has no ``cli``
subpackage: the command line is then the sibling ``cli/`` folder, importable as ``cli`` (as the
tests import it). So: ``normswap.cli.main`` if it exists, else the source tree's ``cli.main``.
"""

from __future__ import annotations

import sys
from pathlib import Path


def _main():
    try:
        from normswap.cli.main import main
    except ModuleNotFoundError as e:
        if e.name not in ("normswap.cli", "normswap.cli.main"):
            raise  # normswap.cli exists but something it imports is missing: say so
        root = Path(__file__).resolve().parent.parent
        if not (root / "cli" / "main.py").is_file():
            raise
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from cli.main import main
    return main


if __name__ == "__main__":
    sys.exit(_main()())
