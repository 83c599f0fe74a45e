"""Held-out data by default: a seeded, disjoint split of the calibration data.

Every agreement number normswap reports is measured on data the calibration (and recovery) did not
fit. When no separate held-out set is given (``--heldout DATA`` / ``heldout=``) and normswap knows
none (the bundled digits model's test split), :func:`split_heldout` holds out
:data:`HELDOUT_FRACTION` of the calibration samples: with a known sample count, exactly
``round(fraction · N)`` of them, chosen by a permutation seeded with ``seed``; for data whose size is
unknown before iterating (a ``module:callable``), each sample by a seeded hash of its index (about that
fraction). Both parts keep the data's order and batch size and are re-iterable; the split depends only
on the seed, the sample indices and N — never on the batch boundaries.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["HELDOUT_FRACTION", "HELDOUT_SEED", "HeldoutSplit", "split_heldout"]

HELDOUT_FRACTION = 0.2
HELDOUT_SEED = 0
_GOLDEN = 2654435761  # Knuth's multiplicative hash


@dataclass
class HeldoutSplit:
    """The two parts of a split, and how it was made (``describe()`` is the report's sentence)."""

    calib: Any  # CalibrationData: the part calibration and recovery fit
    heldout: Any  # CalibrationData: the part every agreement number is measured on
    fraction: float
    seed: int
    heldout_samples: int | None
    calib_samples: int | None
    source: str

    def describe(self) -> str:
        n = "" if self.heldout_samples is None else f", {self.heldout_samples} samples"
        return f"{self.fraction:.0%} of the calibration data held out (seeded split, seed {self.seed}{n})"

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "seed": self.seed, "heldout_samples": self.heldout_samples,
                "calibration_samples": self.calib_samples, "source": self.source, "description": self.describe()}


def _mask_hash(start: int, n: int, fraction: float, seed: int) -> Any:
    import torch

    idx = torch.arange(start, start + n, dtype=torch.int64)
    h = ((idx + seed * 1000003) * _GOLDEN) % (2 ** 32)
    return (h.double() / 2 ** 32) < fraction


def split_heldout(data: Any, fraction: float = HELDOUT_FRACTION, seed: int = HELDOUT_SEED, *,
                  batch: int | None = None) -> HeldoutSplit:
    """Split ``data`` (a :class:`~normswap.load.data.CalibrationData`, a tensor or an iterable of batches)
    into a calibration part and a held-out part (see the module docstring); both are
    :class:`~normswap.load.data.CalibrationData` in batches of ``batch`` (default: the data's own)."""
    import torch

    from ..load.data import CalibrationData, as_batches, _cat
    from ..errors import InputError

    if not 0.0 < fraction < 1.0:
        raise InputError(f"the held-out fraction must be in (0, 1), got {fraction}")
    source = as_batches(data)
    n_total = data.num_samples if isinstance(data, CalibrationData) else None
    if n_total is None and not isinstance(data, CalibrationData):
        try:
            n_total = sum(int(b[0].shape[0]) for b in source)
        except TypeError:
            n_total = None
    if batch is None:
        batch = data.batch if isinstance(data, CalibrationData) else next((int(b[0].shape[0]) for b in source), 1)
    shape = data.sample_shape if isinstance(data, CalibrationData) else None
    desc = getattr(data, "description", "the calibration data")

    held_index = None
    n_held = n_cal = None
    if n_total is not None:
        if n_total < 2:
            raise InputError(f"cannot hold out part of {n_total} calibration sample(s); give at least 2, or a separate --heldout set")
        n_held = min(max(1, round(n_total * fraction)), n_total - 1)
        n_cal = n_total - n_held
        perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
        held_index = torch.zeros(n_total, dtype=torch.bool)
        held_index[perm[:n_held]] = True

    def part(held: bool) -> Iterator[tuple]:
        start = 0
        buf: list[tuple] = []
        have = 0
        for b in source:
            n = int(b[0].shape[0])
            mask = held_index[start:start + n] if held_index is not None else _mask_hash(start, n, fraction, seed)
            start += n
            keep = mask if held else ~mask
            if not bool(keep.any()):
                continue
            sel = tuple(t[keep.to(t.device)] for t in b)
            while sel[0].shape[0] > 0:
                take = min(batch - have, int(sel[0].shape[0]))
                buf.append(tuple(t[:take] for t in sel))
                sel = tuple(t[take:] for t in sel)
                have += take
                if have == batch:
                    yield _cat(buf)
                    buf, have = [], 0
        if have:
            yield _cat(buf)

    checked = isinstance(data, CalibrationData) and data.validate  # its batches are checked as they are drawn
    cal = CalibrationData(lambda: part(False), description=f"{desc} (calibration part)", num_samples=n_cal, batch=batch,
                          sample_shape=shape, validate=not checked)
    held = CalibrationData(lambda: part(True), description=f"{desc} (held-out part)", num_samples=n_held, batch=batch,
                           sample_shape=shape, validate=not checked)
    return HeldoutSplit(calib=cal, heldout=held, fraction=fraction, seed=seed, heldout_samples=n_held, calib_samples=n_cal,
                        source=desc)


def heldout_data(spec: Any, model: Any, loaded: Any, *, batch: int = 256, **loader: Any) -> tuple[Any, str | None]:
    """The held-out data of a job: ``spec`` (``--heldout DATA``: any form ``--calib`` takes) when given,
    else the labelled held-out set normswap knows for the model (the bundled digits test split), else
    (None, None) — and then the caller holds out part of the calibration data (:func:`split_heldout`).
    ``loader``: an image folder's reading options, as for ``--calib`` (:func:`normswap.load.data.calibration_batches`)."""
    from ..pipeline.stages import heldout_for

    from ..load.data import _is_labelled_pair, check_finite

    if spec is not None:
        if isinstance(spec, str) and ":" in spec and not spec.strip().endswith(tuple(TENSOR_FILE_ENDINGS)):
            labelled = _labelled_callable(spec.strip())
            if labelled is not None:  # (inputs, labels): the kind's ground-truth measure too
                spec = labelled
        if isinstance(spec, tuple) and len(spec) == 2:
            check_finite(spec[0], "the held-out data" if not isinstance(spec, str) else f"--heldout {spec}")
            return spec, "the given held-out data" if not _is_labelled_pair(spec) else "the given held-out data (labelled)"
        if isinstance(spec, str) and spec.strip() == "digits":  # --calib digits is the train split; held out: the test split
            from ..models.digits import load_digits

            return load_digits("test"), "the digits test split (held out)"
        from ..load.data import calibration_batches

        data = calibration_batches(spec, batch=batch, model=getattr(loaded, "model", None), **loader)
        return data, f"--heldout {spec}" if isinstance(spec, str) else "the given held-out data"
    return heldout_for(model, loaded)


TENSOR_FILE_ENDINGS = (".pt", ".pth", ".npy", ".npz", ".safetensors")


def _labelled_callable(spec: str) -> tuple[Any, Any] | None:
    """A ``--heldout module:callable`` that returns ``(inputs, labels)`` (two tensors of one length): that
    pair, labels kept; else None (its batches are read as calibration data is)."""
    from ..load.data import _is_labelled_pair
    from ..errors import InputError, first_line
    from ..load import resolve_callable

    fn = resolve_callable(spec)
    try:
        got = fn()
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code
        raise InputError(f"held-out callable '{spec}' raised {first_line(e)}") from None
    return got if _is_labelled_pair(got) else None


def check_options(output_kind: str | None, heldout: Any, calib: Any, decode: Any = None, decode_tol: Any = None) -> None:
    """Torch-free checks of ``--output-kind``, ``--heldout``, ``--decode`` and ``--decode-tol`` (before any work)."""
    import math

    from ..errors import InputError
    from .kinds import check_name

    check_name(output_kind)
    if decode_tol is not None and (isinstance(decode_tol, bool) or not isinstance(decode_tol, (int, float))
                                   or not math.isfinite(decode_tol) or decode_tol < 0):
        raise InputError(f"--decode-tol must be a non-negative number (in the decoder's units), got {decode_tol!r}")
    if (decode is not None or decode_tol is not None) and calib is None:
        raise InputError("--decode measures agreement after calibration and recovery; add --calib DATA")
    if isinstance(decode, str) and ":" not in decode:
        raise InputError(f"--decode {decode!r} is not a module:function or file.py:function spec")
    if heldout is not None and calib is None:
        raise InputError("--heldout measures calibration and recovery; add --calib DATA (e.g. --calib digits)")
    if isinstance(heldout, str) and isinstance(calib, str) and heldout.strip() == calib.strip() and heldout.strip() != "digits":
        raise InputError(f"--heldout {heldout} is the --calib data itself; held-out data must be data the fit never sees "
                         "(omit --heldout to hold out 20% of the calibration data)")


# ---------------------------------------------------------------------------------------------------
# deciding on held-out data: paired per-sample losses, a difference only beyond its noise

#: a difference is called only beyond this many standard errors of the paired difference ...
NOISE_Z = 2.0
#: ... and beyond this fraction of the reference's mean loss (float noise of the loss itself)
NOISE_REL = 1e-3


@dataclass
class LossComparison:
    """A candidate's per-sample held-out losses against a reference's, on the same samples (paired):
    ``mean_diff`` = mean(candidate − reference), ``se`` its standard error, over ``n`` samples. The
    candidate is :attr:`lower` / :attr:`higher` only when the difference exceeds
    ``max(NOISE_Z · se, NOISE_REL · mean reference loss)``; otherwise the held-out set cannot tell them apart."""

    mean_diff: float
    se: float
    n: int
    reference_mean: float
    z: float = NOISE_Z
    rel: float = NOISE_REL

    @property
    def margin(self) -> float:
        return max(self.z * self.se, self.rel * abs(self.reference_mean))

    @property
    def lower(self) -> bool:
        return self.mean_diff < -self.margin

    @property
    def higher(self) -> bool:
        return self.mean_diff > self.margin

    @property
    def word(self) -> str:
        return "lower" if self.lower else "higher" if self.higher else "within noise"

    def describe(self) -> str:
        return f"Δ held-out loss {self.mean_diff:+.4g} ± {self.se:.2g} (paired, n = {self.n}): {self.word}"

    def to_dict(self) -> dict[str, Any]:
        return {"mean_diff": self.mean_diff, "se": self.se, "samples": self.n, "margin": self.margin, "verdict": self.word}


def compare_losses(candidate: Any, reference: Any, *, z: float = NOISE_Z, rel: float = NOISE_REL) -> LossComparison:
    """Compare two models' per-sample held-out losses (1-D tensors over the same samples, same order):
    the paired difference d = candidate − reference, its mean and standard error √(var(d)/n)."""
    import torch

    c, r = torch.as_tensor(candidate, dtype=torch.float64).reshape(-1), torch.as_tensor(reference, dtype=torch.float64).reshape(-1)
    if c.shape != r.shape or c.numel() == 0:
        raise ValueError(f"paired losses need the same samples: got {list(c.shape)} and {list(r.shape)}")
    d = c - r
    n = int(d.numel())
    se = float(d.std(unbiased=True) / n ** 0.5) if n > 1 else float("inf")
    return LossComparison(mean_diff=float(d.mean()), se=se, n=n, reference_mean=float(r.mean()), z=z, rel=rel)
