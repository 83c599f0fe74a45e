"""Output kinds: what a model's output *is*, so recovery distils it and every report measures it the right way.

A kind is detected from the original model's outputs on calibration data (:func:`detect`), or given
(``output_kind=`` / ``--output-kind``), or declared by the model (an attribute ``normswap_output_kind``, as
``normswap_input_shape`` declares the input). Each kind is registered (:func:`register`) with

* its **distillation loss** (student output vs the original's, differentiable in the student's);
* its **agreement measures** against the original, accumulated over batches in float64 (all-reducible
  under torch.distributed) — the first one, ``primary``, is the kind's *quality* (higher is better);
* its **ground-truth measure** against labels, when labels are known.

=============== ======================================== ================================================ =========================
kind            looks like                               loss (student s, original t, temperature T)      measures (primary first)
=============== ======================================== ================================================ =========================
logits          [N, K], K > 1, unbounded                 T²·KL(softmax(t/T) ‖ softmax(s/T)), per sample    top-1 agreement, rel err
probabilities   [N, K], ≥ 0, rows sum to 1 (softmax)     the same KL on log p (the logits up to a shift),  top-1 agreement, rel err
                                                         clamped at 1e-6: no log(0)
multilabel      [N, K] (or [N]) in [0, 1] (sigmoid)      T²·Σ_labels binary KL, on the logits log(p/(1−p)) label agreement at 0.5, MAE, rel err
                                                         of both (clamped to [1e-6, 1 − 1e-6])
peaked          [N, K], K ≥ 16, in [0, 1], each row one  T²·KL of the rows normalised to sum 1 (the bump's  peak within ±1 bin, mean |Δpeak| (bins),
                bump: a pitch / angle / age histogram    position and shape) + the per-bin binary KL        top-1, top-1 ±1, MAE, rel err
regression      anything else ([N, D], features, maps)   mean (s − t)² / the original's per-output        R², rel err
                                                         variance over the batch
dense           [N, C, H, W], C > 1, unbounded           T²·per-pixel KL over C                            pixel top-1 agreement, mIoU vs the original, rel err
=============== ======================================== ================================================ =========================

Every kind with a class or bin axis also reports top-1 agreement and top-1 within ±1 bin
(:data:`WITHIN_BINS`). A *decoder* (``decode=`` / ``--decode module:fn``, or the model's
``normswap_decode``) maps an output to the value the user reads (a pitch in cents, an angle); with it the
first output's measures lead with agreement in those units (:class:`Decoded`: the fraction within
``decode_tol``, the mean absolute difference), and that is the measure every report cites.

Every measure carries its sample count, and each proportion a 95% Wilson interval
(:meth:`Measures.interval`): a held-out figure over 51 samples is one sample in 2 points.

A dict / list / tuple output gets a kind per tensor leaf (:class:`Outputs`): the loss is the sum over
the leaves, the first leaf's measures keep their names and the others are prefixed by their path
(``['boxes'].r2``). ``rel_err`` is ‖out − ref‖/‖ref‖ over all leaves together.

The package: ``registry`` (the :class:`Kind` interface, torch-free), ``heads`` (the built-in kinds),
``decoded`` (user decoders), ``detection`` (:class:`Outputs`, :func:`detect`), ``measures`` (:class:`Meter`,
:class:`Measures`, :func:`wilson`). It imports torch only inside functions: :data:`KIND_NAMES` serves option validation.
"""

from __future__ import annotations

from .registry import EPS, KIND_NAMES, PEAK_HALF_WIDTH, PEAKED_MASS, PEAKED_MIN_BINS, WITHIN_BINS, Kind, check_name, get, register
from .heads import Dense, Logits, Multilabel, Peaked, Probabilities, Regression, peak_position
from .decoded import Decoded, resolve_decoder
from .detection import Outputs, detect, detect_kind, outputs_for
from .measures import Measures, Meter, measures_like, wilson

__all__ = ["EPS", "KIND_NAMES", "PEAK_HALF_WIDTH", "PEAKED_MASS", "PEAKED_MIN_BINS", "WITHIN_BINS", "Decoded", "Dense", "Kind",
           "Logits", "Measures", "Meter", "Multilabel", "Outputs", "Peaked", "Probabilities", "Regression", "check_name",
           "detect", "detect_kind", "get", "measures_like", "outputs_for", "peak_position", "register", "resolve_decoder",
           "wilson"]
