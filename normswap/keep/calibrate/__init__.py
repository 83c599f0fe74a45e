"""Calibration: re-fit the swapped norms' affine parameters so the new model keeps the trained function.

A swap replaces each BatchNorm by a norm whose statistics differ (per sample instead of per dataset),
so copying γ, β leaves every layer's output off by a per-channel scale and shift — and the errors
compound through the network. :func:`calibrate` fixes that on unlabeled data, without training.

**What is fitted.** At every swapped site, with ``z`` the new norm's *normalized* output (its forward
with γ = 1, β = 0) and ``y`` the original BatchNorm's output at the same site (before any activation a
timm ``BatchNormAct2d`` applies), the per-channel least-squares fit

    y ≈ a · z + b            →   γ := a,  β := b

from the running per-channel sums Σz, Σz², Σy, Σzy, Σy², n (float64). Batch-Instance Norm has two
normalized features, x̂_BN and x̂_IN: the same least squares with two regressors gives
``y ≈ p·x̂_BN + q·x̂_IN + b``, i.e. γ = p + q, ρ = p / γ — a closed form; when ρ falls outside [0, 1] it is
clipped and γ, β re-fitted with ρ fixed. Switchable Norm's importance weights enter non-linearly: for
each batch, a few Adam steps (:data:`SN_STEPS`, lr :data:`SN_LR`) on the site's squared error with
the input detached move both softmax logit vectors, then γ, β get the closed form on the new ``z``.
Sites whose swap is exact (frozen, sync, wn, BN left in place) have nothing to fit and are skipped.

**The readout.** Per-channel fits cannot undo everything (a per-sample statistic is not a per-channel
constant), and the residual reaches the classifier. When the outputs still differ after the pass
(relative error > :data:`READOUT_MIN_REL`) the model's final ``nn.Linear`` — the one whose output *is*
the model's output — is refit in closed form to the original's outputs on the same data: ridge
regression toward its trained weights (λ = :data:`READOUT_RIDGE` × the mean feature energy), from
running sums FᵀF, Fᵀt (memory independent of the data size). On the digits ResNet this lifts held-out
top-1 agreement after calibration from 0.98 / 0.94 / 0.91 to 0.996 / 0.98 / 0.97 for ln / gn / gn-ws
(256 digits in batches of 32; 0.993 / 0.978 / 0.969 in batches of 64).
``readout=False`` turns it off (and it is off when ``sites`` is given). The readout may also be a 1×1
convolution, and may be followed by a fixed link — sigmoid, softmax, tanh or identity — found on the
first batch (:mod:`normswap.keep.calibrate.readout`); the fit is then made in the link's pre-activation
space (the original's outputs through the inverse link, probabilities clamped). When no refit applies,
``report.readout["note"]`` says why in one line.

**Held-out data, never worse.** With ``heldout=`` (data the fit never sees; :func:`keep_function
<normswap.keep.recover.keep_function>` and the pipelines pass the model's held-out set, or 20% of the
calibration data split off with a fixed seed, :mod:`normswap.keep.heldout`), the report measures the
output kind's agreement (:mod:`normswap.keep.kinds`) on it before and after, and calibration never makes the
kind's distillation loss on it worse (:mod:`normswap.keep.calibrate.never_worse`, two or three held-out
passes whatever the number of sites; under :func:`keep_function <normswap.keep.recover.keep_function>` one or two of
the student alone, the original's outputs and the naive swap's coming from its naive measure's pass over
the same data, :class:`~normswap.keep.calibrate.never_worse.HeldoutRecord`): one screening pass scores the fitted model, the readout's
trained weights on the same features, and at every site the paired per-sample error against the
original with the fitted and the previous parameters; the readout refit, then the sites whose fit is
worse there beyond noise (:func:`normswap.keep.calibrate.paired.paired`: > 2 standard errors of the paired
difference), together, keep their previous parameters when that lowers the held-out loss (status
``kept-previous``); and when the result is still worse than the naive swap, everything is put back.
Each decision records both losses, the paired noise figure and its sample count. Where GroupNorm
cannot match a site (R² < :data:`LOW_R2`), the R² that LayerNorm or a neighbouring group count
reaches there is computed on the first calibration samples the fit pass kept
(:mod:`normswap.keep.calibrate.advice`) and the better alternative named (typical after a ReLU +
max-pool, whose non-negative inputs carry their signal in the group means).

**Layout.** ``taps`` (sites, the teacher's hooks), ``solvers`` (moments, Gram matrices, per-site
fits, R²), ``readout`` (the readout and its links), ``core`` (the pass), ``never_worse`` (the held-out checks),
``paired`` (the paired comparison), ``advice`` (the GN advice), ``metrics`` (agreement, drift),
``report``, ``dist``.

**How it streams.** Teacher (the original, eval, with temporary forward hooks that are removed and
its train/eval flags restored afterwards; it is never modified) and student (the swapped model, eval)
run side by side on each batch. The teacher's site outputs for the current batch are copied into
buffers reused from batch to batch (memory bounded by one batch). In the student each fitted norm runs
with γ = 1, β = 0 during the pass, so its own output is ``z``; its hook adds this batch's sums to the
running totals, solves the fit from the totals and returns ``γ·z + β`` with the new γ, β — so every
later site in the same forward already sees the calibrated earlier ones (graph order = execution
order). The fitted γ, β are written into the module at the end (also when the pass fails). On the
first batch this is exactly layer-by-layer greedy calibration; later batches refine it. (Solving all
sites together once per batch after the first, with each batch's outputs from the previous fit, was
measured: no faster at batches of 64 on the digits model, 5% at 32, and 1–4 held-out digits worse for
gn / gn-ws.) ``passes=2`` repeats the pass with fresh sums (the first pass's early batches saw less
calibrated upstream layers).

**Cost.** One pass = one teacher forward + one student forward per batch, plus per site a few
reductions (each sample's sums over its positions in the activation dtype, at least float32, added up
in float64; Σz² as a norm, so no squared copy is written) and a closed-form solve; the product z·y goes
through one reused buffer per activation shape, the fitted output is written into the norm's own
output, and the teacher's outputs into reused buffers (holding on to them instead made every later
allocation of the forward fault in fresh memory), so the pass allocates little beyond the two
forwards. The report's cost is the call's wall time, every check included, split into fit pass,
readout, held-out checks and advice, each as a ratio to the teacher's forward time inside the fit pass
(one forward of the original over the calibration data); ``benchmarks/bench.py`` (section 5) measures
the stage as ``run_conversion`` runs it against separate plain forwards (see the README for the
numbers; on the tiny 8×8 digits ResNet the per-site element-wise passes and Python hooks cost nearly
as much as its convolutions; Switchable Norm's gradient steps cost more).

**Distributed.** When ``torch.distributed`` is initialized with more than one process, each rank
takes its contiguous shard of every batch (``shard_batches=True``; pass False if your batches already
are this rank's) and the per-site sums (and Switchable Norm's gradients) are all-reduced before every
solve, so all ranks hold the same parameters as one process on the whole data (up to float rounding of
the sums).

**When it cannot help.** A per-channel affine cannot restore information the new norm removed:
Instance Norm erases each sample's per-channel means, which a classifier may depend on; weight
standardization removes each filter's mean. The report marks a site ``low-r2`` when the fit explains
less than :data:`LOW_R2` of the original's output variance, and ``cannot-help`` when in addition the
fit barely improved on the naive γ, β (R² gain < :data:`MIN_R2_GAIN`) — on the digits ResNet that is
every deep ``in`` site and most ``gn-ws`` sites — with a warning to recover by training
(:func:`normswap.keep.recover.recover`).
"""

from __future__ import annotations

from .core import calibrate
from .metrics import _Agreement, _evaluate, accuracy, agreement, agreement_and_drift, heldout_losses, layer_drift
from .readout import READOUT_MIN_REL, READOUT_RIDGE, _Readout, _ReadoutProbe
from .report import LOW_R2, MIN_R2_GAIN, CalibrationReport, SiteCalibration
from .solvers import (SN_BATCHES, SN_LR, SN_STEPS, _affine_solve, _BinFit, _Fit, _fit_quality, _gram, _moments, _quality,
                      _ridge_solve, _Scratch, _self_moments, _SNFit)
from .dist import _all_reduce, _dist_group
from .taps import _TeacherTap, _bn_eval, _inner, _kind, _leaves, _model_device, _to, swapped_sites

__all__ = [
    "LOW_R2",
    "MIN_R2_GAIN",
    "READOUT_RIDGE",
    "SN_BATCHES",
    "SN_LR",
    "SN_STEPS",
    "CalibrationReport",
    "SiteCalibration",
    "accuracy",
    "agreement",
    "agreement_and_drift",
    "calibrate",
    "layer_drift",
    "swapped_sites",
]
