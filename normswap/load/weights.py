"""State-dict files: reading, checkpoint unwrapping, prefix stripping, fitting keys to a model.

Weights files are read without executing code: ``.safetensors`` with safetensors, torch files
(``.pt .pth .bin .ckpt .pth.tar``) with ``torch.load(weights_only=True)``.  Checkpoint wrappers
listed in :data:`CHECKPOINT_KEYS` are unwrapped (repeatedly), then :data:`EMA_CHECKPOINT_KEYS` if no
other is present, and the ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile)
prefixes are stripped when every key carries them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .common import TORCH_SUFFIXES, _describe_exc, _error, _existing_file, _has_suffix, _show
from .pickles import _TORCHSCRIPT_MSG, _is_torchscript_zip, _quiet_torch_load, _torch_load_weights_only
from .tensors import _read_safetensors

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

_MAX_UNWRAP = 8


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
