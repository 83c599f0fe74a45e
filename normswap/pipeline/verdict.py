"""The verdict rules: one word per outcome, its exit code, and :func:`decide` (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["EXIT_CODES", "Verdict", "check_verdict", "decide"]

EXIT_CODES = {"PASSED": 0, "EXPORTED": 0, "CONVERTED": 0, "FAILED": 3, "NOTHING COMPARED": 4, "NOT EXPORTED": 5}


@dataclass
class Verdict:
    """What happened, in one word (``word``), the sentence behind it and the exit code."""

    word: str
    detail: str

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.word]

    @property
    def line(self) -> str:
        return f"{self.word} — {self.detail}" if self.detail else self.word

    def to_dict(self) -> dict[str, Any]:
        return {"word": self.word, "detail": self.detail, "exit_code": self.exit_code}


def _measures(top1: float | None, rel: float | None) -> str:
    """Top-1 agreement *and* output rel err: on random inputs to a random-weights model top-1 can read
    100% while the outputs moved by half their size, so neither is quoted alone."""
    parts = ([f"top-1 agreement {top1:.1%}"] if top1 is not None else []) + ([f"output rel err {rel:.3g}"] if rel is not None else [])
    return ", ".join(parts) or "not measured"


def _agreement_text(kept: Any, drift: Mapping[str, Any] | None) -> str:
    """How far a function-changing swap moved the outputs, from the best measure available: the output
    kind's primary measure (the decoded one when a decoder is given) with its 95% interval, top-1
    agreement where the output has a class or bin axis, the output rel err, and the sample count."""
    if kept is not None and kept.stages:
        last = kept.stages[-1]
        how = {"naive": "naive swap", "calibrated": "calibrated", "recovered": "calibrated and recovered"}.get(last.stage, last.stage)
        rec = getattr(kept, "recovery", None)
        best = getattr(rec, "best_step", None)
        if last.stage == "recovered" and best is not None and best != rec.end_step:
            how = ("calibrated; recovery raised the held-out loss, so its starting weights were kept" if best == rec.start_step
                   else f"calibrated and recovered, the weights of step {best} of {rec.end_step}: the best held-out loss")
        agr = last.agreement
        primary = getattr(agr, "primary", "top1_agreement")
        if hasattr(agr, "format") and agr.get(primary) is not None:
            parts = [f"{agr.labels().get(primary, primary)} {agr.format(primary)}"]
            kind = getattr(getattr(agr, "outputs", None), "kind", None)
            if primary != "top1_agreement" and getattr(kind, "argmax_is_read", True) and agr.get("top1_agreement") is not None:
                parts.append(f"top-1 agreement {agr.format('top1_agreement')}")
            if agr.get("rel_err") is not None:
                parts.append(f"output rel err {agr['rel_err']:.3g}")
            measures = ", ".join(parts) + (f" (n = {agr.n})" if getattr(agr, "n", None) else "")
        else:
            measures = _measures(agr.get("top1_agreement"), agr.get("rel_err"))
        return f"{measures} on {kept.evaluated_on} ({how})"
    if drift is not None:
        return f"{_measures(drift.get('top1'), drift.get('max_rel'))} on random inputs (naive swap; calibrate with --calib)"
    return "not measured"


def decide(conversion: Any, parity: Any, *, exported: bool, kept: Any = None, drift: Mapping[str, Any] | None = None,
           export_error: str | None = None, fitted: Any = None) -> Verdict:
    """The verdict rules of the module docstring. ``export_error``: why the requested ONNX could not be
    written (the PyTorch rewrite may still be good, and is still saved). ``fitted``: per-sample norms
    replaced by fitted affines before an exact fold (``--to fold --calib``): the fold is proven as
    any, but the whole conversion changed the function, so it ends in CONVERTED / EXPORTED."""
    if parity is not None and parity.verdict == "failed":
        what = "the rewritten model" if conversion.exact else "the ONNX export of the rewritten model"
        return Verdict("FAILED", f"{what} does not compute what it must: {parity.summary()}")
    if parity is not None and parity.nothing_compared:
        return Verdict("NOTHING COMPARED", parity.summary())
    if export_error is not None:
        checked = (f"the rewritten model computes what the original did ({len(parity.stats)} comparisons in PyTorch), "
                   if conversion.exact and parity is not None else "")
        return Verdict("NOT EXPORTED", f"{checked}but {export_error}")
    if conversion.exact:
        n = len(parity.stats) if parity is not None else 0
        ort = [s for s in (parity.stats if parity is not None else []) if "onnxruntime" in s.pair]
        if exported and ort and all(s.vacuous for s in ort):
            # the PyTorch rewrite is proven, the ONNX only ran: say so rather than vouch for it
            return Verdict("PASSED", f"the rewritten model computes what the original did ({n} comparisons); its ONNX ran "
                                     f"but none of its {len(ort)} onnxruntime comparisons could compare anything on these "
                                     "inputs (empty, constant or not comparable outputs) — check it with --samples of real inputs")
        where = " and its ONNX" if exported else ""
        if fitted is not None and fitted.changes_function:
            proof = (f"the fold is exact ({n} comparisons against the model with {len(fitted.folded)} fitted affine(s)"
                     f"{', and its ONNX' if exported else ''}); function changed: {_agreement_text(fitted, None)}")
            return Verdict("EXPORTED" if exported else "CONVERTED", proof)
        return Verdict("PASSED", f"the rewritten model{where} {'compute' if exported else 'computes'} what the original did ({n} comparisons)")
    change = f"function changed: {_agreement_text(kept, drift)}"
    return Verdict("EXPORTED", f"ONNX matches the rewritten model; {change}") if exported else Verdict("CONVERTED", change)



def check_verdict(parity: Any) -> Verdict:
    """``normswap check``'s verdict: an ONNX file against the PyTorch model it must reproduce."""
    if parity.verdict == "failed":
        return Verdict("FAILED", f"the ONNX file does not compute what the model does: {parity.summary()}")
    if parity.nothing_compared:
        return Verdict("NOTHING COMPARED", parity.summary())
    return Verdict("PASSED", f"the ONNX file computes what the model does ({len(parity.stats)} comparisons)")
