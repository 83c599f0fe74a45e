"""Recovery: label-free distillation of a swapped model back onto the original's function.

:func:`recover` trains the swapped model (the *student*, in place) to reproduce the original (the
*teacher*, frozen, eval mode) on unlabeled batches:

    loss = the output kind's distillation loss (s, t, T)           (summed over the outputs)
         + feature_weight · mean over swapped sites of ‖s_site − t_site‖² / ‖t_site‖²

where the kind (:mod:`normswap.keep.kinds`, detected from the teacher's outputs or ``output_kind=``) is
logits: T²·KL(softmax(t/T) ‖ softmax(s/T)); probabilities: the same KL on log p; multilabel: T²·Σ binary
KL on the logits log(p/(1−p)); regression: (s − t)² over the teacher's per-output variance; dense:
per-pixel KL. Held-out agreement (the kind's primary measure: top-1 agreement, label agreement, R²,
pixel agreement) is what ``heldout`` evaluations, ``keep_best`` and the progress bar show.
Adam (default lr 3e-3, cosine-decayed to 0 over ``steps``), one batch per step, cycling over the data
in order. With ``augment`` (default) each batch is remixed before the teacher labels it: every sample is
mixed with another of the batch (mixup, λ ~ U(0, 1); not for regression outputs, where it was measured
to cost R²: :attr:`normswap.keep.kinds.Kind.mixup`), optionally gets Gaussian noise (``noise`` × the
batch's standard deviation; :data:`DEFAULT_NOISE`) and images are shifted by up to ``shift`` pixels
— the teacher provides the targets, so any input is a valid training example, and a few hundred
calibration samples then cover far more of the input space (on the digits model this is what brings
held-out agreement from ~0.98 to ~0.99+). The student runs in training mode except for BatchNorms the
swap left in place, which keep their running statistics (eval mode). Everything is seeded: the same
seed, data and settings give the same weights, also across an interrupted and resumed run.

**Checkpoints** (``checkpoint_dir``, every ``checkpoint_every`` steps and at the end):
``ckpt-<step>.safetensors`` (the student's weights), ``ckpt-<step>.optim.pt`` (Adam's state and the
RNG state, read back with ``torch.load(weights_only=True)``) and ``recover.json`` (step, settings,
loss history), which is written last and names the complete checkpoint: an interrupted write never
leaves a checkpoint that resumes wrongly. With ``resume`` a later call continues from it.

**Early stop**: every ``eval_every`` steps, top-1 agreement with the teacher on all the batches; stop
once it reaches ``target_agreement``.

**Distributed** (torchrun; gloo on CPU, nccl on GPU): when ``torch.distributed`` is initialized with
more than one process, every rank takes its contiguous shard of each batch, the student is wrapped in
DistributedDataParallel (gradients averaged), agreement is all-reduced, and rank 0 writes checkpoints
and draws the progress bar.

:func:`keep_function` runs the whole "keep the trained function" pipeline on a conversion — naive swap,
:func:`~normswap.keep.calibrate.calibrate`, :func:`recover` — measuring agreement (and accuracy, given
labels) and per-layer drift after each stage; :class:`FunctionReport` renders it, serializes it and
draws the drift plot as a PNG (with PIL; no matplotlib needed).
"""

from __future__ import annotations

from normswap.defaults import DEFAULT_LR, DEFAULT_TEMPERATURE  # noqa: F401 - re-exported
from .checkpoints import STATE_FILE, _fingerprint, _load_checkpoint, _read_state, _save_checkpoint  # noqa: F401
from .keep import _split_eval, check_finite_model, keep_function  # noqa: F401
from .plot import save_drift_plot
from .report import FunctionReport, RecoveryReport, StageMetrics
from .train import DEFAULT_NOISE, _augment, _kd_loss, _lr_at, recover  # noqa: F401

__all__ = ["DEFAULT_LR", "DEFAULT_NOISE", "DEFAULT_TEMPERATURE", "STATE_FILE", "FunctionReport", "RecoveryReport", "StageMetrics",
           "keep_function", "recover", "save_drift_plot"]
