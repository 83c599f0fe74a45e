"""Small-batch fine-tuning, measured: what each norm does when the batch is 1, 2, 8 or 32.

The bundled digits ResNet is fine-tuned with its labels (cross-entropy, Adam) as it is — BatchNorm, the
original — and as each batch-independent swap after calibration (γ/β carried over, then re-fitted to the
original on 256 unlabelled training digits), at batch sizes 1, 2, 8 and 32. Every run sees the same
number of samples in the same order (a seeded permutation of the training split, cut into batches of b),
so a run at batch 1 takes 32× the steps of one at batch 32. Accuracy is measured in eval mode on the
450 held-out digits; the table gives mean [min–max] over seeds, and the plot (accuracy vs batch size, one
line per target, min–max bars) is written to --plot.

    python examples/small_batch.py                       # bn, gn, gn-ws, ln, frozen; 3 seeds; 1,2,8,32
    python examples/small_batch.py --seeds 10 --samples 8192 --targets bn,gn,ln,ln-channels

BatchNorm cannot train at batch 1 here: its [N, 128] head refuses one value per channel ("refused").

Under ``torchrun --nproc_per_node 2`` the script instead compares plain BatchNorm (DDP: each process
normalizes with its own 1–2 samples) with synchronized BatchNorm (the statistics of every process's
samples pooled, all-reduced over gloo), at 1 and 2 samples per process:

    torchrun --nproc_per_node 2 examples/small_batch.py

``torch.nn.SyncBatchNorm`` only synchronizes CUDA tensors (on CPU it raises), so the CPU run uses
:class:`CpuSyncBatchNorm` below: the same computation — per-channel sums and sums of squares all-reduced
with a differentiable ``torch.distributed.nn.all_reduce``, normalized by the global batch statistics,
running statistics updated from them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
DEFAULT_PLOT = HERE / "small_batch.png"


# ----------------------------------------------------------------------------------- training


def finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch: int, samples: int, seed: int, lr: float,
             rank: int = 0, world: int = 1) -> nn.Module:
    """Fine-tune ``model`` in place on ``samples`` samples of (x, y) (a seeded permutation, repeated as
    needed) in global batches of ``batch × world``; this process takes its ``batch`` of each. Raises
    what torch raises when the batch cannot be trained (BatchNorm at batch 1)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    reps = -(-samples // len(x))
    order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(reps)])[:samples]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    step = batch * world
    for start in range(0, samples - step + 1, step):
        idx = order[start + rank * batch: start + (rank + 1) * batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).double().mean())


def summarize(values: list[float | None]) -> dict:
    ok = [v for v in values if v is not None]
    if not ok:
        return {"mean": None, "min": None, "max": None, "runs": values}
    return {"mean": sum(ok) / len(ok), "min": min(ok), "max": max(ok), "runs": values}


def cell(s: dict) -> str:
    if s["mean"] is None:
        return "refused"
    return f"{s['mean']:.3f} [{s['min']:.3f}–{s['max']:.3f}]"


# ----------------------------------------------------------------------------------- single process


def sweep(args: argparse.Namespace) -> dict:
    import normswap
    from normswap.keep.calibrate import calibrate
    from normswap.load.data import calibration_batches
    from normswap.models.digits import digits_resnet, load_digits

    original = digits_resnet()
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    calib = calibration_batches("digits", samples=256, batch=64)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    seeds = list(range(args.seed, args.seed + args.seeds))
    results: dict = {"original_accuracy": accuracy(original, xte, yte), "samples": args.samples, "lr": args.lr,
                     "seeds": seeds, "batch_sizes": sizes, "targets": {}}
    t0 = time.perf_counter()
    for t in targets:
        if t == "bn":
            start, before = original, results["original_accuracy"]
        else:
            conv = normswap.rewrite(original, t, (xte[:2],))
            calibrate(original, conv, calib)
            start, before = conv.model, accuracy(conv.model, xte, yte)
        row = {"before": before}
        for b in sizes:
            accs: list[float | None] = []
            for s in seeds:
                m = copy.deepcopy(start)
                try:
                    finetune(m, xtr, ytr, batch=b, samples=args.samples, seed=s, lr=args.lr)
                    accs.append(accuracy(m, xte, yte))
                except (ValueError, RuntimeError):  # BatchNorm1d: "Expected more than 1 value per channel"
                    accs.append(None)
            row[b] = summarize(accs)
            print(f"  {t:<12} batch {b:>3}: {cell(row[b])}  ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        results["targets"][t] = row
    results["seconds"] = time.perf_counter() - t0
    return results


def print_table(results: dict, title: str, first: str = "target", unit: str = "batch {}") -> None:
    from rich.console import Console
    from rich.table import Table

    sizes = results["batch_sizes"]
    t = Table(title=title, title_justify="left")
    t.add_column(first)
    t.add_column("before", justify="right")
    for b in sizes:
        t.add_column(unit.format(b), justify="right")
    for name, row in results["targets"].items():
        t.add_row(name, f"{row['before']:.3f}", *[cell(row[b]) for b in sizes])
    Console(width=max(100, 30 + 22 * len(sizes))).print(t)


def markdown(results: dict, first: str = "target", unit: str = "batch {}") -> str:
    sizes = results["batch_sizes"]
    lines = [f"| {first} | before fine-tuning | " + " | ".join(unit.format(b) for b in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for name, row in results["targets"].items():
        lines.append(f"| `{name}` | {row['before']:.3f} | " + " | ".join(cell(row[b]) for b in sizes) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- plot


def save_plot(results: dict, path: Path, title: str, xlabel: str = "batch size (log scale)") -> Path:
    from PIL import Image, ImageDraw, ImageFont

    try:
        f13, f16 = ImageFont.load_default(size=13), ImageFont.load_default(size=17)
    except TypeError:  # Pillow < 10.1
        f13 = f16 = ImageFont.load_default()
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127)]
    W, H, L, T, PW, PH = 900, 520, 80, 80, 560, 360
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((L, 14), title, fill="black", font=f16)
    d.text((L, 40), f"{results['samples']} samples seen per run, Adam lr {results['lr']:g}; mean over "
           f"{len(results['seeds'])} seeds, bars min-max", fill=(90, 90, 90), font=f13)
    sizes = results["batch_sizes"]
    lo_x, hi_x = math.log2(min(sizes)), math.log2(max(sizes))
    hi_x = hi_x if hi_x > lo_x else lo_x + 1
    vals = [v for row in results["targets"].values() for b in sizes for v in row[b]["runs"] if v is not None]
    lo = min(vals + [row["before"] for row in results["targets"].values()])
    step = 0.05 if lo > 0.5 else 0.1
    lo = math.floor((lo - 1e-9) / step) * step

    def px(b: int) -> float:
        return L + 30 + (PW - 60) * (math.log2(b) - lo_x) / (hi_x - lo_x)

    def py(v: float) -> float:
        return T + PH - 8 - (PH - 16) * (v - lo) / (1.0 - lo)

    d.rectangle([L, T, L + PW, T + PH], outline="black")
    for i in range(int(round((1.0 - lo) / step)) + 1):
        v = lo + i * step
        d.line([L, py(v), L + PW, py(v)], fill=(228, 228, 228))
        d.text((L - 44, py(v) - 7), f"{v:.2f}", fill="black", font=f13)
    for b in sizes:
        d.line([px(b), T + PH, px(b), T + PH + 5], fill="black")
        label = str(b)
        d.text((px(b) - d.textlength(label, font=f13) / 2, T + PH + 8), label, fill="black", font=f13)
    d.text((L + PW / 2 - d.textlength(xlabel, font=f13) / 2, T + PH + 28), xlabel, fill="black", font=f13)
    ylab = "held-out accuracy (eval mode)"
    tw = int(d.textlength(ylab, font=f13)) + 4
    lab = Image.new("RGBA", (tw, 18), (255, 255, 255, 0))
    ImageDraw.Draw(lab).text((0, 0), ylab, fill="black", font=f13)
    lab = lab.rotate(90, expand=True)
    img.paste(lab, (10, int(T + PH / 2 - tw / 2)), lab)
    n = len(results["targets"])
    for k, (name, row) in enumerate(results["targets"].items()):
        col = palette[k % len(palette)]
        dx = (k - (n - 1) / 2) * 5  # side by side, so the bars do not hide each other
        pts = []
        for b in sizes:
            s = row[b]
            if s["mean"] is None:
                x, y = px(b) + dx, T + PH - 20 - 14 * k
                d.line([x - 5, y - 5, x + 5, y + 5], fill=col, width=3)
                d.line([x - 5, y + 5, x + 5, y - 5], fill=col, width=3)
                continue
            x = px(b) + dx
            d.line([x, py(s["min"]), x, py(s["max"])], fill=col, width=2)
            pts.append((x, py(s["mean"])))
        if len(pts) > 1:
            d.line(pts, fill=col, width=3)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=col)
        ly = T + 8 + 24 * k
        d.line([L + PW + 20, ly + 8, L + PW + 46, ly + 8], fill=col, width=4)
        d.text((L + PW + 54, ly), name, fill="black", font=f13)
    ly = T + 8 + 24 * n + 8
    d.line([L + PW + 27, ly + 2, L + PW + 39, ly + 14], fill="black", width=3)
    d.line([L + PW + 27, ly + 14, L + PW + 39, ly + 2], fill="black", width=3)
    d.text((L + PW + 54, ly), "refused by torch", fill="black", font=f13)
    d.text((L + PW + 54, ly + 16), "(BN at batch 1)", fill="black", font=f13)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)
    return path


# ----------------------------------------------------------------------------------- torchrun: sync vs BN


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are pooled over the default process group (any backend,
    CPU included): what ``nn.SyncBatchNorm`` computes on CUDA."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_reduce

        if not self.training or not dist.is_initialized():
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype)
        stats = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))  # differentiable sum
        c = x.shape[1]
        total = stats[-1]
        if float(total.detach()) <= 1:
            raise ValueError("Expected more than 1 value per channel when training (across all processes)")
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * total / (total - 1), alpha=m)
            self.num_batches_tracked.add_(1)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def cpu_sync(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm1d/2d replaced by :class:`CpuSyncBatchNorm` (state copied)."""
    model = copy.deepcopy(model)
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
                new = CpuSyncBatchNorm(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine)
                new.load_state_dict(child.state_dict())
                setattr(mod, cname, new)
    return model


def distributed(args: argparse.Namespace) -> dict | None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from normswap.models.digits import digits_resnet, load_digits

    import warnings

    # torch.distributed.nn.functional.all_reduce (differentiable) is deprecated in favour of a private module
    warnings.filterwarnings("ignore", message=r".*all_reduce is deprecated", category=FutureWarning)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        original = digits_resnet()
        xtr, ytr = load_digits("train")
        xte, yte = load_digits("test")
        sizes = [int(b) for b in args.sync_batch_sizes.split(",")]
        seeds = list(range(args.seed, args.seed + args.seeds))
        results: dict = {"world_size": world, "samples": args.samples, "lr": args.lr, "seeds": seeds,
                         "batch_sizes": sizes, "targets": {}}
        t0 = time.perf_counter()
        for name, build in (("bn (per process)", lambda: copy.deepcopy(original)), ("sync (pooled)", lambda: cpu_sync(original))):
            row: dict = {"before": accuracy(original, xte, yte)}
            for b in sizes:
                accs: list[float | None] = []
                for s in seeds:
                    m = build()
                    ddp = DDP(m)  # buffers (BN running statistics) broadcast from rank 0 at every forward
                    try:
                        finetune(ddp, xtr, ytr, batch=b, samples=args.samples, seed=s, lr=args.lr, rank=rank, world=world)
                        ok = torch.ones(1)
                    except (ValueError, RuntimeError):
                        ok = torch.zeros(1)
                    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # a refusal on any rank refuses the run
                    accs.append(accuracy(m, xte, yte) if float(ok) == 1 else None)
                row[b] = summarize(accs)
                if rank == 0:
                    print(f"  {name:<17} {b}/process ({b * world} in all): {cell(row[b])}  ({time.perf_counter() - t0:.0f}s)",
                          file=sys.stderr, flush=True)
            results["targets"][name] = row
        results["seconds"] = time.perf_counter() - t0
        return results if rank == 0 else None
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="bn,gn,gn-ws,ln,frozen", help="bn (the original) and swap targets")
    p.add_argument("--batch-sizes", default="1,2,8,32")
    p.add_argument("--sync-batch-sizes", default="1,2", help="under torchrun: samples per process")
    p.add_argument("--samples", type=int, default=2048, help="samples seen per run (every batch size)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell: --seed, --seed+1, …")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (every batch size; fine-tuning: small)")
    p.add_argument("--plot", type=Path, default=None, help=f"PNG (default {DEFAULT_PLOT.relative_to(HERE.parent)}; "
                   "under torchrun small_batch_sync.png beside it)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny batches)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        results = distributed(args)
        if results is None:
            return None
        title = f"digits ResNet fine-tuned on {results['world_size']} processes: per-process BN vs synchronized BN"
        unit = "{} per process"
        print_table(results, title, first="norm", unit=unit)
        print(markdown(results, first="norm", unit=unit))
        plot = save_plot(results, args.plot or DEFAULT_PLOT.with_name("small_batch_sync.png"), title,
                         xlabel=f"samples per process (log scale; {results['world_size']} processes)")
    else:
        results = sweep(args)
        title = "digits ResNet fine-tuned at small batches: held-out accuracy"
        print_table(results, f"{title} (original {results['original_accuracy']:.3f}), mean \\[min–max] over seeds")
        print(markdown(results))
        plot = save_plot(results, args.plot or DEFAULT_PLOT, title)
    results["plot"] = str(plot)
    print(f"plot: {plot}  ({results['seconds']:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
