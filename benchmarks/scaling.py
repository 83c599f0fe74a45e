"""Section 7 of benchmarks/bench.py (``--scaling``): throughput where real models train.

* recovery's time per step against a plain hand-written PyTorch distillation loop (same model, batch,
  data, device, temperature, Adam lr; no augmentation on either side), per precision;
* calibration against plain forward passes of the original over the same batches;
* image-folder calibration with ``workers`` 0 against 2 (and the data pass alone);
* peak memory of calibration (resnet50 at batch 64 by default), in a fresh subprocess: peak RSS on the
  CPU, ``torch.cuda.max_memory_allocated`` on a GPU, against a plain forward of the same batch.

Every ratio is normswap / baseline from interleaved rounds in one process (median of the rounds).
Runs unchanged on a GPU (``--device cuda``): timings synchronize the device.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

TEMPERATURE, LR = 2.0, 1e-3


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: Any) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def build(name: str, size: int, device: Any) -> tuple[Any, tuple[int, ...]]:
    """(original in eval mode on ``device``, one sample's shape): digits, or a torchvision model with
    random weights and trained-looking BN statistics."""
    import torch

    if name == "digits":
        from normswap.models.digits import digits_resnet

        return digits_resnet().to(device), (1, 8, 8)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.to(device), (3, size, size)


class _Clock:
    """A :class:`normswap.progress.Progress` stand-in that stamps the time at every finished step."""

    def __init__(self) -> None:
        self.ticks: list[float] = []

    def stage(self, name: str, total: int | None = None, detail: str = "") -> Any:
        clock = self

        class _Stage:
            def __enter__(self) -> Any:
                return self

            def __exit__(self, *exc: Any) -> None:
                return None

            def advance(self, n: int = 1, **fields: Any) -> None:
                if n:
                    clock.ticks.append(time.perf_counter())

        return _Stage()

    def per_step(self) -> float:
        """Seconds per step between the first and the last finished step (evaluations before and after,
        and the first step's warm-up, excluded)."""
        return (self.ticks[-1] - self.ticks[0]) / (len(self.ticks) - 1)


def hand_loop(teacher: Any, student: Any, batches: list[Any], steps: int, amp: str | None, device: Any) -> float:
    """The loop a user would write: teacher under no_grad, student forward, temperature KL, Adam, the
    loss read back each step (as normswap's loop does); returns its seconds per step (as :class:`_Clock`)."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=LR)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    teacher.eval()
    student.train()
    T = TEMPERATURE
    ticks: list[float] = []
    for i in range(steps):
        x = batches[i % len(batches)][0].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            loss = F.kl_div(F.log_softmax(s.float() / T, 1), F.log_softmax(t.float() / T, 1), log_target=True,
                            reduction="batchmean") * T * T
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        float(loss.detach())
        ticks.append(time.perf_counter())
    return (ticks[-1] - ticks[0]) / (len(ticks) - 1)


def bench_recovery(model: Any, shape: tuple[int, ...], batch: int, steps: int, rounds: int, amps: list[str | None],
                   device: Any) -> list[dict[str, Any]]:
    """normswap ``recover`` vs :func:`hand_loop`, seconds per step between the first and the last step."""
    import torch

    import normswap
    from normswap.keep.recover import recover

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, *shape, generator=g),) for _ in range(4)]
    out = []
    for amp in amps:
        ns, hand = [], []
        for r in range(rounds + 1):  # round 0 warms up
            model.cpu()  # the rewrite traces on the CPU
            s1, s2 = (normswap.rewrite(model, "gn", (batches[0][0][:2],), verify=False) for _ in range(2))
            model.to(device)
            for s in (s1, s2):
                s.model.to(device)
            clock = _Clock()
            h = 0.0
            # alternate which runs first, so neither always meets a warmer (or busier) machine
            for which in ("ours", "hand") if r % 2 else ("hand", "ours"):
                if which == "ours":
                    # batch_size=None: the batches as given, like the hand loop (the default regroups them into steps of 256)
                    recover(model, s1, batches, steps=steps, lr=LR, temperature=TEMPERATURE, augment=False, progress=clock,
                            amp=amp, batch_size=None)
                else:
                    h = hand_loop(model, s2.model, batches, steps, amp, device)
            if r:
                ns.append(clock.per_step())
                hand.append(h)
        m_ns, m_hand = statistics.median(ns), statistics.median(hand)
        out.append({"amp": amp or "float32", "normswap_step_s": ns, "hand_step_s": hand, "normswap_median_s": m_ns,
                    "hand_median_s": m_hand, "ratio": m_ns / m_hand, "steps": steps, "batch": batch,
                    "steps_per_s": 1 / m_ns})
    return out


def bench_calibration(model: Any, shape: tuple[int, ...], batch: int, rounds: int, device: Any) -> dict[str, Any]:
    """calibrate (gn) vs plain forwards of the original over the same 4 batches."""
    import torch

    import normswap
    from normswap.keep.calibrate import calibrate

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch, *shape, generator=g),) for _ in range(4)]

    def forward() -> None:
        with torch.no_grad():
            for b in batches:
                model(b[0].to(device))

    fw, cal = [], []
    for r in range(rounds + 1):
        conv = normswap.rewrite(model.cpu(), "gn", (batches[0][0][:2],), verify=False)
        model.to(device)
        conv.model.to(device)
        f = _timed(forward, device)
        c = _timed(lambda: calibrate(model, conv, batches), device)
        if r:
            fw.append(f)
            cal.append(c)
    return {"forward_s": fw, "calibrate_s": cal, "ratio": statistics.median(cal) / statistics.median(fw),
            "samples": 4 * batch}


def make_folder(root: Path, n: int, channels: int) -> Path:
    """``n`` JPEGs (PNGs for 1 channel) of 500×375 crops of scikit-learn's two 640×427 sample photos: the
    average ImageNet training image's size, so decoding costs what it does on real folders."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for i in range(n):
        im = photos[i % 2]
        y, x = int(rng.integers(0, im.shape[0] - 375)), int(rng.integers(0, im.shape[1] - 500))
        crop = im[y:y + 375, x:x + 500]
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        if channels == 1:
            Image.fromarray(crop.mean(2).astype(np.uint8), mode="L").save(d / f"{i:05d}.png")
        else:
            Image.fromarray(crop).save(d / f"{i:05d}.jpg", quality=90)
    return root


def bench_workers(model: Any, shape: tuple[int, ...], images: int, batch: int, rounds: int, device: Any,
                  workers: tuple[int, int] = (0, 2)) -> dict[str, Any]:
    """Image-folder calibration (gn) and the data pass alone, ``workers[0]`` vs ``workers[1]``, interleaved."""
    import torch

    import normswap
    from normswap.keep.calibrate import calibrate
    from normswap.load.data import calibration_batches

    with tempfile.TemporaryDirectory(prefix="normswap-bench-images-") as td:
        folder = make_folder(Path(td), images, shape[0])
        size = shape[1:]
        data = {w: calibration_batches(folder, batch=batch, size=size, workers=w, device=device, model=model,
                                       pin_memory=device.type == "cuda") for w in workers}
        times: dict[str, list[float]] = {f"{k}{w}": [] for w in workers for k in ("data", "calib")}
        for r in range(rounds + 1):
            for w in workers:
                d = _timed(lambda: [b for b in data[w]], device)
                conv = normswap.rewrite(model.cpu(), "gn", (torch.randn(2, *shape),), verify=False)
                model.to(device)
                conv.model.to(device)
                c = _timed(lambda: calibrate(model, conv, data[w]), device)
                if r:
                    times[f"data{w}"].append(d)
                    times[f"calib{w}"].append(c)
        med = {k: statistics.median(v) for k, v in times.items()}
        a, b = workers
        return {"images": images, "batch": batch, "workers": list(workers), "times": times, "median_s": med,
                "data_speedup": med[f"data{a}"] / med[f"data{b}"], "calib_speedup": med[f"calib{a}"] / med[f"calib{b}"]}


_MEMORY_CHILD = r"""
import json, resource, sys, torch
sys.path.insert(0, {bench_dir!r})
from scaling import build
import normswap
from normswap.keep.calibrate import calibrate
torch.set_num_threads({threads})
dev = torch.device({device!r})
model, shape = build({model!r}, {size}, dev)
x = torch.randn({batch}, *shape, generator=torch.Generator().manual_seed(0))
conv = normswap.rewrite(model.cpu(), "gn", (x[:2],), verify=False)
model.to(dev); conv.model.to(dev)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
base = rss()
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(dev); base_cuda = torch.cuda.memory_allocated(dev)
if {mode!r} == "forward":
    with torch.no_grad():
        model(x.to(dev))
else:
    calibrate(model, conv, [(x,)])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {{"baseline_rss": base, "peak_rss": peak}}
if dev.type == "cuda":
    out.update(peak_cuda=torch.cuda.max_memory_allocated(dev), baseline_cuda=base_cuda)
print("RESULT " + json.dumps(out))
"""


def bench_memory(model: str, size: int, batch: int, device: Any, threads: int) -> dict[str, Any]:
    """Peak memory of one calibration batch vs one plain forward, each in a fresh process."""
    res: dict[str, Any] = {"model": model, "batch": batch, "size": size, "input_bytes": batch * 3 * size * size * 4}
    for mode in ("forward", "calibrate"):
        code = _MEMORY_CHILD.format(bench_dir=str(Path(__file__).parent), threads=threads, device=str(device),
                                    model=model, size=size, batch=batch, mode=mode)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            res[mode] = {"error": (p.stderr.strip().splitlines() or ["no output"])[-1][:200]}
            continue
        r = json.loads(line[7:])
        key = "cuda" if "peak_cuda" in r else "rss"
        r["extra_bytes"] = r[f"peak_{key}"] - r[f"baseline_{key}"]
        res[mode] = r
    f, c = res.get("forward", {}), res.get("calibrate", {})
    if "extra_bytes" in f and "extra_bytes" in c:
        res["ratio"] = c["extra_bytes"] / max(f["extra_bytes"], 1)
    return res


def run(args: Any) -> dict[str, Any]:
    """Every measurement of section 7 for the parsed bench.py ``args``."""
    import torch

    from normswap.devices import resolve_device

    device = resolve_device(args.device)
    model, shape = build(args.scaling_model, args.scaling_size, device)
    amps = [None if a in ("none", "float32") else a for a in args.scaling_amp.split(",") if a]
    out: dict[str, Any] = {"device": str(device), "model": args.scaling_model, "input": list(shape),
                           "threads": torch.get_num_threads()}
    out["recovery"] = bench_recovery(model, shape, args.scaling_batch, args.scaling_steps, args.scaling_rounds, amps, device)
    out["calibration"] = bench_calibration(model, shape, args.scaling_batch, args.scaling_rounds, device)
    out["workers"] = bench_workers(model, shape, args.folder_images, args.scaling_batch, args.scaling_rounds, device)
    if args.memory_model != "none":
        out["memory"] = bench_memory(args.memory_model, args.memory_size, args.memory_batch, device, torch.get_num_threads())
    return out


def print_tables(console: Any, res: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"7. scaling on {res['device']}: {res['model']} {res['input']}, {res['threads']} torch threads "
                    "(normswap / plain PyTorch, interleaved rounds, medians)")
    for c in ("measure", "normswap", "baseline", "ratio"):
        t.add_column(c)
    for r in res["recovery"]:
        t.add_row(f"recovery step, batch {r['batch']}, {r['amp']} ({r['steps']} steps × {len(r['normswap_step_s'])} rounds)",
                  f"{r['normswap_median_s']:.3f} s ({r['steps_per_s']:.2f} steps/s)", f"{r['hand_median_s']:.3f} s hand loop",
                  f"{r['ratio']:.2f}×")
    c = res["calibration"]
    t.add_row(f"calibration (gn), {c['samples']} samples", f"{statistics.median(c['calibrate_s']):.2f} s",
              f"{statistics.median(c['forward_s']):.2f} s plain forwards", f"{c['ratio']:.2f}×")
    w = res["workers"]
    a, b = w["workers"]
    m = w["median_s"]
    t.add_row(f"image folder, {w['images']} JPEGs: data pass", f"{m[f'data{b}']:.2f} s with {b} workers",
              f"{m[f'data{a}']:.2f} s with {a}", f"{w['data_speedup']:.2f}× faster")
    t.add_row(f"image folder, {w['images']} JPEGs: calibration", f"{m[f'calib{b}']:.2f} s with {b} workers",
              f"{m[f'calib{a}']:.2f} s with {a}", f"{w['calib_speedup']:.2f}× faster")
    mem = res.get("memory")
    if mem:
        f, cal = mem.get("forward", {}), mem.get("calibrate", {})
        if "extra_bytes" in f and "extra_bytes" in cal:
            key = "peak_cuda" if "peak_cuda" in cal else "peak_rss"
            t.add_row(f"peak memory, {mem['model']} batch {mem['batch']} at {mem['size']}² ({key})",
                      f"+{cal['extra_bytes'] / 2**30:.2f} GiB (peak {cal[key] / 2**30:.2f} GiB)",
                      f"+{f['extra_bytes'] / 2**30:.2f} GiB one forward", f"{mem['ratio']:.2f}×")
        else:
            t.add_row("peak memory", str(cal.get("error") or f.get("error")), "", "")
    console.print(t)
