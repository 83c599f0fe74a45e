"""Tests for normswap.load: specs, weights files, trust rules, sample files."""

from __future__ import annotations

import ast
import os
import pickle
import re
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from normswap import load as L
from normswap.errors import InputError
from normswap.load import (
    LoadedModel,
    apply_state_dict,
    load_model,
    load_pickled_module,
    load_state_dict_file,
    load_tensor_file,
    parse_kv_args,
    resolve_callable,
)

THIS_FILE = Path(__file__).resolve()


# --------------------------------------------------------------------------- tiny models
# (also reached through "tests/test_load.py:<name>" file specs)


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> pool -> fc."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = TinyNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def tiny_net(width: int = 4, classes: int = 3) -> nn.Module:
    return TinyNet(width, classes)


def tiny_with_shape() -> nn.Module:
    m = TinyNet()
    m.normswap_input_shape = (2, 1, 8, 8)
    return m


def tiny_timm_like() -> nn.Module:
    m = TinyNet()
    m.pretrained_cfg = {"input_size": (1, 16, 16), "num_classes": 3}
    return m


def tiny_raising(depth: int = 18) -> nn.Module:
    raise ValueError(f"unsupported depth {depth}")


def not_a_module() -> int:
    return 42


BUILDS: list[dict[str, Any]] = []  # calls of tiny_counted


def tiny_seeded() -> nn.Module:
    """Builds the same weights every time (like a builder that loads its own checkpoint)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        return TinyNet()


def tiny_counted(pretrained: bool = False, weights: Any = None) -> nn.Module:
    """Records each call, so a test can see whether load_model built the model twice."""
    BUILDS.append({"pretrained": pretrained, "weights": weights})
    return TinyNet()


def tiny_numpy_init() -> nn.Module:
    """Draws its weights from numpy's global RNG, not torch's."""
    m = TinyNet()
    with torch.no_grad():
        m.fc.weight.copy_(torch.from_numpy(np.random.standard_normal((3, 4)).astype("float32")))
    return m


NOT_CALLABLE = 3

TINY_SPEC = f"{THIS_FILE}:tiny_net"


# --------------------------------------------------------------------------- helpers


def expect_input_error(fn: Callable[..., Any], *args: Any, match: str, **kwargs: Any) -> str:
    """Call ``fn``; it must raise InputError (not anything else) with a one-line message matching."""
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    assert "\x1b" not in msg, repr(msg)
    assert re.search(match, msg), f"{match!r} not in {msg!r}"
    return msg


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=g)
                t.copy_(r.abs() + 0.5 if name.endswith("running_var") else r)
    return model


def tiny_sd(seed: int = 0, **kw: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in randomized(TinyNet(**kw), seed).state_dict().items()}


def assert_sd_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------- parse_kv_args


def test_parse_kv_args_values() -> None:
    got = parse_kv_args(
        [
            "depth=18",
            "name=resnet18",
            "pretrained=False",
            "dims=(1,2)",
            "lr=1e-3",
            "flag=false",
            "on=TRUE",
            "other=None",
            "s='a b'",
            "path=weights/a.pt",
            "empty=",
            "eq=a=b",
            " spaced = 3 ",
        ]
    )
    assert got == {
        "depth": 18,
        "name": "resnet18",
        "pretrained": False,
        "dims": (1, 2),
        "lr": 1e-3,
        "flag": False,
        "on": True,
        "other": None,
        "s": "a b",
        "path": "weights/a.pt",
        "empty": "",
        "eq": "a=b",
        "spaced": 3,
    }
    assert parse_kv_args([]) == {}


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["depth"], r"'depth' is not key=value"),
        (["=3"], r"not a valid keyword"),
        (["1x=3"], r"'1x' is not a valid keyword"),
        (["a=1", "a=2"], r"'a' is given twice"),
    ],
)
def test_parse_kv_args_errors(items: list[str], match: str) -> None:
    expect_input_error(parse_kv_args, items, match=match)


# --------------------------------------------------------------------------- resolve_callable


def test_resolve_module_spec_and_dotted_attr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        tmp_path / "nsw_specmod_a.py",
        """
        def make():
            return "made"

        class Factory:
            @staticmethod
            def build():
                return "built"
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_callable("nsw_specmod_a:make")() == "made"
    assert resolve_callable("nsw_specmod_a:Factory.build")() == "built"
    assert resolve_callable("torch.nn:Linear") is nn.Linear


def test_resolve_file_spec(tmp_path: Path) -> None:
    write(tmp_path / "nsw_sibling_helper.py", "VALUE = 7\n")
    write(
        tmp_path / "my models.py",
        """
        from dataclasses import dataclass
        import nsw_sibling_helper

        @dataclass
        class Cfg:
            width: int = nsw_sibling_helper.VALUE

        def make():
            return Cfg().width
        """,
    )
    fn = resolve_callable(f"{tmp_path / 'my models.py'}:make")
    assert fn() == 7
    # the file's directory is on sys.path only while it runs
    assert str(tmp_path) not in sys.path
    # resolving again reuses the module instead of executing it twice
    assert resolve_callable(f"{tmp_path / 'my models.py'}:make") is fn
    assert resolve_callable(TINY_SPEC)().fc.out_features == 3


def test_resolve_module_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "nsw_cwdmod_b.py", "def make():\n    return 'cwd'\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_callable("nsw_cwdmod_b:make")() == "cwd"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("torch.nn", r"names no callable"),
        ("", r"MODEL spec is empty"),
        ("torch.nn:", r"names no callable"),
        (":Linear", r"names no callable"),
        ("torch.nn:1bad", r"'1bad' is not a dotted Python name"),
        ("torch..nn:Linear", r"'torch..nn' is not a module name"),
        ("nsw_no_such_pkg_zz.sub:fn", r"module 'nsw_no_such_pkg_zz' not found"),
        ("torch.nn:NoSuchThing", r"'torch.nn' has no attribute 'NoSuchThing'"),
        ("torch.nn:Linaer", r"did you mean Linear"),
        ("torch.nn:Linear.nope", r"'Linear' has no attribute 'nope'"),
        (f"{THIS_FILE}:NOT_CALLABLE", r"'NOT_CALLABLE' is a int, not callable"),
        (f"{THIS_FILE}:missing_fn", r"has no attribute 'missing_fn'"),
        ("no/such/file.py:fn", r"file 'no/such/file.py' does not exist"),
        ("some/dir/notes.txt:fn", r"is not a \.py file"),
    ],
)
def test_resolve_bad_specs(spec: str, match: str) -> None:
    expect_input_error(resolve_callable, spec, match=match)


def test_resolve_module_import_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "nsw_needs_dep.py", "import nsw_missing_dep_qq\ndef make(): pass\n")
    write(tmp_path / "nsw_raises.py", "raise RuntimeError('boom at import')\n")
    write(tmp_path / "nsw_exits.py", "import sys\nsys.exit(3)\n")
    write(tmp_path / "nsw_syntax.py", "def make(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    msg = expect_input_error(
        resolve_callable, "nsw_needs_dep:make", match=r"No module named 'nsw_missing_dep_qq'"
    )
    assert "install" in msg and "importing 'nsw_needs_dep'" in msg
    expect_input_error(resolve_callable, "nsw_raises:make", match=r"RuntimeError: boom at import")
    expect_input_error(resolve_callable, "nsw_exits:make", match=r"SystemExit")
    expect_input_error(resolve_callable, "nsw_syntax:make", match=r"SyntaxError")
    # the same failures through the file form
    expect_input_error(
        resolve_callable, f"{tmp_path / 'nsw_needs_dep.py'}:make", match=r"nsw_missing_dep_qq.*install"
    )
    expect_input_error(
        resolve_callable, f"{tmp_path / 'nsw_raises.py'}:make", match=r"RuntimeError: boom at import"
    )
    expect_input_error(resolve_callable, f"{tmp_path / 'nsw_syntax.py'}:make", match=r"SyntaxError")


# --------------------------------------------------------------------------- load_state_dict_file


def test_safetensors_round_trip(tmp_path: Path) -> None:
    sd = tiny_sd()
    sd.pop("bn.num_batches_tracked")  # int64 scalar: fine in safetensors too, but keep it simple
    save_file(sd, str(tmp_path / "w.safetensors"))
    got, notes = load_state_dict_file(tmp_path / "w.safetensors")
    assert_sd_equal(dict(sorted(got.items())), dict(sorted(sd.items())))
    assert notes == []


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt", ".pth.tar"])
def test_torch_round_trip(tmp_path: Path, suffix: str) -> None:
    sd = tiny_sd()
    torch.save(sd, tmp_path / f"w{suffix}")
    got, notes = load_state_dict_file(str(tmp_path / f"w{suffix}"))
    assert_sd_equal(got, sd)
    assert notes == []


def test_legacy_torch_format(tmp_path: Path) -> None:
    sd = tiny_sd()
    torch.save(sd, tmp_path / "w.pt", _use_new_zipfile_serialization=False)
    got, _ = load_state_dict_file(tmp_path / "w.pt")
    assert_sd_equal(got, sd)


def test_nested_checkpoint_and_ddp_prefix(tmp_path: Path) -> None:
    sd = tiny_sd()
    ckpt = {
        "epoch": 3,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
        "state_dict": {f"module.{k}": v for k, v in sd.items()},
    }
    torch.save(ckpt, tmp_path / "c.ckpt")
    got, notes = load_state_dict_file(tmp_path / "c.ckpt")
    assert_sd_equal(got, sd)
    assert "loaded from checkpoint key 'state_dict'" in notes
    assert "stripped 'module.' prefix from every key" in notes


def test_doubly_nested_and_compile_prefix(tmp_path: Path) -> None:
    sd = tiny_sd()
    inner = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    torch.save({"model": {"model_state_dict": inner}, "step": 10}, tmp_path / "c.pt")
    got, notes = load_state_dict_file(tmp_path / "c.pt")
    assert_sd_equal(got, sd)
    assert "loaded from checkpoint key 'model' -> 'model_state_dict'" in notes
    assert notes.count("stripped 'module.' prefix from every key") == 1
    assert "stripped '_orig_mod.' prefix from every key" in notes


def test_partial_prefix_is_kept(tmp_path: Path) -> None:
    sd = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    torch.save(sd, tmp_path / "w.pt")
    got, notes = load_state_dict_file(tmp_path / "w.pt")
    assert list(got) == ["module.a", "b"]
    assert notes == []


def test_ema_checkpoint_keys(tmp_path: Path) -> None:
    sd, ema = tiny_sd(0), tiny_sd(1)
    torch.save({"state_dict": sd, "state_dict_ema": ema}, tmp_path / "both.pt")
    got, notes = load_state_dict_file(tmp_path / "both.pt")
    assert_sd_equal(got, sd)
    assert any("EMA weights under 'state_dict_ema' (not used)" in n for n in notes)
    torch.save({"ema": ema, "epoch": 1}, tmp_path / "ema.pt")
    got, notes = load_state_dict_file(tmp_path / "ema.pt")
    assert_sd_equal(got, ema)
    assert "loaded from checkpoint key 'ema'" in notes


def test_single_unnamed_wrapper_and_non_tensor_entries(tmp_path: Path) -> None:
    sd = tiny_sd()
    torch.save({"my_weights": {**sd, "version": 2}, "epoch": 5}, tmp_path / "w.pt")
    got, notes = load_state_dict_file(tmp_path / "w.pt")
    assert_sd_equal(got, sd)
    assert "loaded from checkpoint key 'my_weights'" in notes
    assert "ignored 1 non-tensor entries (version)" in notes


def test_trusted_pickled_module_as_weights(tmp_path: Path) -> None:
    model = randomized(TinyNet())
    torch.save(model, tmp_path / "m.pt")
    expect_input_error(load_state_dict_file, tmp_path / "m.pt", match=r"--trust-pickle")
    got, notes = load_state_dict_file(tmp_path / "m.pt", trust_pickle=True)
    assert_sd_equal(got, model.state_dict())
    assert any("pickled module" in n for n in notes)


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_file_errors_per_format(tmp_path: Path, suffix: str) -> None:
    sd = {"a": torch.zeros(4, 4)}
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    expect_input_error(load_state_dict_file, empty, match=r"is empty \(0 bytes\)")

    good = tmp_path / f"good{suffix}"
    (save_file(sd, str(good)) if suffix == ".safetensors" else torch.save(sd, good))
    truncated = _truncate(good)
    expect_input_error(load_state_dict_file, truncated, match=r"truncated|corrupt")

    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"this is not a weights file at all" * 3)
    expect_input_error(load_state_dict_file, garbage, match=r"corrupt|truncated|not a")


def test_weights_file_misc_errors(tmp_path: Path) -> None:
    expect_input_error(load_state_dict_file, tmp_path / "nope.pt", match=r"does not exist")
    (tmp_path / "hf").mkdir()
    torch.save({"a": torch.zeros(1)}, tmp_path / "hf" / "model.pt")
    expect_input_error(
        load_state_dict_file, tmp_path / "hf", match=r"is a directory.*contains: model\.pt"
    )
    (tmp_path / "w.txt").write_text("hi")
    expect_input_error(load_state_dict_file, tmp_path / "w.txt", match=r"unknown extension")
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    expect_input_error(load_state_dict_file, tmp_path / "t.pt", match=r"holds a Tensor, not a dict")
    torch.save({"epoch": 3, "name": "x"}, tmp_path / "meta.pt")
    expect_input_error(
        load_state_dict_file, tmp_path / "meta.pt", match=r"no named tensors \(top-level keys: epoch, name\)"
    )
    torch.save({"a": torch.zeros(100)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    _truncate(tmp_path / "legacy.pt")
    expect_input_error(load_state_dict_file, tmp_path / "legacy.pt", match=r"truncated|corrupt")


def test_pickled_module_as_weights_is_refused(tmp_path: Path) -> None:
    torch.save(TinyNet(), tmp_path / "m.pth")
    msg = expect_input_error(load_state_dict_file, tmp_path / "m.pth", match=r"pickled")
    assert "--trust-pickle" in msg and "state_dict()" in msg and "TinyNet" in msg


def test_numpy_objects_in_checkpoint_are_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": tiny_sd(), "best_acc": np.float64(0.9)}, tmp_path / "c.pt")
    msg = expect_input_error(load_state_dict_file, tmp_path / "c.pt", match=r"non-tensor Python objects")
    assert "numpy" in msg and "--trust-pickle" in msg
    got, _ = load_state_dict_file(tmp_path / "c.pt", trust_pickle=True)
    assert_sd_equal(got, tiny_sd())


def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(tmp_path / "ts.pt"))
    expect_input_error(load_state_dict_file, tmp_path / "ts.pt", match=r"TorchScript archive")
    expect_input_error(load_state_dict_file, tmp_path / "ts.pt", match=r"TorchScript", trust_pickle=True)
    expect_input_error(load_pickled_module, tmp_path / "ts.pt", match=r"TorchScript", trust_pickle=True)


# --------------------------------------------------------------------------- apply_state_dict


def test_apply_exact() -> None:
    sd = tiny_sd(1)
    model = TinyNet()
    assert apply_state_dict(model, sd) == []
    assert_sd_equal(model.state_dict(), sd)


def test_apply_missing_key_names_it_and_leaves_model_untouched() -> None:
    sd = tiny_sd(1)
    del sd["fc.weight"]
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    msg = expect_input_error(apply_state_dict, model, sd, match=r"1 missing \(fc\.weight\)")
    assert "--no-strict" in msg and "MODEL" in msg
    assert_sd_equal(model.state_dict(), before)


def test_apply_unexpected_and_shape_mismatch() -> None:
    sd = tiny_sd(1, classes=5)
    sd["extra.weight"] = torch.zeros(2)
    msg = expect_input_error(
        apply_state_dict, TinyNet(classes=3), sd, match=r"1 unexpected \(extra\.weight\)"
    )
    assert "fc.weight: file (5, 4) vs model (3, 4)" in msg
    assert "fc.bias: file (5,) vs model (3,)" in msg
    assert "2 with the wrong shape" in msg


def test_apply_many_missing_lists_first_five_and_count() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])
    msg = expect_input_error(apply_state_dict, model, {"0.weight": torch.zeros(2, 2)}, match=r"9 missing")
    assert "0.bias, 1.weight, 1.bias, 2.weight, 2.bias, ..." in msg
    assert "3.weight" not in msg


def test_apply_non_strict_returns_notes() -> None:
    sd = tiny_sd(1, classes=5)
    del sd["conv.bias"]
    sd["extra"] = torch.zeros(1)
    model = TinyNet(classes=3)
    notes = apply_state_dict(model, sd, strict=False)
    text = " | ".join(notes)
    assert "1 model keys not in the weights, left as built: conv.bias" in text
    assert "1 unexpected keys in the weights, ignored: extra" in text
    assert "2 shape mismatches, skipped: fc.weight: file (5, 4) vs model (3, 4)" in text
    assert torch.equal(model.conv.weight, sd["conv.weight"])
    assert torch.equal(model.bn.running_var, sd["bn.running_var"])


def test_apply_tolerates_missing_num_batches_tracked() -> None:
    sd = tiny_sd(1)
    del sd["bn.num_batches_tracked"]
    model = TinyNet()
    notes = apply_state_dict(model, sd)
    assert any("num_batches_tracked" in n for n in notes)
    assert torch.equal(model.bn.running_mean, sd["bn.running_mean"])


def test_apply_rekeys_by_one_prefix() -> None:
    sd = tiny_sd(2)
    model = TinyNet()
    notes = apply_state_dict(model, {f"model.{k}": v for k, v in sd.items()})
    assert notes == ["stripped prefix 'model.' from the file's keys to match the model"]
    assert_sd_equal(model.state_dict(), sd)
    wrapped = Wrapped()
    notes = apply_state_dict(wrapped, sd)
    assert notes == ["added prefix 'backbone.' to the file's keys to match the model"]
    assert torch.equal(wrapped.backbone.fc.weight, sd["fc.weight"])


def test_apply_casts_dtype_with_note() -> None:
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in tiny_sd(3).items()}
    model = TinyNet()
    notes = apply_state_dict(model, sd)
    assert notes == ["cast weights to the model's dtypes (float16->float32)"]
    assert model.fc.weight.dtype == torch.float32
    assert torch.equal(model.fc.weight, sd["fc.weight"].float())


def test_apply_rejects_non_tensor_values() -> None:
    expect_input_error(apply_state_dict, TinyNet(), {"fc.weight": [1, 2]}, match=r"not tensors: fc\.weight")


# --------------------------------------------------------------------------- pickled modules


def test_pickled_module_refused_then_trusted(tmp_path: Path) -> None:
    model = randomized(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    torch.save(model, tmp_path / "whole.pt")
    msg = expect_input_error(
        load_pickled_module, tmp_path / "whole.pt", trust_pickle=False, match=r"refused"
    )
    assert "--trust-pickle" in msg and "arbitrary code" in msg
    loaded = load_pickled_module(tmp_path / "whole.pt", trust_pickle=True)
    assert isinstance(loaded, nn.Sequential)
    assert_sd_equal(loaded.state_dict(), model.state_dict())

    expect_input_error(load_model, str(tmp_path / "whole.pt"), match=r"--trust-pickle")
    lm = load_model(str(tmp_path / "whole.pt"), trust_pickle=True)
    assert isinstance(lm.model, nn.Sequential) and not lm.model.training
    assert lm.spec == str(tmp_path / "whole.pt") and lm.args == {}
    assert any("unpickled" in n for n in lm.notes)


class _Sentinel:
    """Unpickling this opens (creates) a file: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_untrusted_pickle_runs_no_code(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    torch.save(_Sentinel(str(sentinel)), tmp_path / "evil.pt")
    expect_input_error(load_pickled_module, tmp_path / "evil.pt", trust_pickle=False, match=r"refused")
    expect_input_error(load_state_dict_file, tmp_path / "evil.pt", match=r"--trust-pickle")
    expect_input_error(load_model, str(tmp_path / "evil.pt"), match=r"--trust-pickle")
    expect_input_error(load_tensor_file, tmp_path / "evil.pt", match=r"--trust-pickle")
    assert not sentinel.exists()
    # with trust it does run (that is what trusting means) and is then rejected as not a Module
    expect_input_error(
        load_pickled_module, tmp_path / "evil.pt", trust_pickle=True, match=r"not an nn\.Module"
    )


def test_pickled_non_module(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    expect_input_error(
        load_pickled_module, tmp_path / "sd.pt", trust_pickle=True, match=r"state_dict-like dict, not an nn\.Module"
    )
    expect_input_error(
        load_pickled_module, tmp_path / "sd.pt", trust_pickle=False, match=r"holds weights .*--weights"
    )
    torch.save([1, 2, 3], tmp_path / "list.pt")
    expect_input_error(
        load_pickled_module, tmp_path / "list.pt", trust_pickle=True, match=r"holds a list, not an nn\.Module"
    )


def test_pickled_module_file_errors(tmp_path: Path) -> None:
    expect_input_error(load_pickled_module, tmp_path / "no.pt", trust_pickle=True, match=r"does not exist")
    torch.save(nn.Linear(2, 2), tmp_path / "m.pt")
    _truncate(tmp_path / "m.pt")
    expect_input_error(load_pickled_module, tmp_path / "m.pt", trust_pickle=True, match=r"corrupt")
    expect_input_error(load_pickled_module, tmp_path / "m.pt", trust_pickle=False, match=r"corrupt")


# --------------------------------------------------------------------------- load_tensor_file


def test_tensor_file_pt_forms(tmp_path: Path) -> None:
    x, y = torch.randn(4, 1, 8, 8), torch.randn(4, 3)
    torch.save(x, tmp_path / "x.pt")
    assert torch.equal(load_tensor_file(tmp_path / "x.pt"), x)
    torch.save((x, y), tmp_path / "xy.pt")
    got = load_tensor_file(tmp_path / "xy.pt")
    assert isinstance(got, tuple) and len(got) == 2
    assert torch.equal(got[0], x) and torch.equal(got[1], y)
    torch.save([x], tmp_path / "list1.pth")
    assert torch.equal(load_tensor_file(tmp_path / "list1.pth"), x)
    torch.save({"inputs": x, "note": "calib"}, tmp_path / "d.pt")
    assert torch.equal(load_tensor_file(tmp_path / "d.pt"), x)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ({"x": torch.zeros(2, 3), "y": torch.zeros(2)}, r"dict with 2 tensors \(x, y\)"),
        (torch.zeros(0, 3), r"0 samples \(shape \(0, 3\)\)"),
        (torch.tensor(1.0), r"scalar"),
        ((torch.zeros(2, 3), torch.zeros(3, 3)), r"different batch sizes \(\(2, 3\), \(3, 3\)\)"),
        ((), r"holds no tensors"),
        ((torch.zeros(2), 5), r"item 1 is a int"),
        (3, r"holds a int"),
    ],
)
def test_tensor_file_pt_errors(tmp_path: Path, obj: Any, match: str) -> None:
    torch.save(obj, tmp_path / "s.pt")
    expect_input_error(load_tensor_file, tmp_path / "s.pt", match=match)


def test_tensor_file_numpy(tmp_path: Path) -> None:
    a = np.random.default_rng(0).standard_normal((3, 2, 5)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    got = load_tensor_file(tmp_path / "a.npy")
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(a))
    np.save(tmp_path / "be.npy", a.astype(">f4"))
    assert torch.equal(load_tensor_file(tmp_path / "be.npy"), torch.from_numpy(a))
    np.savez(tmp_path / "ab.npz", x10=a[:, 0], x2=a[:, 1])
    got = load_tensor_file(tmp_path / "ab.npz")
    assert isinstance(got, tuple)
    assert torch.equal(got[0], torch.from_numpy(a[:, 1])) and torch.equal(got[1], torch.from_numpy(a[:, 0]))


def test_tensor_file_numpy_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    expect_input_error(load_tensor_file, tmp_path / "obj.npy", match=r"Python objects \(pickled\)")
    np.save(tmp_path / "t.npy", np.zeros((100, 10)))
    _truncate(tmp_path / "t.npy")
    expect_input_error(load_tensor_file, tmp_path / "t.npy", match=r"not a valid numpy file")
    (tmp_path / "e.npy").write_bytes(b"")
    expect_input_error(load_tensor_file, tmp_path / "e.npy", match=r"empty")
    np.save(tmp_path / "z.npy", np.zeros((0, 3), dtype=np.float32))
    expect_input_error(load_tensor_file, tmp_path / "z.npy", match=r"0 samples")
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    expect_input_error(load_tensor_file, tmp_path / "s.npy", match=r"dtype <U1 that torch cannot use")


def test_tensor_file_safetensors(tmp_path: Path) -> None:
    x = torch.randn(2, 3)
    save_file({"input": x}, str(tmp_path / "one.safetensors"))
    assert torch.equal(load_tensor_file(tmp_path / "one.safetensors"), x)
    parts = {"x10": torch.full((2, 1), 10.0), "x2": torch.full((2, 1), 2.0), "x1": torch.full((2, 1), 1.0)}
    save_file(parts, str(tmp_path / "many.safetensors"))
    got = load_tensor_file(tmp_path / "many.safetensors")
    assert [float(t[0, 0]) for t in got] == [1.0, 2.0, 10.0]
    save_file({"x": torch.zeros(0, 2)}, str(tmp_path / "zero.safetensors"))
    expect_input_error(load_tensor_file, tmp_path / "zero.safetensors", match=r"0 samples")
    _truncate(tmp_path / "one.safetensors")
    expect_input_error(load_tensor_file, tmp_path / "one.safetensors", match=r"not a valid safetensors")


def test_tensor_file_misc_errors(tmp_path: Path) -> None:
    expect_input_error(load_tensor_file, tmp_path / "none.pt", match=r"does not exist")
    (tmp_path / "x.csv").write_text("1,2\n")
    expect_input_error(load_tensor_file, tmp_path / "x.csv", match=r"unknown extension")
    torch.save(torch.zeros(300, 3), tmp_path / "t.pt")
    _truncate(tmp_path / "t.pt")
    expect_input_error(load_tensor_file, tmp_path / "t.pt", match=r"truncated|corrupt")


# --------------------------------------------------------------------------- load_model


def test_load_model_file_spec_with_args() -> None:
    lm = load_model(TINY_SPEC, args={"width": 6, "classes": 2})
    assert isinstance(lm, LoadedModel)
    assert lm.model.conv.out_channels == 6 and lm.model.fc.out_features == 2
    assert not lm.model.training and not lm.model.bn.training
    assert lm.spec == TINY_SPEC and lm.args == {"width": 6, "classes": 2}
    assert lm.weights is None and lm.input_shape is None
    assert lm.random_init and lm.notes == [L.RANDOM_INIT_NOTE]  # built without weights: random


def test_load_model_module_spec() -> None:
    lm = load_model("torch.nn:Linear", args=parse_kv_args(["in_features=2", "out_features=3", "bias=false"]))
    assert isinstance(lm.model, nn.Linear) and lm.model.bias is None and lm.model.out_features == 3


def test_load_model_with_weights(tmp_path: Path) -> None:
    sd = tiny_sd(4)
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.ckpt")
    lm = load_model(TINY_SPEC, weights=tmp_path / "w.ckpt")
    assert_sd_equal(lm.model.state_dict(), sd)
    assert lm.weights == str(tmp_path / "w.ckpt")
    assert "loaded from checkpoint key 'state_dict'" in lm.notes
    assert "stripped 'module.' prefix from every key" in lm.notes
    x = torch.randn(2, 1, 8, 8)
    ref = randomized(TinyNet(), 4).eval()
    assert torch.allclose(lm.model(x), ref(x))


def test_load_model_weights_mismatch(tmp_path: Path) -> None:
    save_file({k: v for k, v in tiny_sd(0, classes=10).items()}, str(tmp_path / "w.safetensors"))
    msg = expect_input_error(load_model, TINY_SPEC, weights=tmp_path / "w.safetensors", match=r"fc\.weight")
    assert "file (10, 4) vs model (3, 4)" in msg
    lm = load_model(TINY_SPEC, args={"classes": 10}, weights=tmp_path / "w.safetensors")
    assert lm.model.fc.out_features == 10
    lm = load_model(TINY_SPEC, weights=tmp_path / "w.safetensors", strict=False)
    assert any("shape mismatches" in n for n in lm.notes)


def test_load_model_input_shape() -> None:
    assert load_model(f"{THIS_FILE}:tiny_with_shape").input_shape == (2, 1, 8, 8)
    assert load_model(f"{THIS_FILE}:tiny_timm_like").input_shape == (1, 1, 16, 16)


@pytest.mark.parametrize(
    ("spec", "args", "match"),
    [
        (TINY_SPEC, {"depth": 18}, r"does not accept these arguments .*'depth'.*signature is tiny_net\(width=4, classes=3\)"),
        (f"{THIS_FILE}:tiny_raising", {"depth": 17}, r"with depth=17 raised ValueError: unsupported depth 17; check"),
        (f"{THIS_FILE}:not_a_module", {}, r"returned a int, not a torch\.nn\.Module"),
        ("weights.safetensors", {}, r"is a weights file, not a model"),
        ("model.onnx", {}, r"ONNX"),
        ("model.pt", {"depth": 1}, r"apply only to .* drop them"),
        ("missing_model.pt", {}, r"does not exist"),
        ("tiny.py", {}, r"names no callable"),
        ("   ", {}, r"empty"),
    ],
)
def test_load_model_errors(spec: str, args: dict[str, Any], match: str) -> None:
    expect_input_error(load_model, spec, args=args, match=match)


def test_load_model_default_spec_is_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(L, "DEFAULT_MODEL_SPEC", f"{THIS_FILE}:tiny_with_shape")
    lm = load_model()
    assert lm.spec is None and isinstance(lm.model, nn.Module) and lm.input_shape == (2, 1, 8, 8)


def test_load_model_bundled_default() -> None:
    pytest.importorskip("normswap.models.digits")
    try:
        lm = load_model()
    except InputError as err:  # the bundled weights are produced by examples/train_digits.py
        if "bundled weights missing" in str(err):
            pytest.skip(str(err))
        raise
    assert lm.spec is None and isinstance(lm.model, nn.Module) and not lm.model.training


def test_no_optional_imports() -> None:
    """torchvision/timm are optional: normswap/load/ never imports them unguarded (checked statically).

    An import of one is allowed only inside a ``try`` whose handler takes its absence (images.py reads
    torchvision's preprocessing metadata that way, for a ``torchvision.models`` spec only)."""
    files = sorted(Path(L.__file__).parent.glob("*.py"))
    assert len(files) > 1  # the package's modules, not just __init__
    imported, guarded = set(), set()

    def names(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name.split(".")[0] for a in node.names}
        if isinstance(node, ast.ImportFrom) and node.module:
            return {node.module.split(".")[0]}
        return set()

    for tree in (ast.parse(f.read_text()) for f in files):
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and node.handlers:
                for inner in (n for stmt in node.body for n in ast.walk(stmt)):
                    guarded |= {id(inner)} if names(inner) else set()
        for node in ast.walk(tree):
            if id(node) not in guarded:
                imported |= names(node)
    assert "torch" in imported  # the scan sees imports at all
    assert not imported & {"torchvision", "timm"}


# --------------------------------------------------------------------------- random initialisation


def test_random_init_is_detected_and_noted() -> None:
    lm = load_model(TINY_SPEC)
    assert lm.random_init is True
    assert lm.notes == [L.RANDOM_INIT_NOTE]
    assert L.RANDOM_INIT_NOTE.startswith("weights: random initialisation — pass --weights FILE")


def test_random_init_false_with_weights(tmp_path: Path) -> None:
    save_file(tiny_sd(5), str(tmp_path / "w.safetensors"))
    lm = load_model(TINY_SPEC, weights=tmp_path / "w.safetensors")
    assert lm.random_init is False and L.RANDOM_INIT_NOTE not in lm.notes


def test_bundled_default_is_not_random() -> None:
    lm = load_model()
    assert lm.random_init is False and L.RANDOM_INIT_NOTE not in lm.notes
    lm = load_model("normswap.models.digits:digits_resnet", args={"pretrained": False})
    assert lm.random_init is True


def test_builder_with_fixed_weights_is_not_random() -> None:
    """Decided by building twice under different seeds: equal weights are not random."""
    assert load_model(f"{THIS_FILE}:tiny_seeded").random_init is False
    assert load_model("torch.nn:BatchNorm2d", args={"num_features": 3}).random_init is False  # deterministic init
    assert load_model("torch.nn:ReLU").random_init is False  # nothing to initialise
    assert load_model("torch.nn:LazyLinear", args={"out_features": 2}).random_init is False  # cannot tell


def test_numpy_initialised_builder_is_random() -> None:
    state = np.random.get_state()
    assert load_model(f"{THIS_FILE}:tiny_numpy_init").random_init is True
    np.random.set_state(state)


def test_pretrained_argument_skips_the_rebuild() -> None:
    spec = f"{THIS_FILE}:tiny_counted"
    builds = resolve_callable(spec).__globals__["BUILDS"]  # the file spec runs this file as its own module
    builds.clear()
    lm = load_model(spec, args={"pretrained": True})
    assert lm.random_init is False and len(builds) == 1
    builds.clear()
    assert load_model(spec, args={"weights": "DEFAULT"}).random_init is False
    assert len(builds) == 1
    builds.clear()
    assert load_model(spec, args={"pretrained": False, "weights": None}).random_init is True
    assert len(builds) == 2  # built again under another seed to be sure
    builds.clear()
    lm = load_model(spec, detect_random_init=False)
    assert lm.random_init is True and len(builds) == 1  # the cheap guess


def test_random_init_check_leaves_the_rng_streams_alone() -> None:
    import random

    def draws() -> tuple[float, float, float]:
        return torch.rand(1).item(), random.random(), float(np.random.random())

    def seed() -> None:
        torch.manual_seed(7)
        random.seed(7)
        np.random.seed(7)

    seed()
    load_model(TINY_SPEC, detect_random_init=False)
    expected = draws()
    seed()
    load_model(TINY_SPEC)  # builds twice
    assert draws() == expected


def test_pickled_model_file_is_not_random(tmp_path: Path) -> None:
    torch.save(TinyNet(), tmp_path / "whole.pt")
    assert load_model(str(tmp_path / "whole.pt"), trust_pickle=True).random_init is False


# --------------------------------------------------------------------------- malicious pickles


class _Shell:
    """Unpickling this runs a shell command (os.system), which creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch '{self.marker}'",))


class _Eval:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (eval, (f"open({self.marker!r}, 'w')",))


SYSTEM = f"{os.system.__module__}.system"  # posix.system

EVIL_FORMS: dict[str, Callable[[Any, Path], None]] = {
    "zip": lambda obj, p: torch.save(obj, p),
    "zip-in-dict": lambda obj, p: torch.save({"state_dict": {"w": torch.zeros(1)}, "x": obj}, p),
    "zip-protocol-4": lambda obj, p: torch.save(obj, p, pickle_protocol=4),  # STACK_GLOBAL
    "legacy": lambda obj, p: torch.save(obj, p, _use_new_zipfile_serialization=False),
    "legacy-protocol-4": lambda obj, p: torch.save(obj, p, _use_new_zipfile_serialization=False, pickle_protocol=4),
    "plain-pickle-protocol-0": lambda obj, p: p.write_bytes(pickle.dumps(obj, protocol=0)),  # GLOBAL, text
    "plain-pickle-protocol-5": lambda obj, p: p.write_bytes(pickle.dumps(obj, protocol=5)),  # FRAME
}


@pytest.mark.parametrize("form", list(EVIL_FORMS))
@pytest.mark.parametrize("payload", ["system", "eval"])
def test_malicious_pickle_is_refused_naming_the_global(tmp_path: Path, form: str, payload: str) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    EVIL_FORMS[form](_Shell(marker) if payload == "system" else _Eval(marker), path)
    glob = SYSTEM if payload == "system" else "builtins.eval"
    calls: list[Callable[[], Any]] = [
        lambda: load_model(str(path)),  # as MODEL
        lambda: load_model(TINY_SPEC, weights=path),  # as --weights
        lambda: load_state_dict_file(path),
        lambda: load_pickled_module(path, trust_pickle=False),
        lambda: load_tensor_file(path),  # as --samples
    ]
    for call in calls:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            msg = expect_input_error(call, match=r"^pickle refused: ")
        assert f"imports {glob}, which weights-only loading does not allow" in msg, msg
        assert "--trust-pickle only for files you trust" in msg and "corrupt" not in msg, msg
        assert str(path) in msg
        assert not [w for w in caught if "torch" in str(w.filename)], [str(w.message) for w in caught]
    assert not marker.exists(), "unpickling ran the payload"


def test_dangerous_global_wins_over_a_class_before_it(tmp_path: Path) -> None:
    """torch stops at the first refused global; the file is read statically for the worst one."""
    marker = tmp_path / "MARKER"
    torch.save({"model": TinyNet(), "hook": _Shell(marker)}, tmp_path / "mixed.pt")
    msg = expect_input_error(load_state_dict_file, tmp_path / "mixed.pt", match=r"^pickle refused: ")
    assert f"imports {SYSTEM}" in msg
    assert not marker.exists()


def test_pickle_scan_is_static(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    torch.save(_Shell(marker), tmp_path / "a.pt")
    torch.save(_Shell(marker), tmp_path / "b.pt", _use_new_zipfile_serialization=False, pickle_protocol=4)
    assert SYSTEM in L._pickle_globals(tmp_path / "a.pt")
    assert SYSTEM in L._pickle_globals(tmp_path / "b.pt")
    torch.save(tiny_sd(), tmp_path / "sd.pt")
    assert all(L._weights_only_allowed(g) for g in L._pickle_globals(tmp_path / "sd.pt"))
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02garbage")
    assert L._pickle_globals(tmp_path / "junk.pt") == []
    assert not marker.exists()


def test_trusted_malicious_pickle_does_run(tmp_path: Path) -> None:
    """--trust-pickle means what it says (the file is then rejected as not a module)."""
    marker = tmp_path / "MARKER"
    torch.save(_Shell(marker), tmp_path / "evil.pt")
    expect_input_error(load_pickled_module, tmp_path / "evil.pt", trust_pickle=True, match=r"not an nn\.Module")
    assert marker.exists()


def test_weights_mismatch_names_keys_and_counts(tmp_path: Path) -> None:
    sd = tiny_sd(0, width=6)
    for i in range(7):
        sd[f"extra{i}.weight"] = torch.zeros(1)
    del sd["fc.bias"]
    save_file(sd, str(tmp_path / "w.safetensors"))
    msg = expect_input_error(load_model, TINY_SPEC, weights=tmp_path / "w.safetensors", match=r"do not fit")
    assert "1 missing (fc.bias)" in msg
    assert "7 unexpected (extra0.weight, extra1.weight, extra2.weight, extra3.weight, extra4.weight, ...)" in msg
    assert "with the wrong shape (" in msg and "conv.weight: file (6, 1, 3, 3) vs model (4, 1, 3, 3)" in msg
    assert re.search(r"\b\d+ with the wrong shape", msg)
