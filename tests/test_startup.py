"""Instant start: ``normswap --help``, ``normswap COMMAND --help``, ``targets`` and ``version`` answer
without importing torch; ``import normswap`` is lazy but keeps its public names; the torch-free
target catalog equals the runtime registry; the wheel installs one top-level package.

Timings belong in ``benchmarks/bench.py --startup``; these tests assert the torch-free property,
which is what keeps start-up instant, on any machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("inspect", "convert", "check", "recover", "compare", "targets", "version")


def _env() -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPROFILEIMPORTTIME": "1"}
    env.pop("NORMSWAP_DEBUG", None)
    return env


def imported_modules(stderr: str) -> set[str]:
    """The modules ``-X importtime`` (PYTHONPROFILEIMPORTTIME=1) reports on stderr."""
    return {ln.rsplit("|", 1)[1].strip() for ln in stderr.splitlines() if ln.startswith("import time:") and ln.count("|") == 2}


def run_module(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m normswap ARGS`` (or ``python -c CODE ARGS``) from the repository root, as a user
    of a source checkout runs it, with the import profile on stderr."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "normswap", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)


def import_chain(stderr: str, module: str) -> list[str]:
    """Who imported ``module``: the chain of its importers, outermost first, from the ``-X importtime``
    tree (a module is printed after its imports, one indentation level deeper than its importer)."""
    rows = [ln.rsplit("|", 1)[1] for ln in stderr.splitlines() if ln.startswith("import time:") and ln.count("|") == 2]
    names = [r.strip() for r in rows]
    if module not in names:
        return []
    i = names.index(module)
    chain, depth = [module], len(rows[i]) - len(rows[i].lstrip())
    for r, name in zip(rows[i + 1:], names[i + 1:]):
        d = len(r) - len(r.lstrip())
        if d < depth:
            chain.append(name)
            depth = d
    return chain[::-1]


def assert_torch_free(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr[-2000:])
    mods = imported_modules(p.stderr)
    assert "normswap" in mods, "no import profile on stderr"
    heavy = sorted(m for m in mods if m.split(".")[0] in ("torch", "numpy", "onnx", "onnxruntime", "onnxscript"))
    first = next((m for m in ("torch", "numpy", "onnx", "onnxruntime", "onnxscript") if m in heavy), None)
    assert not heavy, f"imported {heavy[:3]}...: {' -> '.join(import_chain(p.stderr, first))} at module level"


@pytest.mark.parametrize("args", [("--help",), *((c, "--help") for c in COMMANDS)], ids=lambda a: " ".join(a))
def test_help_is_torch_free(args):
    p = run_module(*args)
    assert_torch_free(p)
    assert "Usage: " in p.stdout
    if args[0] != "--help":
        assert f"normswap {args[0]} [OPTIONS]" in p.stdout, p.stdout


def test_help_lists_every_command():
    """COMMANDS above is complete: a new command gets its own torch-free --help test."""
    p = run_module("--help")
    section = p.stdout.split("Commands:", 1)[1].splitlines()
    listed = [ln.split()[0] for ln in section if ln.startswith("  ") and not ln.startswith("   ")]
    assert sorted(listed) == sorted(COMMANDS), p.stdout


def test_targets_is_torch_free_and_complete():
    from normswap.norms.catalog import all_targets

    p = run_module("targets")
    assert_torch_free(p)
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["name", "exact", "batch-indep.", "summary"]
    assert all(len(ln) <= 200 for ln in lines), "the summary wraps at the width COLUMNS gives"
    rows = {ln.split()[0]: ln.split()[1:3] for ln in lines[1:] if not ln.startswith(" ")}  # not a wrapped summary line
    expected = {t.name: ["yes" if t.exact else "no", "yes" if t.batch_independent else "no"] for t in all_targets().values()}
    assert rows == expected
    assert rows["fold"] == ["yes", "yes"] and rows["gn-ws"] == ["no", "yes"] and rows["bin"] == ["yes", "no"]


def test_version_is_torch_free():
    import normswap

    p = run_module("version")
    assert_torch_free(p)
    assert p.stdout.strip() == normswap.__version__


def test_cli_main_as_the_tests_import_it_is_torch_free():
    """``from cli.main import main`` (the tests' way in) after ``--help``: torch not in sys.modules."""
    code = ("import sys\nfrom cli.main import main\nsys.argv = ['normswap', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('TORCH', 'torch' in sys.modules)")
    for args in (("--help",), ("convert", "--help"), ("targets",)):
        p = run_module(*args, code=code)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stdout.splitlines()[-1] == "TORCH False", (args, p.stdout[-500:])


def test_python_m_normswap_falls_back_to_the_source_tree():
    """Without the editable install's finder (a regular wheel installed, run from the repository root:
    the repository's normswap/ shadows the installed one and has no cli/), ``python -m normswap`` runs
    the source tree's cli.main."""
    code = ("import runpy, sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
            "sys.argv = ['normswap', 'version']\n"
            "try:\n    runpy.run_module('normswap', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('VIA', 'cli.main' in sys.modules, 'normswap.cli.main' in sys.modules)")
    p = run_module(code=code)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout.splitlines()
    assert out[-1] == "VIA True False" and out[-2] == "0.1.0", out


def test_lazy_package_keeps_its_public_names():
    """In a fresh interpreter: ``import normswap`` imports no torch; every public name resolves;
    normswap.convert / .calibrate / .recover are only the functions (their modules live in the stage
    packages, so a name means one thing and ``import normswap.keep.calibrate.readout`` works);
    submodules resolve as attributes; dir() lists the public names."""
    code = """
import sys, types
import normswap
assert 'torch' not in sys.modules
assert normswap.__version__ and isinstance(normswap.__all__, list)
from normswap.keep.recover import DEFAULT_LR
import normswap.keep.calibrate.readout, normswap.rewriting.convert
for name, home in (('recover', 'normswap.keep.recover'), ('calibrate', 'normswap.keep.calibrate'),
                   ('convert', 'normswap.rewriting.convert')):
    f = getattr(normswap, name)
    assert callable(f) and not isinstance(f, types.ModuleType), (name, f)
    assert f is getattr(sys.modules[home], name)
    assert 'normswap.' + name not in sys.modules, name  # no module of the function's name
try:
    import normswap.calibrate.readout
except ImportError:
    pass
else:
    raise AssertionError('normswap.calibrate is a function, not a package')
from normswap import convert, inspect, recover, check_parity, targets
assert convert is normswap.convert and recover is normswap.recover and inspect.__module__ == 'normswap.rewriting.convert'
assert normswap.parity.DEFAULT_ATOL == normswap.defaults.DEFAULT_ATOL
assert isinstance(normswap.compare, types.ModuleType) and all(isinstance(getattr(normswap, p), types.ModuleType) for p in ('rewriting', 'keep', 'load'))
from normswap import validate
assert isinstance(validate, types.ModuleType)
assert all(hasattr(normswap, n) for n in normswap.__all__)
assert set(normswap.__all__) <= set(dir(normswap))
try:
    normswap.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError('no AttributeError')
print('OK')
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "OK", p.stderr[-3000:]


def test_catalog_equals_the_runtime_registry():
    """Every field ``normswap targets`` shows (read from source, torch-free) is what the registry holds."""
    import normswap
    import normswap.norms  # noqa: F401 - every family registered
    from normswap.norms.catalog import FIELDS, all_targets
    from normswap.norms.registry import TARGETS

    catalog = all_targets()
    assert list(catalog) == list(normswap.targets())
    for name, info in catalog.items():
        if name == "fold":
            continue
        for field in FIELDS:
            assert getattr(info, field) == getattr(TARGETS[name], field), (name, field)


def test_catalog_refuses_what_it_cannot_read():
    from normswap.norms.catalog import targets_in_source

    ok = 'X = register(NormTarget(name="a", summary="s", exact=True, batch_independent=False, build=f))'
    (info,) = targets_in_source(ok)
    assert (info.name, info.exact, info.batch_independent) == ("a", True, False)
    with pytest.raises(ValueError, match="must be a literal"):
        targets_in_source('register(NormTarget(name=NAME, summary="s", exact=True, batch_independent=True, build=f))')
    with pytest.raises(ValueError, match="no batch_independent="):
        targets_in_source('register(NormTarget(name="a", summary="s", exact=True, build=f))')


def test_wheel_has_one_top_level_package():
    """pyproject.toml lists every package under normswap/ and installs cli/ as normswap.cli."""
    tomllib = pytest.importorskip("tomllib")
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())
    st = conf["tool"]["setuptools"]
    on_disk = {"normswap.cli"} | {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "normswap").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert set(st["packages"]) == on_disk
    assert {p.split(".")[0] for p in st["packages"]} == {"normswap"}
    assert st["package-dir"] == {"normswap.cli": "cli"}
    assert conf["project"]["scripts"] == {"normswap": "normswap.cli.main:main"}
    import normswap

    assert conf["project"]["version"] == normswap.__version__


def test_bench_startup_section(tmp_path, capsys):
    """benchmarks/bench.py --startup (section 6) runs and reports every command (timings not judged here)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("normswap_bench", REPO / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--startup", "--startup-runs", "1", "--json", str(out)]) == 0
    assert "6. CLI start-up" in capsys.readouterr().out
    rows = {r["label"]: r for r in json.loads(out.read_text())["startup"]["commands"]}
    assert list(rows) == [label for label, _ in bench.startup_commands()]
    for row in rows.values():
        assert row["returncode"] == 0 and len(row["samples_s"]) == 1 and row["median_s"] > 0, row
    assert rows['python -c "import torch"']["imports_torch"] and not rows["python -c pass"]["imports_torch"]
