"""``normswap compare``'s ``fold`` row on a model with per-sample norms (GroupNorm, LayerNorm, …).

Folding such a model means ``convert --to fold --calib``: each per-sample norm fitted as a per-channel affine
on the calibration data, the sites chosen by ``--fold-norms auto`` (cheapest first while the held-out drop
stays within the default ``--max-drop``, or all of them when, refit, they stay within it), then the fold pass. :func:`fold_conversion` runs exactly that
(:func:`normswap.pipeline.fold_norms.fit_and_choose`), so compare's fold row — and the latency every other
row is relative to — is the model ``convert`` would write. Without calibration data it says so."""

from __future__ import annotations

from typing import Any

__all__ = ["fold_conversion", "needs_calib_message"]


def needs_calib_message(n: int) -> str:
    return (f"the model has {n} per-sample norm site(s) (GroupNorm, LayerNorm, …): folding them fits each as an "
            "affine on data, as `convert --to fold --calib` does — add --calib DATA (e.g. --calib digits)")


def fold_conversion(original: Any, x1: Any, calib: Any, eval_data: Any, outputs: Any) -> tuple[Any, Any]:
    """``(conversion, fitted)``: the fold of ``original``; ``fitted`` (a FoldNormsReport) when per-sample
    norms were fitted on ``calib`` first, else None (a BatchNorm-only model: the plain exact fold).
    Raises RewriteError with :func:`needs_calib_message` when per-sample norms are there and ``calib`` is not."""
    from normswap.errors import RewriteError
    from normswap.keep.norm_fit import norm_site_names
    from normswap.rewriting.convert import rewrite

    names = norm_site_names(original)
    if not names:
        return rewrite(original, "fold", (x1,)), None
    if calib is None:
        try:
            conv = rewrite(original, "fold", (x1,))  # BatchNorms fold; the per-sample norms are refused
        except RewriteError:
            raise RewriteError(needs_calib_message(len(names))) from None
        return conv, None
    from normswap.pipeline.fold_norms import fit_and_choose

    fitted = fit_and_choose(original, calib, heldout=eval_data, output_kind=outputs)
    if not fitted.folded:
        first = fitted.choices[0]
        raise RewriteError(f"--fold-norms auto kept all {len(names)} per-sample norm site(s) ({first.fit.name}: "
                           f"{first.reason}); `normswap convert --to fold --calib DATA --fold-norms all` folds them anyway")
    conv = rewrite(fitted.model, "fold", (x1,), skip=fitted.kept)  # verified against the affine-replaced model
    fitted.annotate(conv)
    return conv, fitted
