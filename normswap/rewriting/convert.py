"""The entry point: run a pass on a copy of the model, verify it (saving and re-loading: :mod:`normswap.load.saved`).

``convert(model, to="fold", example_inputs=...)`` returns the rewritten ``nn.Module``;
``rewrite(...)`` returns the whole :class:`Conversion` (model, per-site actions, verification).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import __version__, validate
from .capture import trace
from ..errors import InputError, ParityError, RewriteError, first_line
from .passes import PassResult
from ..parity import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    PAIR_ORIGINAL_REWRITTEN,
    ParityResult,
    check_tolerances,
    eval_mode,
    first_divergence,
    judge,
)

__all__ = [
    "inspect",
    "Conversion",
    "convert",
    "rewrite",
    "targets",
    "save_conversion",
    "load_conversion",
]


def targets() -> dict[str, Any]:
    """Every ``to=`` value: ``"fold"`` plus the registered norm targets (name → target)."""
    from ..norms import registry

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
    conversion_id: str | None = None  # set at first save_conversion, kept by load_conversion

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
        from ..norms import registry

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
    from ..norms import registry

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
    :class:`ParityError` naming the first diverging node.  Verification is its own cost: with
    ``verify=False`` the original is not run at all unless a site needs shapes (then once, by the
    pass itself); :func:`check_example_inputs` checks inputs up front.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    check_tolerances(atol, rtol)
    validate.positive_int("--groups", groups)
    inputs = _as_inputs(example_inputs)
    options = {"groups": groups} if to != "fold" and groups is not None else {}
    # with verify: one eval run of the original (flags restored, no grad: nothing of the caller's
    # changes): bad example inputs are the user's to fix, and its output is what an exact rewrite must reproduce
    ref_out = _run_reference(model, inputs) if inputs is not None and verify else None
    result = _run_pass(model, to, inputs, options, skip)
    _refuse_if_nothing_rewritten(result, to, skip)
    conv = Conversion(
        model=result.model, to=to, result=result, options=options, input_shapes=_shapes(inputs),
        source=dict(source) if source else None,
    )
    if verify and inputs is not None and conv.exact:
        from ..detection import Probed, takes_image_list

        if takes_image_list(model):
            # a detector's post-NMS outputs are discontinuous: verify its pre-post-processing tensors
            # (normswap.detection) and judge the final ones against the original's own noise floor
            probe = Probed(model)
            conv.verification = verify_rewrite(probe, _run_reference(probe, inputs), conv, inputs, atol=atol, rtol=rtol,
                                               wrap=Probed)
        else:
            conv.verification = verify_rewrite(model, ref_out, conv, inputs, atol=atol, rtol=rtol)
    return conv


def _refuse_if_nothing_rewritten(result: PassResult, to: str, skip: Iterable[str]) -> None:
    """A pass that found sites but rewrote none of them did not do what was asked: an error, not a
    success (e.g. ``--groups 7`` that divides no channel count). Sites skipped on request and
    a model without any norm site are not this case."""
    skip = set(skip)
    asked = [a for a in result.actions if a.site not in skip]
    if asked and not any(a.rewritten for a in asked):
        reasons = list(dict.fromkeys(a.reason or "refused" for a in asked))
        more = f" (and {len(reasons) - 1} other reason(s))" if len(reasons) > 1 else ""
        raise RewriteError(
            f"--to {to} rewrote none of the {len(asked)} norm site(s): {asked[0].site}: {reasons[0]}{more}; "
            "nothing was converted — see `normswap inspect MODEL --to " + to + "` for every site's reason"
        )


def check_example_inputs(model: nn.Module, example_inputs: Tensor | Sequence[Any]) -> None:
    """Run ``model`` once in eval mode on ``example_inputs`` (flags restored); :class:`InputError`
    saying which shape it expects when it fails."""
    inputs = _as_inputs(example_inputs)
    if inputs is not None:
        _run_reference(model, inputs)


def _run_reference(reference: nn.Module, inputs: tuple[Any, ...]) -> Any:
    try:
        with eval_mode(reference):
            return reference(*inputs)
    except Exception as e:
        lists = [x for x in inputs if isinstance(x, (list, tuple))]
        if lists:  # a list of images (--images N): say so, and how to go back to a tensor batch
            imgs = lists[0]
            what = f"a list of {len(imgs)} image(s) of {list(imgs[0].shape) if imgs and isinstance(imgs[0], Tensor) else '?'}"
            raise InputError(f"the model fails on {what} ({first_line(e, 200)}); drop --images if it takes a tensor "
                             "batch, or pass the image size it expects, e.g. --input-shape 3,320,320") from None
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
    reference: nn.Module, ref: Any, conv: Conversion, inputs: tuple[Any, ...], *, atol: float, rtol: float,
    wrap: Any = None,
) -> ParityResult:
    """Compare the rewritten model's output on ``inputs`` with ``ref`` (the eval-mode reference's)
    under the parity rule (noise floor included); if an exact rewrite does not reproduce it, raise
    :class:`ParityError` saying what diverged and where. The error carries the conversion and the
    parity result (``err.conversion``, ``err.result``) so a caller can still report and save them."""
    candidate = conv.model if wrap is None else wrap(conv.model)  # wrap: the same view the reference has
    with eval_mode(conv.model):
        out = candidate(*inputs)
    batch = int(inputs[0].shape[0]) if inputs and isinstance(inputs[0], Tensor) and inputs[0].dim() else "example"
    stats, _ = judge(reference, ref, out, inputs, pair=PAIR_ORIGINAL_REWRITTEN, batch=batch, atol=atol, rtol=rtol)
    res = ParityResult(stats=stats, atol=atol, rtol=rtol)
    conv.verification = res
    if res.verdict == "failed":
        res.divergence = _divergence(reference, conv, inputs, atol=atol, rtol=rtol)
        err = ParityError(_divergence_message(res, atol, rtol))
        err.conversion, err.result = conv, res
        raise err
    return res


def _divergence_message(res: ParityResult, atol: float, rtol: float) -> str:
    """What diverged, where, and what to do — the user's tolerance, a broken original, or our bug."""
    w = res.worst()
    assert w is not None
    what = f"{w.output}: {w.note}" if w.note else f"{w.output}: max rel err {w.max_rel:.2e} (max abs {w.max_abs:.1e}, allowed {w.allowed:.1e})"
    where = f"; first divergence at {res.divergence}" if res.divergence else ""
    if w.note and "itself outputs" in w.note:
        todo = "the rewrite cannot be verified on a model that does not compute finite outputs"
    elif math.isfinite(w.max_abs) and w.max_abs <= DEFAULT_ATOL + DEFAULT_RTOL * w.scale and (atol, rtol) != (DEFAULT_ATOL, DEFAULT_RTOL):
        todo = f"it is within the default tolerance: --atol {atol:g} / --rtol {rtol:g} are tighter than float32 rounding allows"
    else:
        todo = "this is a normswap bug unless the model's forward depends on more than its modules: please report it with the model"
    return f"the rewritten model does not reproduce the original ({what}){where}; {todo}"


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
    sites = {s.name: s.describe() for s in find_sites(capture(model, inputs), every_norm=True)}
    result = _run_pass(model, to, inputs, {k: v for k, v in options.items() if v is not None}, ())
    rows = []
    for a in result.actions:
        row = dict(sites.get(a.site, {"name": a.site, "type": a.type}))
        row.update({"action": a.action, "target": a.target, "reason": a.reason, "exact": a.exact})
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Saving without pickle (weights as safetensors + a JSON record, no code run on load): normswap.load.saved
# --------------------------------------------------------------------------------------------

from ..load.saved import CONVERSION_JSON, WEIGHTS_FILE, load_conversion, save_conversion  # noqa: E402
