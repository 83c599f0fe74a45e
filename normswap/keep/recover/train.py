"""The distillation loop (see the package docstring)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...defaults import DEFAULT_LR, DEFAULT_RECOVER_BATCH, DEFAULT_TEMPERATURE
from ..calibrate import _dist_group, _inner, _leaves, _model_device, _TeacherTap, _to, agreement, heldout_losses, swapped_sites
from ..heldout import compare_losses
from ...load.data import Rebatched, as_batches, local_batch
from ...errors import InputError, NormswapError
from .checkpoints import STATE_FILE, _fingerprint, _load_checkpoint, _read_state, _save_checkpoint
from .report import RecoveryReport


#: Adam's learning rate (cosine-decayed) and the distillation temperature, unless given.
#: augmentation noise, as a fraction of the input batch's standard deviation (see :func:`_augment`).
#: Off: on the digits model (10 seeds, 200 steps) 0.125 lifts ``in`` from 0.9898 to 0.9927 mean
#: held-out agreement but leaves gn / gn-ws / ln / ln-channels where they were (36 vs 35 of 40 runs
#: at >= 0.995, ln's mean 0.9949 vs 0.9953), so it is an option, not a default.
DEFAULT_NOISE = 0.0

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


def _kd_loss(s_out: Any, t_out: Any, temperature: float, outputs: Any = None) -> Tensor:
    """The distillation loss of the outputs' kind (:mod:`normswap.keep.kinds`; detected from ``t_out`` when
    ``outputs`` is None)."""
    from ..kinds import outputs_for

    return outputs_for(t_out, outputs).loss(s_out, t_out, temperature)


def _kd_loss_logits(s_out: Any, t_out: Any, temperature: float) -> Tensor:
    """The loss before output kinds (logits KL, else relative squared error); kept for reference."""
    s_l, t_l = _leaves(s_out), _leaves(t_out)
    if not s_l:
        raise NormswapError("the student returned no tensor output")
    s, t = s_l[0], t_l[0].detach()
    if s.dim() == 2 and s.shape[1] > 1:
        T = float(temperature)
        return F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), log_target=True, reduction="batchmean") * T * T
    return ((s - t) ** 2).sum() / (t * t).sum().clamp_min(1e-12)


def _augment(batch: tuple[Tensor, ...], shift: int, noise: float = 0.0, mix: bool = True) -> tuple[Tensor, ...]:
    """Label-free KD can train on any input the teacher labels, so (with ``mix``) every sample of the first input is
    mixed with another of the batch, x' = λ·x_i + (1 − λ)·x_j (λ ~ U(0, 1) per sample, j a random
    permutation), gets Gaussian noise of ``noise`` × the batch's standard deviation, and for images
    [N, C, H, W] is translated by up to ``shift`` pixels (zero padding). Uses the global torch RNG
    (seeded by :func:`recover`)."""
    x = batch[0]
    if not x.is_floating_point() or x.shape[0] < 2:
        return batch
    n = x.shape[0]
    out = x
    if mix:
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
        TextColumn("{task.fields[agree]}"), TimeRemainingColumn(),
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
    batch_size: int | None = DEFAULT_RECOVER_BATCH,
    heldout: Any = None,
    keep_best: bool = True,
    output_kind: Any = None,
    amp: str | None = None,
) -> RecoveryReport:
    """Distil ``teacher`` into ``student`` (a :class:`~normswap.Conversion` or the swapped module,
    trained in place) on ``batches`` for ``steps`` Adam steps; see the module docstring.

    ``batch_size``: regroup the data's samples into steps of this many (default
    :data:`~normswap.defaults.DEFAULT_RECOVER_BATCH`, 256, with Adam at lr 3e-3: the one set of defaults
    measured on every shipped model; None: the batches as given). Calibration wants small batches (each one refines the fit), distillation larger ones:
    on the digits model 256 per step beats 64 (see examples/recover_digits.py).

    ``sites`` (default: every swapped site) are the layers matched when ``feature_weight`` > 0.
    ``output_kind``: the outputs' kind (:data:`normswap.keep.kinds.KIND_NAMES` or an
    :class:`~normswap.keep.kinds.Outputs`; default: detected from the teacher's outputs on the first batch):
    it chooses the distillation loss and the measure ("agreement" below: top-1 agreement for
    classifiers, label agreement for multilabel, R² for regression, pixel agreement for dense).
    ``heldout`` (inputs, or batches, never trained on): agreement with the teacher is measured
    on it at the start and every ``eval_every`` steps (shown beside the bar); with ``keep_best`` (the
    default) the student ends with the weights of the best of those evaluations — the starting weights
    included — when their held-out loss is lower than the last step's beyond noise, so recovery never
    leaves a model measurably worse on held-out data than the one it was given (``keep_best=False``:
    the last step's weights, as ``normswap recover --keep-last``).
    ``amp``: ``"bf16"`` / ``"fp16"`` runs the training step's forwards and loss under autocast on the
    model's device (fp16 with a grad scaler; :class:`normswap.devices.Precision`); every evaluation
    stays float32. Returns a :class:`RecoveryReport`; the student keeps its train/eval flags."""
    from ...rewriting.convert import Conversion

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
    from ...devices import precision

    prec = precision(amp, device)
    scaler = prec.scaler()
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
    outputs = output_kind  # a name or None until the first evaluation detects the Outputs

    def agree() -> Any:
        return agreement(teacher, model, data, dist=dist if active else False, shard_batches=shard_batches, output_kind=outputs)

    first = agree()
    rep.agreement_before = dict(first)  # plain dicts in the report (it may be torch.save'd and loaded weights-only)
    from ..kinds import Outputs, outputs_for

    if not isinstance(outputs, Outputs):
        outputs = first.outputs or outputs_for(torch.zeros(1, 2), outputs or "logits")
    rep.output_kind, rep.measure = outputs.describe(), outputs.label
    rep.mixup = bool(augment and outputs.mixup)  # the kind decides whether inputs are mixed (Kind.mixup)

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
        from ... import __version__

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

    def held() -> tuple[Any, Tensor]:
        return heldout_losses(teacher, model, heldout, outputs)

    # keep-best on the continuous held-out loss: (mean loss, step, per-sample losses, weights) of the lowest so far
    best: tuple[float, int, Tensor, dict[str, Tensor]] | None = None
    start_losses: Tensor | None = None
    last_held: tuple[int, Any, Tensor] | None = None
    if heldout is not None:
        m0, l0 = held()
        if m0.quality is not None and l0.numel():
            rep.heldout_evals.append((start, m0.quality))
            rep.heldout_samples = m0.n
            rep.heldout_start = dict(m0)
            start_losses, last_held = l0, (start, m0, l0)
            best = (float(l0.mean()), start, l0, {k: v.detach().clone() for k, v in model.state_dict().items()})
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
                    batch = _augment(batch, shift, noise, mix=rep.mixup)
                with prec.autocast():
                    if tap is not None:
                        tap.enabled = True
                    with torch.no_grad():
                        t_out = teacher(*batch)
                    if tap is not None:
                        tap.enabled = False
                    s_out = net(*batch)
                    loss = outputs.loss(s_out, t_out, temperature)
                    if tap is not None:
                        fl = []
                        for n in names:
                            for s_f in feats[n]:
                                t_f = tap.pop(n)
                                if t_f is not None:
                                    s_f, t_f = s_f.float(), t_f.float()
                                    fl.append(((s_f - t_f) ** 2).sum() / (t_f * t_f).sum().clamp_min(1e-12))
                            feats[n].clear()
                        tap.clear()
                        if fl:
                            loss = loss + feature_weight * torch.stack(fl).mean()
                opt.zero_grad(set_to_none=True)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, steps, lr, schedule)
                if scaler is not None:  # fp16: scaled loss, unscaled step skipped on inf/NaN gradients
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
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
                    m_h, l_h = held()
                    a = m_h.quality
                    if a is not None:
                        rep.heldout_evals.append((step, a))
                        last_held = (step, m_h, l_h)
                        bar.update(task, agree=f"held-out {outputs.label} {m_h.format()} (n = {m_h.n})")
                        if best is not None and float(l_h.mean()) < best[0]:
                            best = (float(l_h.mean()), step, l_h, {k: v.detach().clone() for k, v in model.state_dict().items()})
                if target_agreement is not None and (step % eval_every == 0 or step == steps):
                    last_eval = (step, agree())
                    a = last_eval[1].quality
                    if a is not None:
                        rep.evals.append((step, a))
                        bar.update(task, agree=f"{outputs.label} {a:.4f} (calibration data)")
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
    if heldout is not None and best is not None:
        if last_held is None or last_held[0] != step:
            m_l, l_l = held()
            last_held = (step, m_l, l_l)
        _, m_last, l_last = last_held
        final_losses = l_last
        if keep_best and best[1] != step:
            # the best evaluation replaces the last weights only when its held-out loss is lower beyond noise
            vs = compare_losses(best[2], l_last)
            rep.keep_decision = {"best_step": best[1], "last_step": step, **vs.to_dict()}
            if vs.lower:
                model.load_state_dict(best[3])
                final_losses = best[2]
                rep.best_step = best[1]
                rep.notes.append(f"kept the weights of step {best[1]}: their held-out loss is lower than the last step's "
                                 f"({vs.describe()})")
            else:
                rep.best_step = step
        elif keep_best:
            rep.best_step = step
        if start_losses is not None and step > start and rep.best_step != start:
            change = compare_losses(final_losses, start_losses)
            rep.heldout_change = change.to_dict()
            if not change.lower and not change.higher:
                rep.notes.append(f"the held-out set (n = {change.n}) cannot tell the recovered model from the one recovery "
                                 f"started from ({change.describe()}); a larger --heldout set can")
    # the eval at the last step (target_agreement) already measured these weights on this data
    rep.agreement_after = dict(last_eval[1] if last_eval is not None and last_eval[0] == step else agree())
    rep.seconds = time.perf_counter() - t_start
    return rep
