"""Recovery: label-free distillation of a swapped model back onto the original's function.

:func:`recover` trains the swapped model (the *student*, in place) to reproduce the original (the
*teacher*, frozen, eval mode) on unlabeled batches:

    loss = T² · KL(softmax(t/T) ‖ softmax(s/T))                      (first output [N, K]: logits)
         + feature_weight · mean over swapped sites of ‖s_site − t_site‖² / ‖t_site‖²

(an output that is not [N, K] logits is matched by its relative squared error instead of the KL).
Adam (default lr 1e-3, cosine-decayed to 0 over ``steps``), one batch per step, cycling over the data
in order. With ``augment`` (default) each batch is remixed before the teacher labels it: every sample is
mixed with another of the batch (mixup, λ ~ U(0, 1)), optionally gets Gaussian noise (``noise`` × the
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
:func:`~normswap.calibrate.calibrate`, :func:`recover` — measuring agreement (and accuracy, given
labels) and per-layer drift after each stage; :class:`FunctionReport` renders it, serializes it and
draws the drift plot as a PNG (with PIL; no matplotlib needed).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normswap.defaults import DEFAULT_LR, DEFAULT_TEMPERATURE  # noqa: F401 - re-exported
from .atomic import atomic_path, atomic_write_text
from .calibrate import (
    CalibrationReport,
    _dist_group,
    _inner,
    _leaves,
    _model_device,
    _TeacherTap,
    _to,
    accuracy,
    agreement,
    agreement_and_drift,
    calibrate,
    swapped_sites,
)
from .data import Rebatched, as_batches, local_batch
from .errors import InputError, NormswapError, first_line

__all__ = ["DEFAULT_LR", "DEFAULT_NOISE", "DEFAULT_TEMPERATURE", "STATE_FILE", "FunctionReport", "RecoveryReport", "keep_function", "recover", "save_drift_plot"]

STATE_FILE = "recover.json"
#: Adam's learning rate (cosine-decayed) and the distillation temperature, unless given.
#: augmentation noise, as a fraction of the input batch's standard deviation (see :func:`_augment`).
#: Off: on the digits model (10 seeds, 200 steps) 0.125 lifts ``in`` from 0.9898 to 0.9927 mean
#: held-out agreement but leaves gn / gn-ws / ln / ln-channels where they were (36 vs 35 of 40 runs
#: at >= 0.995, ln's mean 0.9949 vs 0.9953), so it is an option, not a default.
DEFAULT_NOISE = 0.0


# ---------------------------------------------------------------------------------------------------
# report


@dataclass
class RecoveryReport:
    """What :func:`recover` did."""

    steps: int
    start_step: int = 0
    end_step: int = 0
    stopped_early: bool = False
    resumed: bool = False
    seed: int = 0
    lr: float = DEFAULT_LR
    temperature: float = DEFAULT_TEMPERATURE
    feature_weight: float = 0.0
    schedule: str = "cosine"
    augment: bool = True
    noise: float = 0.0
    world_size: int = 1
    batch_size: int | None = None  # None: the data's own batches
    seconds: float = 0.0
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) on rank 0
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, top-1 agreement)
    agreement_before: dict[str, float | None] = field(default_factory=dict)
    agreement_after: dict[str, float | None] = field(default_factory=dict)
    heldout_evals: list[tuple[int, float]] = field(default_factory=list)  # (step, top-1 agreement on held-out data)
    best_step: int | None = None  # with keep_best: the step whose weights were kept
    checkpoint: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        r = lambda v: None if v is None else round(float(v), 6)
        return {
            "steps": self.steps, "start_step": self.start_step, "end_step": self.end_step,
            "stopped_early": self.stopped_early, "resumed": self.resumed, "seed": self.seed, "lr": self.lr,
            "temperature": self.temperature, "feature_weight": self.feature_weight,
            "schedule": self.schedule, "augment": self.augment, "noise": self.noise, "batch_size": self.batch_size, "world_size": self.world_size, "seconds": round(self.seconds, 3),
            "agreement_before": {k: r(v) for k, v in self.agreement_before.items()},
            "agreement_after": {k: r(v) for k, v in self.agreement_after.items()},
            "heldout_evals": [[st, r(a)] for st, a in self.heldout_evals], "best_step": self.best_step,
            "loss": [[s, r(v)] for s, v in self.history],
            "evals": [[s, r(v)] for s, v in self.evals],
            "checkpoint": self.checkpoint, "notes": list(self.notes),
        }

    def summary(self) -> str:
        a0 = self.agreement_before.get("top1_agreement")
        a1 = self.agreement_after.get("top1_agreement")
        ran = self.end_step - self.start_step
        s = f"recovery: {ran} step(s)"
        if self.resumed:
            s += f" (resumed at step {self.start_step})"
        s += f" in {self.seconds:.1f}s"
        if a0 is not None and a1 is not None:
            s += f"; top-1 agreement on the calibration data {a0:.4f} → {a1:.4f}"
        if self.stopped_early:
            s += f"; stopped early at step {self.end_step} (target reached)"
        if self.history:
            s += f"; final loss {self.history[-1][1]:.4g}"
        return s

    def __rich__(self) -> Any:
        from rich.text import Text

        return Text(self.summary())


# ---------------------------------------------------------------------------------------------------
# helpers


class _Cycle:
    """Batches in order, re-iterating the data when it runs out; starts at global batch index ``start``."""

    def __init__(self, data: Any, start: int) -> None:
        self.data = data
        try:
            n = len(data)
        except TypeError:
            n = None
        self.it: Iterator[Any] = iter(data)
        skip = start % n if n else start
        for _ in range(skip):
            self._next()

    def _next(self) -> Any:
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.data)
            try:
                return next(self.it)
            except StopIteration:
                raise InputError("recovery data yielded no batches; give at least one sample") from None

    def __next__(self) -> Any:
        return self._next()


WARMUP_FRACTION = 0.1


def _lr_at(step: int, steps: int, lr: float, schedule: str) -> float:
    """Learning rate for step ``step`` (0-based) of ``steps``: a linear warm-up over the first
    :data:`WARMUP_FRACTION` of the steps (Adam's first updates are ~lr on *every* parameter, which
    knocks a calibrated model off its fit), then constant or cosine-decayed to 0."""
    warm = max(1, round(steps * WARMUP_FRACTION))
    if step < warm:
        return lr * (step + 1) / (warm + 1)
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(steps - warm, 1)))
    return lr


def _kd_loss(s_out: Any, t_out: Any, temperature: float) -> Tensor:
    s_l, t_l = _leaves(s_out), _leaves(t_out)
    if not s_l:
        raise NormswapError("the student returned no tensor output")
    s, t = s_l[0], t_l[0].detach()
    if s.dim() == 2 and s.shape[1] > 1:
        T = float(temperature)
        return F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), log_target=True, reduction="batchmean") * T * T
    return ((s - t) ** 2).sum() / (t * t).sum().clamp_min(1e-12)


def _augment(batch: tuple[Tensor, ...], shift: int, noise: float = 0.0) -> tuple[Tensor, ...]:
    """Label-free KD can train on any input the teacher labels, so every sample of the first input is
    mixed with another of the batch, x' = λ·x_i + (1 − λ)·x_j (λ ~ U(0, 1) per sample, j a random
    permutation), gets Gaussian noise of ``noise`` × the batch's standard deviation, and for images
    [N, C, H, W] is translated by up to ``shift`` pixels (zero padding). Uses the global torch RNG
    (seeded by :func:`recover`)."""
    x = batch[0]
    if not x.is_floating_point() or x.shape[0] < 2:
        return batch
    n = x.shape[0]
    perm = torch.randperm(n, device=x.device)
    lam = torch.rand(n, device=x.device, dtype=x.dtype).reshape((n,) + (1,) * (x.dim() - 1))
    out = lam * x + (1 - lam) * x[perm]
    if noise > 0:
        out = out + torch.randn_like(out) * (noise * x.std())
    if shift > 0 and out.dim() == 4:
        h, w = out.shape[-2:]
        padded = F.pad(out, (shift, shift, shift, shift))
        offsets = torch.randint(0, 2 * shift + 1, (n, 2), device=x.device)
        res = torch.empty_like(out)
        for dy in range(2 * shift + 1):
            for dx in range(2 * shift + 1):
                sel = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
                if bool(sel.any()):
                    res[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
        out = res
    return (out, *batch[1:])


def _freeze_left_bns(model: nn.Module) -> None:
    """BatchNorms the swap left in place keep their running statistics while the rest trains."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


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


class _StageBar:
    """Recovery's bar drawn by a :class:`normswap.progress.Progress` stage (a pipeline's progress)."""

    def __init__(self, progress: Any, total: int, start: int) -> None:
        self._cm = progress.stage("recover", total=total, detail=f"from step {start}" if start else "")
        self._start, self._task, self._fields = start, None, {}

    def __enter__(self) -> _StageBar:
        self._task = self._cm.__enter__()
        if self._start:
            self._task.advance(self._start)
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._cm.__exit__(*exc)

    def update(self, _task: Any, advance: int = 0, **fields: Any) -> None:
        self._fields.update(fields)
        self._task.advance(advance, **self._fields)


def _progress(enabled: Any, total: int, start: int):
    """Recovery's progress bar: ``enabled`` is a bool (a rich bar on stderr, or none) or a
    :class:`normswap.progress.Progress` whose "recover" stage draws it."""
    if hasattr(enabled, "stage"):
        return _StageBar(enabled, total, start), None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    p = Progress(
        TextColumn("recover"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TextColumn("agree {task.fields[agree]}"), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled, transient=False,
    )
    task = p.add_task("recover", total=total, completed=start, loss="—", agree="—")
    return p, task


# ---------------------------------------------------------------------------------------------------
# recover


def recover(
    teacher: nn.Module,
    student: Any,
    batches: Any,
    *,
    steps: int,
    lr: float = DEFAULT_LR,
    temperature: float = DEFAULT_TEMPERATURE,
    feature_weight: float = 0.0,
    seed: int = 0,
    schedule: str = "cosine",
    augment: bool = True,
    shift: int = 1,
    noise: float = DEFAULT_NOISE,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 50,
    resume: bool = True,
    target_agreement: float | None = None,
    eval_every: int = 25,
    progress: bool = True,
    sites: Sequence[str] | None = None,
    dist: Any = None,
    shard_batches: bool = True,
    batch_size: int | None = None,
    heldout: Any = None,
    keep_best: bool = False,
) -> RecoveryReport:
    """Distil ``teacher`` into ``student`` (a :class:`~normswap.Conversion` or the swapped module,
    trained in place) on ``batches`` for ``steps`` Adam steps; see the module docstring.

    ``batch_size``: regroup the data's samples into steps of this many (default: the batches as
    given). Calibration wants small batches (each one refines the fit), distillation larger ones:
    on the digits model 256 per step beats 64 (see examples/recover_digits.py).

    ``sites`` (default: every swapped site) are the layers matched when ``feature_weight`` > 0.
    ``heldout`` (inputs, or batches, never trained on): top-1 agreement with the teacher is measured
    on it at the start and every ``eval_every`` steps (shown beside the bar); with ``keep_best`` the
    student ends with the weights of the best of those evaluations — the starting weights included, so
    recovery never leaves a model that agrees less on held-out data than the one it was given.
    Returns a :class:`RecoveryReport`; the student keeps its train/eval flags."""
    from .convert import Conversion

    conv = student if isinstance(student, Conversion) else None
    model = conv.model if conv is not None else student
    if not isinstance(model, nn.Module) or not isinstance(teacher, nn.Module):
        raise InputError("recover(teacher, student, batches): give the original nn.Module and a Conversion or nn.Module")
    if model is teacher:
        raise InputError("recover needs the original model and a swapped copy, not the same module twice")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise InputError(f"steps must be a non-negative integer, got {steps!r}")
    if not lr > 0 or not temperature > 0 or not feature_weight >= 0 or not noise >= 0:
        raise InputError("lr and temperature must be positive, feature_weight and noise non-negative")
    if schedule not in ("cosine", "constant"):
        raise InputError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if checkpoint_every < 1 or eval_every < 1:
        raise InputError("checkpoint_every and eval_every must be at least 1")
    if target_agreement is not None and not 0.0 < target_agreement <= 1.0:
        raise InputError(f"target_agreement must be in (0, 1], got {target_agreement}")
    active, group, rank, world = _dist_group(dist)
    data = as_batches(batches) if batch_size is None else Rebatched(as_batches(batches), batch_size)
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    rep = RecoveryReport(steps=steps, seed=seed, lr=lr, temperature=temperature, feature_weight=feature_weight,
                         schedule=schedule, augment=augment, noise=noise if augment else 0.0, world_size=world, batch_size=batch_size,
                         checkpoint=None if ckdir is None else str(ckdir))
    t_start = time.perf_counter()
    device = _model_device(model)
    flags = [(m, m.training) for m in model.modules()]
    teacher_flags = [(m, m.training) for m in teacher.modules()]

    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the student has no trainable parameters")
    opt = torch.optim.Adam(params, lr=lr)
    start = 0
    history: list[tuple[int, float]] = []
    conversion_id = getattr(conv, "conversion_id", None)
    if ckdir is not None and resume:
        earlier = _read_state(ckdir)
        other = earlier.get("conversion_id") if earlier is not None else None
        if conversion_id is not None and other is not None and other != conversion_id:
            # e.g. `convert --save DIR` again after a recovery in DIR: not this conversion's run
            rep.notes.append(f"checkpoints in {ckdir} belong to another conversion (an earlier --save into the "
                             "same directory); started fresh")
            state = None
        else:
            state = _load_checkpoint(ckdir, model, opt)
        if state is not None:
            start = int(state["step"])
            try:
                history = [(int(h[0]), float(h[1])) for h in state.get("history", [])]
            except (TypeError, ValueError, IndexError, KeyError):
                raise InputError(f"checkpoint record {ckdir / STATE_FILE} has a damaged loss history; "
                                 f"delete {ckdir} or pass resume=False / --no-resume") from None
            rep.resumed = True
            changed = [k for k, v in (("seed", seed), ("lr", lr), ("temperature", temperature), ("feature_weight", feature_weight),
                                      ("schedule", schedule), ("augment", augment), ("noise", noise), ("steps", steps),
                                      ("batch_size", batch_size))
                       if k in state and state[k] != v]
            if changed:
                rep.notes.append(f"resumed with different {', '.join(changed)} than the checkpoint recorded")
            if state.get("world_size", world) != world:
                rep.notes.append(f"checkpoint written with {state.get('world_size')} process(es), resumed with {world}")
    rep.start_step = start
    def agree() -> dict[str, float | None]:
        return agreement(teacher, model, data, dist=dist if active else False, shard_batches=shard_batches)

    rep.agreement_before = agree()

    names = list(sites) if sites is not None else (swapped_sites(teacher, model, conv) if feature_weight > 0 else [])
    tap = _TeacherTap(teacher, names) if feature_weight > 0 else None
    if tap is not None:
        tap.enabled = False  # only the training step's teacher forward records
    feats: dict[str, list[Tensor]] = {n: [] for n in names}
    smods = dict(model.named_modules())
    handles = []
    if feature_weight > 0:
        for n in names:
            if n not in smods:
                raise InputError(f"feature site {n} is not a module of the swapped model")
            handles.append(_inner(smods[n]).register_forward_hook(
                # a copy: the student's own in-place ops (ReLU(inplace=True)) would overwrite ``o`` before the loss
                lambda m, a, o, n=n: feats[n].append(o.clone()) if torch.is_grad_enabled() else None))

    net: nn.Module = model
    if active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group)

    fingerprint = _fingerprint(model)

    def state_record(step: int) -> dict[str, Any]:
        from . import __version__

        return {"normswap": __version__, "step": step, "steps": steps, "seed": seed, "lr": lr,
                "temperature": temperature, "feature_weight": feature_weight, "schedule": schedule,
                "augment": augment, "noise": noise, "batch_size": batch_size, "world_size": world, "model_fingerprint": fingerprint,
                "conversion_id": conversion_id, "history": [[s, v] for s, v in history]}

    def checkpoint(step: int) -> None:
        if ckdir is None:
            return
        if rank == 0:
            _save_checkpoint(ckdir, model, opt, state_record(step))
        if active:
            import torch.distributed as tdist

            tdist.barrier(group=group)

    last_eval: tuple[int, dict[str, float | None]] | None = None

    def held() -> float | None:
        return agreement(teacher, model, heldout)["top1_agreement"]

    best: tuple[float, int, dict[str, Tensor]] | None = None  # (held-out agreement, step, weights)
    if heldout is not None:
        a0 = held()
        if a0 is not None:
            rep.heldout_evals.append((start, a0))
            best = (a0, start, {k: v.detach().clone() for k, v in model.state_dict().items()})
    bar, task = _progress(progress if rank == 0 and steps > start else False, steps, start)
    step = start
    try:
        teacher.eval()
        model.train()  # the evals below run under eval_mode, which restores these flags
        _freeze_left_bns(model)
        cyc = _Cycle(data, start)
        with bar:
            while step < steps:
                batch = next(cyc)
                if active and shard_batches:
                    batch = local_batch(batch, rank, world)
                    if batch is None:
                        step += 1  # every rank skips it alike
                        continue
                batch = _to(batch, device)
                if augment:
                    batch = _augment(batch, shift, noise)
                if tap is not None:
                    tap.enabled = True
                with torch.no_grad():
                    t_out = teacher(*batch)
                if tap is not None:
                    tap.enabled = False
                s_out = net(*batch)
                loss = _kd_loss(s_out, t_out, temperature)
                if tap is not None:
                    fl = []
                    for n in names:
                        for s_f in feats[n]:
                            t_f = tap.pop(n)
                            if t_f is not None:
                                fl.append(((s_f - t_f) ** 2).sum() / (t_f * t_f).sum().clamp_min(1e-12))
                        feats[n].clear()
                    tap.clear()
                    if fl:
                        loss = loss + feature_weight * torch.stack(fl).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, steps, lr, schedule)
                opt.step()
                step += 1
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise NormswapError(f"recovery diverged at step {step} (loss {lv}); lower the learning rate (--lr)")
                history.append((step, lv))
                bar.update(task, advance=1, loss=f"{lv:.4g}")
                if step % checkpoint_every == 0 and step < steps:
                    checkpoint(step)
                if heldout is not None and (step % eval_every == 0 or step == steps):
                    a = held()
                    if a is not None:
                        rep.heldout_evals.append((step, a))
                        bar.update(task, agree=f"{a:.4f} held-out")
                        if best is not None and a > best[0]:
                            best = (a, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
                if target_agreement is not None and (step % eval_every == 0 or step == steps):
                    last_eval = (step, agree())
                    a = last_eval[1]["top1_agreement"]
                    if a is not None:
                        rep.evals.append((step, a))
                        bar.update(task, agree=f"{a:.4f}")
                        if a >= target_agreement:
                            rep.stopped_early = step < steps
                            break
        if step > start or (ckdir is not None and not rep.resumed):
            checkpoint(step)
    finally:
        for h in handles:
            h.remove()
        if tap is not None:
            tap.remove()
        for m, f in flags:
            m.training = f
        for m, f in teacher_flags:
            m.training = f
    rep.end_step = step
    rep.history = history
    if keep_best and best is not None:
        last = rep.heldout_evals[-1] if rep.heldout_evals and rep.heldout_evals[-1][0] == step else (step, held())
        if last[1] is not None and best[0] > last[1]:
            model.load_state_dict(best[2])
            rep.best_step = best[1]
            rep.notes.append(f"kept the weights of step {best[1]} (held-out top-1 agreement {best[0]:.4f}); "
                             f"the last step {step} had {last[1]:.4f}")
        else:
            rep.best_step = step
    # the eval at the last step (target_agreement) already measured these weights on this data
    rep.agreement_after = last_eval[1] if last_eval is not None and last_eval[0] == step else agree()
    rep.seconds = time.perf_counter() - t_start
    return rep


# ---------------------------------------------------------------------------------------------------
# the pipeline: naive → calibrated → recovered


@dataclass
class StageMetrics:
    stage: str  # naive | calibrated | recovered
    agreement: dict[str, float | None]
    accuracy: float | None = None
    drift: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage,
                "agreement": {k: None if v is None else round(float(v), 6) for k, v in self.agreement.items()},
                "accuracy": None if self.accuracy is None else round(self.accuracy, 6),
                "drift": {k: round(v, 6) for k, v in self.drift.items()}}


@dataclass
class FunctionReport:
    """Agreement with the original (and accuracy, given labels) after each stage, per-layer drift,
    and the calibration and recovery reports. ``evaluated_on`` names the data the metrics use."""

    target: str
    evaluated_on: str
    original_accuracy: float | None
    stages: list[StageMetrics]
    calibration: CalibrationReport | None = None
    recovery: RecoveryReport | None = None
    plot: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of "calibrate" and "recover"

    def stage(self, name: str) -> StageMetrics | None:
        return next((s for s in self.stages if s.stage == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "evaluated_on": self.evaluated_on,
            "original_accuracy": None if self.original_accuracy is None else round(self.original_accuracy, 6),
            "stages": [s.to_dict() for s in self.stages],
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "recovery": None if self.recovery is None else self.recovery.to_dict(),
            "drift_plot": self.plot,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        from .report import Column, FittedTable

        rows: list[list[Any]] = []
        for s in self.stages:
            a, r = s.agreement.get("top1_agreement"), s.agreement.get("rel_err")
            d = list(s.drift.values())
            rows.append([s.stage, "—" if a is None else f"{a:.4f}", "—" if r is None else f"{r:.4f}",
                         "—" if s.accuracy is None else f"{s.accuracy:.4f}",
                         f"{sum(d) / len(d):.4f}" if d else "—", f"{max(d):.4f}" if d else "—"])
        no_acc = all(s.accuracy is None for s in self.stages)
        cols = [Column("stage"), Column("top-1\nagreement", justify="right"), Column("output\nrel err", justify="right"),
                Column("accuracy", justify="right", drop=3 if no_acc else 1, why="no labels" if no_acc else ""),
                Column("layer drift\nmean", justify="right", drop=2), Column("layer drift\nmax", justify="right")]
        title = f"keeping the trained function: --to {self.target} (measured on {self.evaluated_on})"
        parts: list[Any] = [FittedTable(cols, rows, title=title)]
        if self.original_accuracy is not None:
            parts.append(Text(f"original accuracy {self.original_accuracy:.4f}"))
        if self.calibration is not None:
            parts.append(Text(self.calibration.summary()))
            parts += [Text(w, style="yellow") for w in self.calibration.warnings]
        if self.recovery is not None:
            parts.append(Text(self.recovery.summary()))
        if self.plot:
            parts.append(Text(f"per-layer drift plot: {self.plot}"))
        return Group(*parts)


def _split_eval(heldout: Any) -> tuple[Any, Tensor | None, Tensor | None]:
    """(inputs for agreement, x, y) from (x, y), x, or batches."""
    if isinstance(heldout, (tuple, list)) and len(heldout) == 2 and all(isinstance(t, Tensor) for t in heldout) \
            and heldout[1].dim() == 1 and not heldout[1].is_floating_point():
        x, y = heldout
        return [(x[i:i + 256],) for i in range(0, len(x), 256)], x, y
    return heldout, None, None


def keep_function(
    original: nn.Module,
    conversion: Any,
    calib: Any,
    *,
    heldout: Any = None,
    heldout_name: str | None = None,
    calibrate_: bool = True,
    recover_steps: int = 0,
    recover_batch: int | None = None,
    seed: int = 0,
    lr: float = DEFAULT_LR,
    temperature: float = DEFAULT_TEMPERATURE,
    feature_weight: float = 0.0,
    augment: bool = True,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    target_agreement: float | None = None,
    progress: Any = True,
    plot: str | os.PathLike[str] | None = None,
) -> FunctionReport:
    """Naive swap → calibration → recovery on ``conversion`` (its model is changed in place), with
    agreement vs ``original`` after each stage on ``heldout`` ((x, labels), inputs, or batches;
    default: the calibration data), accuracy when labels are given, per-layer drift, and the drift
    plot written to ``plot`` (PNG)."""
    model = conversion.model
    eval_data, x, y = _split_eval(heldout if heldout is not None else calib)
    where = heldout_name or ("held-out data" if heldout is not None else "the calibration data")
    sites = swapped_sites(original, model, conversion)

    def measure(stage: str) -> StageMetrics:
        agree, drift = agreement_and_drift(original, model, eval_data, sites=sites)
        return StageMetrics(stage=stage, agreement=agree, accuracy=None if y is None else accuracy(model, x, y),
                            drift=drift)

    rep = FunctionReport(target=conversion.to, evaluated_on=where,
                         original_accuracy=None if y is None else accuracy(original, x, y), stages=[measure("naive")])
    if calibrate_:
        t0 = time.perf_counter()
        total = len(calib) if hasattr(calib, "__len__") else None
        with (progress.stage("calibrate", total=total) if hasattr(progress, "stage") else contextlib.nullcontext()) as task:
            rep.calibration = calibrate(original, conversion, calib, on_batch=None if task is None else task.advance)
        rep.seconds["calibrate"] = time.perf_counter() - t0
        rep.stages.append(measure("calibrated"))
    if recover_steps > 0:
        t0 = time.perf_counter()
        rep.recovery = recover(original, conversion, calib, steps=recover_steps, lr=lr, temperature=temperature,
                               feature_weight=feature_weight, seed=seed, augment=augment,
                               checkpoint_dir=checkpoint_dir, target_agreement=target_agreement, progress=progress,
                               batch_size=recover_batch)
        rep.seconds["recover"] = time.perf_counter() - t0
        rep.stages.append(measure("recovered"))
    if plot is not None:
        rep.plot = str(save_drift_plot(rep, plot))
    return rep


# ---------------------------------------------------------------------------------------------------
# the drift plot (PIL)

_COLORS = {"naive": (214, 39, 40), "calibrated": (255, 127, 14), "recovered": (44, 160, 44)}


def save_drift_plot(report: FunctionReport, path: str | os.PathLike[str]) -> Path:
    """Per-layer drift (‖y_new − y_orig‖/‖y_orig‖ at each swapped site, log scale) for every stage, as a
    PNG at ``path`` (written atomically)."""
    from PIL import Image, ImageDraw, ImageFont

    stages = [s for s in report.stages if s.drift]
    sites = list(dict.fromkeys(k for s in stages for k in s.drift))
    W, H, L, R, T, B = 960, 580, 80, 170, 64, 150
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    d.text((L, 12), f"per-layer drift vs the original: --to {report.target} ({report.evaluated_on})", fill="black", font=font)
    d.text((L, 34), "|y_new - y_orig| / |y_orig| at each swapped site (log scale), in execution order", fill=(90, 90, 90), font=font)
    x0, x1, y0, y1 = L, W - R, T, H - B
    d.rectangle([x0, y0, x1, y1], outline="black")
    vals = [v for s in stages for v in s.drift.values() if v > 0]
    if not sites or not vals:
        d.text((x0 + 10, y0 + 10), "no swapped sites to plot", fill="black", font=font)
    else:
        lo = math.floor(math.log10(min(vals)))
        hi = math.ceil(math.log10(max(vals)))
        if hi == lo:
            hi = lo + 1

        def px(i: int) -> float:
            return x0 + 20 + (x1 - x0 - 40) * (i / max(len(sites) - 1, 1))

        def py(v: float) -> float:
            v = max(v, 10.0 ** lo)
            return y1 - (y1 - y0) * (math.log10(v) - lo) / (hi - lo)

        for e in range(lo, hi + 1):  # decades
            yy = py(10.0 ** e)
            d.line([x0, yy, x1, yy], fill=(225, 225, 225))
            d.text((8, yy - 7), f"1e{e}", fill="black", font=font)
        for i, name in enumerate(sites):
            xx = px(i)
            d.line([xx, y1, xx, y1 + 4], fill="black")
            text = name if len(name) <= 22 else ".." + name[-20:]
            tw = max(1, math.ceil(d.textlength(text, font=font)) + 2)
            label = Image.new("RGBA", (min(tw, B - 10), 16), (255, 255, 255, 0))
            ImageDraw.Draw(label).text((0, 0), text, fill="black", font=font)
            rot = label.rotate(90, expand=True)  # reads bottom-up, ending just below the axis
            img.paste(rot, (int(xx) - 8, y1 + 6), rot)
        for s in stages:
            col = _COLORS.get(s.stage, (31, 119, 180))
            pts = [(px(i), py(s.drift[n])) for i, n in enumerate(sites) if n in s.drift]
            if len(pts) > 1:
                d.line(pts, fill=col, width=2)
            for (xx, yy) in pts:
                d.ellipse([xx - 3, yy - 3, xx + 3, yy + 3], fill=col)
        for k, s in enumerate(stages):  # legend
            col = _COLORS.get(s.stage, (31, 119, 180))
            ly = y0 + 10 + 22 * k
            d.line([x1 + 15, ly + 7, x1 + 40, ly + 7], fill=col, width=3)
            a = s.agreement.get("top1_agreement")
            d.text((x1 + 46, ly), s.stage + (f" ({a:.3f})" if a is not None else ""), fill="black", font=font)
        d.text((x1 + 15, y0 + 10 + 22 * len(stages) + 6), "(top-1 agreement)", fill=(90, 90, 90), font=font)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
