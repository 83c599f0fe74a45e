"""The entry point: run a pass on a copy of the model, verify it, save and re-load the result.

``convert(model, to="fold", example_inputs=...)`` returns the rewritten ``nn.Module``;
``rewrite(...)`` returns the whole :class:`Conversion` (model, per-site actions, verification).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import __version__
from .atomic import staging_dir
from .capture import trace
from .errors import InputError, ParityError, first_line
from .passes import PassResult
from .parity import DEFAULT_ATOL, DEFAULT_RTOL, ParityResult, compare, eval_mode, first_divergence

__all__ = [
    "inspect",
    "Conversion",
    "convert",
    "rewrite",
    "targets",
    "save_conversion",
    "load_conversion",
]

CONVERSION_JSON = "conversion.json"
WEIGHTS_FILE = "model.safetensors"


def targets() -> dict[str, Any]:
    """Every ``to=`` value: ``"fold"`` plus the registered norm targets (name → target)."""
    from .norms import registry

    return {"fold": None, **registry.TARGETS}


@dataclass
class Conversion:
    """A rewritten model and everything known about how it was made."""

    model: nn.Module
    to: str
    result: PassResult
    options: dict[str, Any] = field(default_factory=dict)
    input_shapes: list[list[int]] | None = None
    verification: ParityResult | None = None
    source: dict[str, Any] | None = None  # {"spec": ..., "args": ...} when loaded from a spec

    @property
    def actions(self):
        return self.result.actions

    @property
    def exact(self) -> bool:
        """Whether the rewritten model is meant to compute exactly what the original did."""
        return all(a.exact for a in self.result.actions if a.rewritten)

    def divergence(
        self, original: nn.Module, input_shape: Sequence[int], *, seed: int = 0,
        atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
    ) -> str | None:
        """The first graph node where this rewrite and ``original`` disagree (None if none found)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*input_shape, generator=g)
        return _divergence(original, self, (x,), atol=atol, rtol=rtol)

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.result.actions:
            out[a.action] = out.get(a.action, 0) + 1
        return out

    def target_info(self) -> dict[str, Any]:
        """What the target promises: exactness and batch independence."""
        if self.to == "fold":
            return {"name": "fold", "exact": True, "batch_independent": None,
                    "summary": "eval BatchNorm folded into neighbouring layers (an inference model)"}
        from .norms import registry

        t = registry.TARGETS[self.to]
        return {"name": t.name, "exact": t.exact, "batch_independent": t.batch_independent, "summary": t.summary}

    def to_dict(self) -> dict[str, Any]:
        return {
            "normswap": __version__,
            "to": self.to,
            "target": self.target_info(),
            "options": self.options,
            "input_shapes": self.input_shapes,
            "source": self.source,
            "exact": self.exact,
            "summary": self.summary(),
            "sites": [a.to_dict() for a in self.result.actions],
            "verification": None if self.verification is None else self.verification.to_dict(),
        }


def _as_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _shapes(inputs: tuple[Any, ...] | None) -> list[list[int]] | None:
    if inputs is None:
        return None
    return [list(x.shape) for x in inputs if isinstance(x, Tensor)]


def _run_pass(model: nn.Module, to: str, inputs: tuple[Any, ...] | None, options: dict[str, Any], skip: Iterable[str]) -> PassResult:
    if to == "fold":
        from .fold import fold

        return fold(model, inputs, skip=skip)
    from .norms import registry

    if to not in registry.TARGETS:
        names = ", ".join(["fold", *registry.TARGETS])
        raise InputError(f"unknown target '{to}'; choose one of: {names}")
    from .swap import swap

    return swap(model, to, inputs, skip=skip, **options)


def rewrite(
    model: nn.Module,
    to: str = "fold",
    example_inputs: Tensor | Sequence[Any] | None = None,
    *,
    groups: int | None = None,
    skip: Iterable[str] = (),
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    source: Mapping[str, Any] | None = None,
) -> Conversion:
    """Rewrite a copy of ``model`` (the caller's model is never mutated).

    ``to`` is ``"fold"`` or a norm target (``normswap.targets()``).  ``example_inputs`` give the
    shapes the passes need (e.g. whether a Linear's output is ``[N, C]``) and, with ``verify``,
    the inputs on which an exact rewrite must reproduce the original — a mismatch raises
    :class:`ParityError` naming the first diverging node.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_inputs(example_inputs)
    options = {"groups": groups} if to != "fold" and groups is not None else {}
    # one eval run of the original (flags restored, no grad: nothing of the caller's changes): bad
    # example inputs are the user's to fix, and its output is what an exact rewrite must reproduce
    ref_out = _run_reference(model, inputs) if inputs is not None else None
    result = _run_pass(model, to, inputs, options, skip)
    conv = Conversion(
        model=result.model, to=to, result=result, options=options, input_shapes=_shapes(inputs),
        source=dict(source) if source else None,
    )
    if verify and inputs is not None and conv.exact:
        conv.verification = verify_rewrite(model, ref_out, conv, inputs, atol=atol, rtol=rtol)
    return conv


def _run_reference(reference: nn.Module, inputs: tuple[Any, ...]) -> Any:
    try:
        with eval_mode(reference):
            return reference(*inputs)
    except Exception as e:
        shapes = ", ".join(str(list(x.shape)) for x in inputs if isinstance(x, Tensor))
        raise InputError(
            f"the model fails on an example input of shape {shapes} ({first_line(e, 200)}); "
            "pass the shape it expects, e.g. --input-shape 1,3,224,224"
        ) from None


def convert(
    model: nn.Module,
    to: str = "fold",
    example_inputs: Tensor | Sequence[Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Return a rewritten copy of ``model``; see :func:`rewrite` for the options."""
    return rewrite(model, to, example_inputs, **kwargs).model


def verify_rewrite(
    reference: nn.Module, ref: Any, conv: Conversion, inputs: tuple[Any, ...], *, atol: float, rtol: float
) -> ParityResult:
    """Compare the rewritten model's output on ``inputs`` with ``ref`` (the eval-mode reference's);
    raise :class:`ParityError` naming the first diverging node if an exact rewrite does not
    reproduce it."""
    with torch.no_grad():
        out = conv.model(*inputs)
    batch = int(inputs[0].shape[0]) if inputs and isinstance(inputs[0], Tensor) and inputs[0].dim() else "example"
    res = ParityResult(stats=compare(ref, out, pair="original↔rewritten", batch=batch, atol=atol, rtol=rtol), atol=atol, rtol=rtol)
    if not res:
        res.divergence = _divergence(reference, conv, inputs, atol=atol, rtol=rtol)
        where = f"; first divergence at {res.divergence}" if res.divergence else ""
        worst = res.worst()
        raise ParityError(
            f"the rewritten model does not reproduce the original (max rel err {worst.max_rel:.2e}){where}; "
            "please report this with the model"
        )
    return res


def _divergence(reference: nn.Module, conv: Conversion, inputs: tuple[Any, ...], *, atol: float, rtol: float) -> str | None:
    if "" not in conv.result.graphs:
        return None
    try:
        with eval_mode(reference):
            return first_divergence(trace(reference), conv.result.graphs[""], conv.result.node_maps.get("", {}), inputs, atol=atol, rtol=rtol)
    except Exception:  # naming the node is a diagnostic nicety; never mask the parity failure
        return None


def inspect(
    model: nn.Module, example_inputs: Tensor | Sequence[Any] | None = None, *, to: str = "fold", **options: Any
) -> list[dict[str, Any]]:
    """Every norm site — name, type, producer, consumers — and what ``to`` would do there (or why
    not), from a dry run of the pass (which works on a copy)."""
    from .capture import capture
    from .sites import find_sites

    inputs = _as_inputs(example_inputs)
    # capture only reads: tracing shares the modules, the shape pass runs in eval mode under
    # no_grad and restores every module's flag — no copy needed for the descriptions
    sites = {s.name: s.describe() for s in find_sites(capture(model, inputs))}
    result = _run_pass(model, to, inputs, {k: v for k, v in options.items() if v is not None}, ())
    rows = []
    for a in result.actions:
        row = dict(sites.get(a.site, {"name": a.site, "type": a.type}))
        row.update({"action": a.action, "target": a.target, "reason": a.reason, "exact": a.exact})
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Saving without pickle: weights as safetensors + a JSON record re-applied to the architecture.
# --------------------------------------------------------------------------------------------

def save_conversion(conv: Conversion, directory: str | os.PathLike[str]) -> Path:
    """Write ``model.safetensors`` and ``conversion.json`` into ``directory`` (atomically).

    Loading re-runs the same pass on the same architecture (which needs no pickle) and then
    loads the weights, so the record names the model (``source``) when it was loaded from a spec.
    """
    from safetensors.torch import save_model

    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise InputError(f"--save {out} exists and is not a directory; choose a directory path")
    record = conv.to_dict()
    record["skip"] = [a.site for a in conv.result.actions if not a.rewritten]
    with staging_dir(out) as tmp:
        save_model(conv.model, str(tmp / WEIGHTS_FILE))
        (tmp / CONVERSION_JSON).write_text(json.dumps(record, indent=2, default=str))
        out.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS_FILE, CONVERSION_JSON):  # the record last: it marks a complete save
            os.replace(tmp / name, out / name)
    return out


def load_conversion(directory: str | os.PathLike[str], model: nn.Module | None = None) -> Conversion:
    """Rebuild a saved conversion: ``model`` (or the model its record names) is rewritten with the
    recorded options, then the saved weights are loaded strictly."""
    from safetensors.torch import load_model

    d = Path(directory)
    rec_path, w_path = d / CONVERSION_JSON, d / WEIGHTS_FILE
    if not rec_path.is_file() or not w_path.is_file():
        raise InputError(f"{d} is not a saved conversion (needs {CONVERSION_JSON} and {WEIGHTS_FILE}); save one with --save DIR")
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{rec_path} is not valid JSON ({e}); save the conversion again") from e
    if model is None:
        src = rec.get("source")
        if src is None:
            raise InputError(f"{rec_path} does not name its model; pass the model to load_conversion(dir, model)")
        from .load import load_model as load_spec

        model = load_spec(src.get("spec"), args=src.get("args") or {}).model
    shapes = rec.get("input_shapes")
    inputs = tuple(torch.zeros(s) for s in shapes) if shapes else None
    conv = rewrite(
        model, rec["to"], inputs, skip=rec.get("skip", []), verify=False, source=rec.get("source"),
        **{k: v for k, v in (rec.get("options") or {}).items()},
    )
    try:
        load_model(conv.model, str(w_path), strict=True)
    except Exception as e:
        raise InputError(
            f"the saved weights do not fit the re-applied conversion ({first_line(e, 200)}); "
            "load it with the same model and normswap version that saved it"
        ) from e
    return conv

