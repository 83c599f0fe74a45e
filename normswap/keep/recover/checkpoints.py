"""Recovery checkpoints: weights (safetensors), optimizer and RNG state, the JSON record written last."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...atomic import atomic_path, atomic_write_text
from ...errors import InputError, first_line


STATE_FILE = "recover.json"


def _fingerprint(model: nn.Module) -> str:
    """Module names and types + parameter shapes: a checkpoint of another conversion of the same
    architecture (e.g. GroupNorm vs channels LayerNorm, identical parameter shapes) must not resume."""
    import hashlib

    lines = [f"{n}:{type(m).__name__}" for n, m in model.named_modules()]
    lines += [f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _ckpt_names(step: int) -> tuple[str, str]:
    return f"ckpt-{step:07d}.safetensors", f"ckpt-{step:07d}.optim.pt"


def _save_checkpoint(d: Path, student: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from safetensors.torch import save_model

    d.mkdir(parents=True, exist_ok=True)
    wname, oname = _ckpt_names(int(state["step"]))
    with atomic_path(d / wname) as tmp:
        save_model(student, str(tmp))
    with atomic_path(d / oname) as tmp:
        blob = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            blob["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(blob, str(tmp))
    try:
        old = _read_state(d)
    except InputError:  # a damaged record is about to be replaced; its files cannot be named
        old = None
    state = {**state, "weights": wname, "optimizer": oname}
    atomic_write_text(d / STATE_FILE, json.dumps(state, indent=2))
    if old is not None:  # the previous checkpoint's files, now superseded
        for key in ("weights", "optimizer"):
            name = old.get(key)
            if isinstance(name, str) and name not in (wname, oname) and (d / name).is_file():
                (d / name).unlink()


def _read_state(d: Path) -> dict[str, Any] | None:
    p = d / STATE_FILE
    if not p.is_file():
        return None
    try:
        state = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"checkpoint record {p} is unreadable ({e}); delete {d} or pass --no-resume (resume=False)") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 \
            or not all(isinstance(state.get(k), str) for k in ("weights", "optimizer")):
        raise InputError(f"checkpoint record {p} is damaged (no step or file names); delete {d} or pass --no-resume (resume=False)")
    return state


def _load_checkpoint(d: Path, student: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    from safetensors.torch import load_model

    state = _read_state(d)
    if state is None:
        return None
    fp = state.get("model_fingerprint")
    if fp is not None and fp != _fingerprint(student):
        raise InputError(
            f"checkpoint in {d} does not fit this model (it was written for another conversion: module types "
            "differ); use another --checkpoint-dir or pass --no-resume (resume=False)"
        )
    w, o = d / str(state.get("weights")), d / str(state.get("optimizer"))
    if not w.is_file() or not o.is_file():
        raise InputError(f"checkpoint in {d} is incomplete (missing {w.name if not w.is_file() else o.name}); delete {d} or pass --no-resume (resume=False)")
    try:
        load_model(student, str(w), strict=True)
    except Exception as e:  # noqa: BLE001
        if "Safetensor" in type(e).__name__ or isinstance(e, OSError):  # not a readable safetensors file
            raise InputError(
                f"checkpoint {w} is corrupt ({first_line(e, 160)}); delete {d} or pass resume=False / --no-resume"
            ) from None
        raise InputError(
            f"checkpoint {w} does not fit this model ({first_line(e, 160)}); it belongs to another "
            "conversion: use another --checkpoint-dir or pass --no-resume (resume=False)"
        ) from None
    try:
        blob = torch.load(str(o), weights_only=True, map_location="cpu")
        opt.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["rng"])
        if "cuda_rng" in blob and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
    except Exception as e:  # noqa: BLE001 - a truncated/garbage file, or not an optimizer state
        raise InputError(
            f"checkpoint {o} is corrupt or not this run's optimizer state ({first_line(e, 160)}); "
            f"delete {d} or pass resume=False / --no-resume"
        ) from None
    return state
