#!/usr/bin/env python
"""normswap benchmark: fold time, ONNX graph size and onnxruntime latency, as ratios against the
tools a user would otherwise reach for, all measured in the same run.

    python benchmarks/bench.py                       # default: 4 torchvision models, --targets fold
    python benchmarks/bench.py --quick               # smoke run: resnet18, few repeats (< 2 min)
    python benchmarks/bench.py --targets fold,gn-ws,ln,sn --json out.json
    python benchmarks/bench.py --targets all         # every target in normswap.targets()
    python benchmarks/bench.py --models none --calib-targets gn,gn-ws,ln   # calibration cost only
    python benchmarks/bench.py --startup             # CLI start-up only (seconds)

What is compared (every ratio is normswap / baseline, so < 1 means normswap is faster/smaller):

1. Fold time: the public ``normswap.rewrite(model, "fold", (x,), verify=False)`` and the internal pass
   ``normswap.rewriting.fold.fold(model, (x,))`` vs ``torch.fx.experimental.optimization.fuse(model)``; each
   copies the model itself. ``rewrite`` with verification (``verify=True``) is timed too, and its
   extra cost reported apart. One warm-up call each, then ``--repeats`` calls each,
   interleaved (alternating order), garbage collector off while timing; the median is reported,
   and the ratio of the minima too (the best estimate of the intrinsic cost on a loaded machine).
   The end-to-end ``normswap convert`` cost is measured two ways: the equivalent API calls
   (``rewrite(verify=True)`` + ``export_onnx`` + ``check_parity`` at batch 1 and 3, which is what
   the CLI runs) and, unless ``--no-cli``, a subprocess ``normswap convert
   torchvision.models:NAME --onnx ... --report ...`` (wall time including Python start-up and
   imports, plus the stage times from its report).
2. ONNX node counts: normswap's folded export vs ``torch.onnx.export`` of the *unfolded* eval
   model with the TorchScript exporter (same opset, dynamic batch, constant folding — exactly the
   settings normswap uses) and with the dynamo exporter (``dynamo=True, optimize=True``). Both
   exporters fold eval Conv+BN themselves; the BatchNormalization column shows where they do not.
   Also the node counts of onnxruntime's own ORT_ENABLE_ALL-optimized graphs
   (``SessionOptions.optimized_model_filepath``).
3. onnxruntime latency (CPU EP, ORT_ENABLE_ALL, ``--threads`` intra-op threads, 1 inter-op
   thread, thread spinning off so idle sessions do not steal the cores from the measured one):
   all variants of a model are measured in one interleaved loop (round-robin, rotating order),
   after a warm-up, and the median per variant is reported. The number of rounds fits
   ``--latency-budget`` seconds per (model, batch), clamped to [--min-runs, --max-runs].
4. Swap targets (``--targets`` besides ``fold``): ``normswap.rewrite(model, to, (x,))`` time
   (median of --swap-repeats), export time, node count, and batch-1 onnxruntime latency of the
   swapped ONNX as a ratio to the BN-folded ONNX of the same model (measured interleaved).
   A target that raises is skipped with a note.
5. Calibration cost (``--calib-targets``, ``--calib-models``): the calibration *stage* as the user runs
   it — ``run_conversion(model=…, to=T, calib=data)``'s ``calibrate`` timing (a 20% held-out split, the
   never-worse checks, the advice) — and the bare ``normswap.keep.calibrate.calibrate`` on a fresh swap (all
   the data, no held-out set), each vs one plain forward pass of the original (eval, no grad) over the
   same batches, interleaved, ``--calib-repeats`` times; the ratio of the medians (the issue's target:
   ≤ 3×), the ratio of the minima, the stage's parts as its report splits them, the report's quoted
   seconds over the stage's measured ones (should be 1), and, as the alternative a user would otherwise reach for, one epoch
   of label-free distillation (``normswap.keep.recover.recover``, one step per batch, no augmentation) as a
   ratio to the same forward. Data: the bundled digits model gets 256 training digits in batches of
   64; torchvision models get 64 seeded Gaussian images of ``--calib-size``² in batches of 16 (the
   cost does not depend on the pixel values).

6. Start-up (every run; ``--startup`` runs only this): wall time of ``normswap --help``,
   ``normswap convert --help``, ``normswap targets`` and ``normswap version`` as subprocesses, against
   ``python -c "import torch"`` (what every command paid before the CLI started lazily) and ``python
   -c pass`` (the interpreter alone). One untimed warm-up each (run with ``-X importtime``, which
   says whether the command imported torch), then ``--startup-runs`` timed runs, interleaved
   (rotating order); median and min per command, ratio of the medians to ``import torch``.

Models: ``torchvision.models.get_model(name, weights=None)`` (random weights; timing does not
depend on them), eval mode, input 1x3x224x224, seed 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

DEFAULT_MODELS = "resnet18,resnet50,mobilenet_v2,efficientnet_b0"
DEFAULT_SWAP_MODELS = "resnet18,resnet50,mobilenet_v2"
DEFAULT_CALIB_TARGETS = "gn,gn-ws,ln"
DEFAULT_CALIB_MODELS = "digits,resnet18"
INPUT_SHAPE = (1, 3, 224, 224)

QUICK = {"models": "resnet18", "repeats": 3, "swap_repeats": 1, "latency_budget": 6.0, "min_runs": 15, "max_runs": 200,
         "warmup": 5, "calib_models": "digits", "calib_repeats": 3, "startup_runs": 5}


# ---------------------------------------------------------------------------------------------
# arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark normswap against torch.fx fuse, the plain ONNX exporters and onnxruntime's optimizer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", default=None, help=f"comma-separated torchvision model names (default {DEFAULT_MODELS}; --quick: resnet18)")
    p.add_argument("--targets", default="fold",
                   help="comma-separated: 'fold' and/or swap targets from normswap.targets() (e.g. gn-ws,gn,ln,sn); 'all' = every registered one")
    p.add_argument("--swap-models", default=DEFAULT_SWAP_MODELS, help="models (among --models) on which swap targets are measured")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of fold / fx fuse (default 7; --quick: 3)")
    p.add_argument("--swap-repeats", type=int, default=None, help="timed repeats of each swap rewrite (default 3; --quick: 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads and onnxruntime intra-op threads")
    p.add_argument("--batches", default="1", help="comma-separated batch sizes for the onnxruntime latency table (e.g. 1,8)")
    p.add_argument("--latency-budget", type=float, default=None, help="seconds of timed runs per (model, batch) (default 20; --quick: 6)")
    p.add_argument("--min-runs", type=int, default=None, help="min timed runs per variant (default 20; --quick: 15)")
    p.add_argument("--max-runs", type=int, default=None, help="max timed runs per variant (default 300; --quick: 200)")
    p.add_argument("--warmup", type=int, default=None, help="untimed onnxruntime runs per variant before timing (default 10; --quick: 5)")
    p.add_argument("--exporter", default="auto", choices=["auto", "torchscript", "dynamo"], help="normswap export_onnx exporter")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset for every export (default: normswap's default)")
    p.add_argument("--baselines", default="torchscript,dynamo",
                   help="plain torch.onnx.export baselines of the unfolded model: torchscript, dynamo (comma-separated, or 'none')")
    p.add_argument("--no-ort-optimized", action="store_true", help="skip onnxruntime's own optimized-graph variant")
    p.add_argument("--ort-spinning", action="store_true", help="leave onnxruntime intra-op thread spinning on (default off)")
    p.add_argument("--no-cli", action="store_true", help="skip the `normswap convert` subprocess timing")
    p.add_argument("--profile-fold", action="store_true", help="cProfile normswap fold and fx fuse per model and print a phase breakdown")
    p.add_argument("--json", dest="json_out", default=None, help="also write all results (raw samples included) to this JSON file")
    p.add_argument("--keep", default=None, help="keep the ONNX files in this directory (default: a temporary directory)")
    p.add_argument("--calib-targets", default=DEFAULT_CALIB_TARGETS,
                   help="swap targets whose calibration cost is measured ('none' to skip)")
    p.add_argument("--calib-models", default=None,
                   help=f"'digits' (the bundled model) and/or torchvision names (default {DEFAULT_CALIB_MODELS}; --quick: digits)")
    p.add_argument("--calib-repeats", type=int, default=None, help="timed calibrations per (model, target) (default 5; --quick: 3)")
    p.add_argument("--calib-size", type=int, default=112, help="image side of the torchvision models' calibration data")
    p.add_argument("--quick", action="store_true", help="fast smoke run: resnet18 only, few repeats, short latency budget")
    p.add_argument("--startup", action="store_true", help="measure only the CLI start-up (section 6)")
    p.add_argument("--scaling", action="store_true", help="measure only section 7: recovery vs a hand-written loop, "
                   "calibration vs forwards, image-folder workers 0 vs 2, calibration peak memory")
    p.add_argument("--device", default="auto", help="section 7: where the model runs (auto, cpu, cuda, cuda:N)")
    p.add_argument("--scaling-model", default=None, help="section 7's model (default resnet18; --quick: digits)")
    p.add_argument("--scaling-size", type=int, default=None, help="section 7's image side (default 112)")
    p.add_argument("--scaling-batch", type=int, default=None, help="section 7's batch (default 32; --quick: 64 on digits)")
    p.add_argument("--scaling-steps", type=int, default=None, help="recovery steps per timed round (default 10; --quick: 5)")
    p.add_argument("--scaling-rounds", type=int, default=None, help="timed rounds (default 3; --quick: 2)")
    p.add_argument("--scaling-amp", default="none,bf16", help="recovery precisions to time: none, bf16, fp16")
    p.add_argument("--folder-images", type=int, default=None, help="JPEGs in the workers benchmark (default 128; --quick: 64)")
    p.add_argument("--memory-model", default=None, help="calibration peak memory model, or none (default resnet50; --quick: none)")
    p.add_argument("--memory-batch", type=int, default=64, help="calibration peak memory batch")
    p.add_argument("--memory-size", type=int, default=224, help="calibration peak memory image side")
    p.add_argument("--startup-runs", type=int, default=None, help="timed runs per start-up command (default 10; --quick: 5)")
    args = p.parse_args(argv)

    defaults = {"models": DEFAULT_MODELS, "repeats": 7, "swap_repeats": 3, "latency_budget": 20.0, "min_runs": 20,
                "max_runs": 300, "warmup": 10, "calib_models": DEFAULT_CALIB_MODELS, "calib_repeats": 5, "startup_runs": 10}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, QUICK[k] if args.quick else v)
    scaling = {"scaling_model": ("resnet18", "digits"), "scaling_size": (112, 8), "scaling_batch": (32, 64),
               "scaling_steps": (10, 5), "scaling_rounds": (3, 2), "folder_images": (128, 64), "memory_model": ("resnet50", "none")}
    for k, (full, quick) in scaling.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    args.model_list = [] if args.models.strip() == "none" else [m.strip() for m in args.models.split(",") if m.strip()]
    args.calib_target_list = [] if args.calib_targets.strip() in ("", "none") else [t.strip() for t in args.calib_targets.split(",") if t.strip()]
    args.calib_model_list = [m.strip() for m in args.calib_models.split(",") if m.strip()]
    args.swap_model_list = [m.strip() for m in args.swap_models.split(",") if m.strip()]
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    args.baseline_list = [] if args.baselines.strip() in ("", "none") else [b.strip() for b in args.baselines.split(",") if b.strip()]
    for b in args.baseline_list:
        if b not in ("torchscript", "dynamo"):
            p.error(f"unknown baseline {b!r}; use torchscript, dynamo or none")
    if args.calib_repeats < 1 or args.calib_size < 8:
        p.error("--calib-repeats must be positive and --calib-size at least 8")
    if args.repeats < 1 or args.swap_repeats < 1 or args.threads < 1 or not args.batch_list or min(args.batch_list) < 1:
        p.error("--repeats, --swap-repeats, --threads and batch sizes must be positive")
    if args.startup_runs < 1:
        p.error("--startup-runs must be positive")
    if not args.model_list and not args.calib_target_list and not args.startup:
        p.error("nothing to measure: --models none and --calib-targets none")
    return args


# ---------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one call, garbage collector off while it runs (as timeit does)."""
    wall, _, out = timed_cpu(fn)
    return wall, out


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call, garbage collector off while it runs.
    (CPU time goes to the JSON only: on a loaded machine it swings as much as wall time, because
    page faults and memory-bandwidth contention are charged to this process too.)"""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - t, time.process_time() - c, out
    finally:
        if was:
            gc.enable()


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[i]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def short_error(e: BaseException, limit: int = 160) -> str:
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def quiet() -> Any:
    """Silence exporter progress prints, warnings and log records."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")
    saved = [(lg, lg.level) for lg in (logging.getLogger(n) for n in names)]
    try:
        for lg, _ in saved:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def count_bn(model: Any) -> int:
    from torch import nn

    return sum(1 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def max_rel_err(ref: Any, out: Any) -> float:
    import torch

    with torch.no_grad():
        return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def total_nodes(counts: dict[str, int] | None) -> int | None:
    return None if counts is None else sum(counts.values())


# ---------------------------------------------------------------------------------------------
# 1. fold time


def bench_fold(model: Any, x: Any, repeats: int) -> dict[str, Any]:
    import torch
    import normswap.rewriting.fold
    from torch.fx.experimental.optimization import fuse

    import normswap

    res: dict[str, Any] = {"notes": []}
    fns: dict[str, Callable[[], Any]] = {
        "normswap": lambda: normswap.rewriting.fold.fold(model, (x,)),  # the internal pass
        "rewrite": lambda: normswap.rewrite(model, "fold", (x,), verify=False),  # what a user calls
        "verified": lambda: normswap.rewrite(model, "fold", (x,)),  # ... with verification, timed apart
        "fx": lambda: fuse(model),
    }
    label = {"normswap": "normswap fold", "rewrite": "normswap.rewrite", "verified": "normswap.rewrite(verify)", "fx": "fx fuse"}
    outs: dict[str, Any] = {}
    for key in list(fns):  # warm-up (and a correctness check of what each produced)
        try:
            outs[key] = fns[key]()
        except Exception as e:
            res["notes"].append(f"{label[key]} failed: {short_error(e)}")
            del fns[key]
    wall: dict[str, list[float]] = {k: [] for k in (*label, "deepcopy")}
    cpu: dict[str, list[float]] = {k: [] for k in (*label, "deepcopy")}
    for i in range(repeats):
        order = list(fns) if i % 2 == 0 else list(reversed(list(fns)))
        for key in order:
            w, c, _ = timed_cpu(fns[key])
            wall[key].append(w)
            cpu[key].append(c)
        w, c, _ = timed_cpu(lambda: copy.deepcopy(model))
        wall["deepcopy"].append(w)
        cpu["deepcopy"].append(c)
    with torch.no_grad():
        ref = model(x)
        if "normswap" in outs:
            folded = outs["normswap"].model
            res["normswap_bn_left"] = count_bn(folded)
            res["normswap_max_rel_err"] = max_rel_err(ref, folded(x))
        if "fx" in outs:
            res["fx_bn_left"] = count_bn(outs["fx"])
            res["fx_max_rel_err"] = max_rel_err(ref, outs["fx"](x))
    for key in wall:
        res[f"{key}_s"] = wall[key]
        res[f"{key}_cpu_s"] = cpu[key]
        res[f"{key}_median_s"] = median(wall[key])
        res[f"{key}_cpu_median_s"] = median(cpu[key])
    res["ratio"] = ratio(res["normswap_median_s"], res["fx_median_s"])
    res["public_ratio"] = ratio(res["rewrite_median_s"], res["fx_median_s"])
    res["public_min_ratio"] = ratio(min(wall["rewrite"], default=None), min(wall["fx"], default=None))
    res["verify_s"] = None if res["verified_median_s"] is None or res["rewrite_median_s"] is None else res["verified_median_s"] - res["rewrite_median_s"]
    res["cpu_ratio"] = ratio(res["normswap_cpu_median_s"], res["fx_cpu_median_s"])
    res["min_ratio"] = ratio(min(wall["normswap"], default=None), min(wall["fx"], default=None))
    return res


# (file suffix, function name) → phase label; cumulative cProfile time of each
PROFILE_PHASES = {
    "normswap": [
        ("normswap/rewriting/fold.py", "fold", "total"),
        ("copy.py", "deepcopy", "deepcopy (model, + any other deepcopy)"),
        ("normswap/rewriting/capture.py", "capture", "capture (fx trace)"),
        ("normswap/rewriting/capture.py", "propagate_shapes", "shape propagation"),
        ("normswap/rewriting/sites.py", "find_sites", "find_sites"),
        ("normswap/rewriting/sites.py", "can_fold", "can_fold (plans)"),
        ("normswap/rewriting/fold.py", "_fold_into_producer", "fold into producer (weights + module copy)"),
        ("normswap/rewriting/fold.py", "fold_conv_bn_weights", "  of which fold_conv_bn_weights (float64)"),
        ("normswap/rewriting/fold.py", "_fold_into_consumer", "fold into consumer"),
        ("normswap/rewriting/passes.py", "assemble", "assemble (lint, recompile)"),
    ],
    "fx": [
        ("fx/experimental/optimization.py", "fuse", "total"),
        ("copy.py", "deepcopy", "deepcopy (model + each fused conv)"),
        ("fx/_symbolic_trace.py", "symbolic_trace", "symbolic_trace"),
        ("nn/utils/fusion.py", "fuse_conv_bn_eval", "fuse_conv_bn_eval (conv deepcopy + weights)"),
        ("nn/utils/fusion.py", "fuse_conv_bn_weights", "  of which fuse_conv_bn_weights (float32)"),
    ],
}


def profile_fold(model: Any, x: Any, runs: int = 3) -> dict[str, dict[str, float]]:
    """Cumulative cProfile seconds per phase of normswap fold and fx fuse (min over ``runs``)."""
    import cProfile
    import pstats

    import normswap.rewriting.fold
    from torch.fx.experimental.optimization import fuse

    fns = {"normswap": lambda: normswap.rewriting.fold.fold(model, (x,)), "fx": lambda: fuse(model)}
    out: dict[str, dict[str, float]] = {}
    for tool, fn in fns.items():
        best: dict[str, float] = {}
        for _ in range(runs):
            prof = cProfile.Profile()
            try:
                prof.enable()
                fn()
            except Exception:
                break
            finally:
                prof.disable()
            stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
            got: dict[str, float] = {}
            for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.items():
                for suffix, fname, phase in PROFILE_PHASES[tool]:
                    if func == fname and filename.replace(os.sep, "/").endswith(suffix):
                        got[phase] = got.get(phase, 0.0) + ct
            for k, v in got.items():
                best[k] = min(best.get(k, v), v)
        out[tool] = {phase: best[phase] for _s, _f, phase in PROFILE_PHASES[tool] if phase in best}
    return out


# ---------------------------------------------------------------------------------------------
# end-to-end convert


def bench_e2e_api(model: Any, x: Any, path: Path, exporter: str, opset: int | None) -> tuple[dict[str, Any], Any]:
    """The calls `normswap convert --to fold --onnx` makes: rewrite(verify) → export → parity."""
    import normswap

    t: dict[str, Any] = {}
    t["rewrite_s"], conv = timed(lambda: normswap.rewrite(model, "fold", (x,), verify=True))
    with quiet():
        t["export_s"], exp = timed(lambda: normswap.export_onnx(conv.model, (x,), path, exporter=exporter, opset=opset,
                                                                        verify=False))  # as the CLI: parity below checks it
    t["parity_s"], par = timed(lambda: normswap.check_parity(model, conv.model, path, input_shape=tuple(x.shape)))
    t["total_s"] = t["rewrite_s"] + t["export_s"] + t["parity_s"]
    t["exporter"] = exp.exporter
    t["opset"] = exp.opset
    t["parity_passed"] = bool(par)
    t["summary"] = conv.summary()
    t["op_counts"] = exp.op_counts
    return t, exp


def normswap_cli() -> list[str]:
    exe = Path(sys.executable).with_name("normswap")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("normswap")
    if found:
        return [found]
    return [sys.executable, "-m", "cli.main"]


def bench_e2e_cli(name: str, workdir: Path, threads: int, exporter: str, opset: int | None) -> dict[str, Any]:
    onnx_path = workdir / f"{name}.cli.onnx"
    rep_path = workdir / f"{name}.cli.json"
    cmd = [*normswap_cli(), "convert", f"torchvision.models:{name}", "--onnx", str(onnx_path), "--report", str(rep_path),
           "--input-shape", ",".join(map(str, INPUT_SHAPE)), "--exporter", exporter]
    if opset is not None:
        cmd += ["--opset", str(opset)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    out: dict[str, Any] = {"command": shlex.join(cmd), "wall_s": wall, "returncode": proc.returncode}
    if proc.returncode != 0:
        out["error"] = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:200]
        return out
    try:
        rep = json.loads(rep_path.read_text())
        out["stages_s"] = rep.get("seconds", {})
        out["passed"] = rep.get("passed")
    except Exception as e:  # the report is a nicety; the wall time stands
        out["error"] = f"report unreadable: {short_error(e)}"
    return out


# ---------------------------------------------------------------------------------------------
# 2. baseline exports and onnxruntime's optimized graphs


def export_baseline(model: Any, x: Any, path: Path, exporter: str, opset: int) -> dict[str, Any]:
    """torch.onnx.export of the unfolded eval model with the settings normswap uses (dynamic batch)."""
    import torch

    m = copy.deepcopy(model).eval()
    xx = torch.cat([x, x])  # batch 2 for tracing, so nothing specialises on size 1 (as normswap does)
    t = time.perf_counter()
    with quiet(), torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(m, (xx,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                              do_constant_folding=True)
        else:
            prog = torch.onnx.export(m, (xx,), dynamo=True, opset_version=opset, input_names=["input"],
                                     output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                     optimize=True, report=False, verify=False)
            prog.save(str(path))
    from normswap.export import onnx_op_counts

    return {"seconds": time.perf_counter() - t, "op_counts": onnx_op_counts(path), "path": str(path)}


def session_options(threads: int, spinning: bool, level: str = "ORT_ENABLE_ALL") -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def make_session(path: Path, threads: int, spinning: bool) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(threads, spinning), providers=["CPUExecutionProvider"])


def ort_optimize(src: Path, dst: Path, threads: int) -> dict[str, int]:
    """Write onnxruntime's ORT_ENABLE_ALL-optimized graph of ``src`` to ``dst`` and count its nodes."""
    import onnxruntime as ort
    from normswap.export import onnx_op_counts

    so = session_options(threads, spinning=False)
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
    return onnx_op_counts(dst)


# ---------------------------------------------------------------------------------------------
# 3. latency


def measure_latency(paths: dict[str, Path], batch: int, args: argparse.Namespace, budget: float | None = None) -> dict[str, Any]:
    """Interleaved onnxruntime latency of every variant at ``batch``: {name: {median_ms, ...}}."""
    import numpy as np

    budget = args.latency_budget if budget is None else budget
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, *INPUT_SHAPE[1:]), dtype=np.float32)
    sessions: dict[str, Any] = {}
    out: dict[str, Any] = {"batch": batch, "variants": {}, "notes": []}
    for name, path in paths.items():
        try:
            sess = make_session(path, args.threads, args.ort_spinning)
            feed = {sess.get_inputs()[0].name: x}
            sess.run(None, feed)
            sessions[name] = (sess, feed)
        except Exception as e:
            out["notes"].append(f"{name}: onnxruntime cannot run it ({short_error(e)})")
    if not sessions:
        return out
    # warm-up, round-robin; its timings size the measurement to the budget
    warm: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(args.warmup):
        for name, (sess, feed) in sessions.items():
            t = time.perf_counter()
            sess.run(None, feed)
            warm[name].append(time.perf_counter() - t)
    per_round = sum(median(v) or 0.0 for v in warm.values())
    runs = int(budget / per_round) if per_round > 0 else args.max_runs
    runs = max(args.min_runs, min(args.max_runs, runs))
    samples: dict[str, list[float]] = {n: [] for n in sessions}
    names = list(sessions)
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        for r in range(runs):
            k = r % len(names)
            for name in names[k:] + names[:k]:  # rotate the order so no variant always runs first
                sess, feed = sessions[name]
                t = time.perf_counter()
                sess.run(None, feed)
                samples[name].append((time.perf_counter() - t) * 1e3)
    finally:
        if was:
            gc.enable()
    for name, xs in samples.items():
        out["variants"][name] = {"median_ms": median(xs), "min_ms": min(xs), "p10_ms": quantile(xs, 0.1),
                                 "p90_ms": quantile(xs, 0.9), "runs": len(xs), "samples_ms": [round(v, 4) for v in xs]}
    out["runs"] = runs
    return out


def paired_ratio(lat: dict[str, Any], a: str, b: str) -> float | None:
    """Median over rounds of t_a / t_b (robust to load that drifts during the measurement)."""
    va, vb = lat["variants"].get(a), lat["variants"].get(b)
    if not va or not vb:
        return None
    return median([p / q for p, q in zip(va["samples_ms"], vb["samples_ms"]) if q > 0])


def median_ratio(lat: dict[str, Any], a: str, b: str) -> float | None:
    va, vb = lat["variants"].get(a), lat["variants"].get(b)
    if not va or not vb:
        return None
    return ratio(va["median_ms"], vb["median_ms"])


# ---------------------------------------------------------------------------------------------
# 4. swap targets


NORM_OPS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
            "ReduceMean", "ReduceSumSquare", "Sqrt", "Div", "Pow")


def bench_swap(model: Any, x: Any, target: str, path: Path, folded_onnx: Path | None, args: argparse.Namespace,
               name: str | None = None) -> dict[str, Any]:
    """normswap's rewrite + export of ``target``, and the onnxruntime latency of its ONNX against the
    BN-folded model's, in one interleaved measurement with (GroupNorm targets) the same swapped model in
    torch.onnx's own lowering and torch.onnx's export of ``name`` built with that norm natively (the peer)."""
    import normswap

    res: dict[str, Any] = {"target": target, "model": name, "notes": []}
    try:
        times = []
        conv = None
        for _ in range(args.swap_repeats):
            dt, conv = timed(lambda: normswap.rewrite(model, target, (x,), verify=True))
            times.append(dt)
        res["rewrite_s"] = times
        res["rewrite_median_s"] = median(times)
        res["summary"] = conv.summary()
        res["exact"] = conv.exact
        if not any(a.rewritten for a in conv.actions):
            res["notes"].append("no site rewritten")
    except Exception as e:
        res["error"] = f"rewrite: {short_error(e)}"
        return res
    try:
        with quiet():
            exp = normswap.export_onnx(conv.model, (x,), path, exporter=args.exporter, opset=args.opset)
        res["export_s"] = exp.seconds
        res["exporter"] = exp.exporter
        res["op_counts"] = exp.op_counts
        res["nodes"] = total_nodes(exp.op_counts)
    except Exception as e:
        res["error"] = f"export: {short_error(e)}"
        return res
    if folded_onnx is None:
        res["notes"].append("no BN-folded ONNX to compare with")
        return res
    variants = {"swap": path, "fold": folded_onnx}
    if exp.export_forms:  # norms normswap exports in a form of its own: time the exporter's own lowering too
        variants["swap_plain"] = path.with_suffix(".plain.onnx")
        try:
            res["plain"] = export_baseline(prepare_plain(conv.model), x, variants["swap_plain"], "torchscript", exp.opset)
        except Exception as e:
            res["notes"].append(f"torch.onnx export of the swapped model failed: {short_error(e)}")
            variants.pop("swap_plain")
    peer = native_peer(res["model"], target) if res.get("model") else None
    if peer is not None:
        variants["peer"] = path.with_suffix(".peer.onnx")
        try:
            res["peer"] = export_baseline(peer, x, variants["peer"], "torchscript", exp.opset)
            res["peer_model"] = f"torchvision {res['model']}(norm_layer={target_norm_layer_name(target)})"
        except Exception as e:
            res["notes"].append(f"torch.onnx export of the native peer failed: {short_error(e)}")
            variants.pop("peer")
    lat = measure_latency(variants, 1, args, budget=args.latency_budget / 2 * (len(variants) / 2))
    res["latency"] = lat
    res["notes"].extend(lat["notes"])
    if "swap" in lat["variants"] and "fold" in lat["variants"]:
        res["swap_ms"] = lat["variants"]["swap"]["median_ms"]
        res["fold_ms"] = lat["variants"]["fold"]["median_ms"]
        res["ratio"] = median_ratio(lat, "swap", "fold")
        res["paired_ratio"] = paired_ratio(lat, "swap", "fold")
        for v in ("swap_plain", "peer"):
            if v in lat["variants"]:
                res[f"{v}_ms"] = lat["variants"][v]["median_ms"]
                res[f"{v}_ratio"] = median_ratio(lat, v, "fold")  # vs the BN-folded model, like "ratio"
                res[f"swap_over_{v}"] = paired_ratio(lat, "swap", v)
    return res


def prepare_plain(model: Any) -> Any:
    """``model`` as normswap would export it, except that the norms with a registered export form stay
    as they are: what torch.onnx's own lowering of the swapped model gives (GroupNorm → … → Mul/Add)."""
    from normswap.export import prepare_for_export

    return prepare_for_export(model, registered={})


def target_norm_layer_name(target: str) -> str:
    return {"gn": "GroupNorm(G(C), C)", "gn-ws": "GroupNorm(G(C), C)", "ln": "GroupNorm(1, C)"}.get(target, "?")


def native_peer(name: str, target: str) -> Any:
    """The torchvision model built with the target's norm from the start (random weights, eval), with the
    group counts normswap chooses — the model torch.onnx's own export is the peer of — or None."""
    import torch
    import torchvision

    from normswap.norms import choose_groups

    if target not in ("gn", "gn-ws", "ln"):
        return None

    def layer(c: int) -> Any:
        return torch.nn.GroupNorm(1 if target == "ln" else choose_groups(c), c)

    try:
        torch.manual_seed(0)
        m = torchvision.models.get_model(name, weights=None, norm_layer=layer).eval()
    except TypeError:  # the builder takes no norm_layer
        return None
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
    return m


# ---------------------------------------------------------------------------------------------
# calibration cost


def calib_setup(name: str, size: int) -> tuple[Any, list[tuple[Any, ...]]]:
    """(original model in eval mode, calibration batches) for section 5."""
    import torch

    if name == "digits":
        from normswap.load.data import calibration_batches
        from normswap.models.digits import digits_resnet

        return digits_resnet(), list(calibration_batches("digits", samples=256, batch=64))
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():  # trained-looking statistics instead of the init's 0 / 1
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model, [(torch.randn(16, 3, size, size, generator=g),) for _ in range(4)]


def bench_calibration(name: str, targets: list[str], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import normswap
    from normswap.keep.calibrate import calibrate
    from normswap.keep.recover import recover

    from normswap.pipeline.conversion import run_conversion

    model, batches = calib_setup(name, args.calib_size)
    data, batch = torch.cat([b[0] for b in batches]), int(batches[0][0].shape[0])
    samples = sum(int(b[0].shape[0]) for b in batches)
    r: dict[str, Any] = {"model": name, "samples": samples, "batches": len(batches),
                         "input": list(batches[0][0].shape[1:]), "targets": []}

    def forward() -> None:
        with torch.no_grad():
            for b in batches:
                model(*b)

    forward()  # warm-up
    for tgt in targets:
        res: dict[str, Any] = {"target": tgt}
        try:
            fwd, cal, own, stage, quoted, parts = [], [], [], [], [], []
            for i in range(args.calib_repeats + 1):  # the first round is a warm-up
                conv = normswap.rewrite(model, tgt, (batches[0][0][:2],), verify=False)
                f, _ = timed(forward)
                c, rep = timed(lambda: calibrate(model, conv, batches))
                # the stage as the user runs it: run_conversion(calib=...) (its 20% held-out split, the checks, the advice)
                _, run = timed(lambda: run_conversion(model=model, to=tgt, calib=data, calib_batch=batch,
                                                      input_shape=(1, *data.shape[1:])))
                if i == 0:
                    continue
                fwd.append(f)
                cal.append(c)
                if rep.cost_ratio is not None:
                    own.append(rep.cost_ratio)
                st = run.kept.calibration
                stage.append(run.seconds["calibrate"])
                quoted.append(st.seconds / run.seconds["calibrate"])
                parts.append(st.part_ratios())

            def kd_epoch() -> float:
                student = normswap.rewrite(model, tgt, (batches[0][0][:2],), verify=False)
                with quiet():
                    t, _ = timed(lambda: recover(model, student, batches, steps=len(batches), augment=False, progress=False,
                                                    batch_size=None))  # one pass over the batches as given
                return t

            kd_epoch()  # warm-up
            kd = kd_epoch()
            res.update({
                "forward_s": fwd, "calibrate_s": cal, "forward_median_s": median(fwd), "calibrate_median_s": median(cal),
                "ratio": ratio(median(cal), median(fwd)), "min_ratio": ratio(min(cal), min(fwd)),
                "reported_ratio": median(own), "kd_epoch_s": kd,
                "stage_s": stage, "stage_median_s": median(stage), "stage_ratio": ratio(median(stage), median(fwd)),
                "stage_min_ratio": ratio(min(stage), min(fwd)), "quoted_over_stage": median(quoted),
                "stage_parts": {k: median([p[k] for p in parts if k in p]) for k in (parts[0] if parts else {})},
                "kd_epoch_ratio": ratio(kd, median(fwd)),
            })
        except Exception as e:
            log(traceback.format_exc())
            res["error"] = short_error(e)
        r["targets"].append(res)
    return r


# ---------------------------------------------------------------------------------------------
# per model


def bench_model(name: str, args: argparse.Namespace, workdir: Path, swap_targets: list[str]) -> dict[str, Any]:
    import torch
    import torchvision

    from normswap.export import DEFAULT_OPSET

    opset = args.opset or DEFAULT_OPSET
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    r: dict[str, Any] = {"model": name, "bn": count_bn(model), "notes": []}

    if "fold" in args.target_list:
        log(f"{name}: fold time (normswap fold vs fx fuse, {args.repeats} repeats)")
        r["fold"] = bench_fold(model, x, args.repeats)
        r["notes"].extend(r["fold"].pop("notes"))
        if args.profile_fold:
            r["fold_profile"] = profile_fold(model, x)

    # the BN-folded ONNX is needed by the fold tables and as the reference of every swap target
    folded_onnx: Path | None = None
    if "fold" in args.target_list or (swap_targets and name in args.swap_model_list):
        folded_onnx = workdir / f"{name}.normswap.onnx"
        log(f"{name}: normswap convert (API: rewrite+verify, export_onnx, check_parity)")
        try:
            r["e2e_api"], exp = bench_e2e_api(model, x, folded_onnx, args.exporter, args.opset)
        except Exception as e:
            r["notes"].append(f"normswap convert (API) failed: {short_error(e)}")
            log(traceback.format_exc())
            folded_onnx = None

    if "fold" in args.target_list:
        if not args.no_cli:
            log(f"{name}: normswap convert (CLI subprocess)")
            r["e2e_cli"] = bench_e2e_cli(name, workdir, args.threads, args.exporter, args.opset)
            if "error" in r["e2e_cli"]:
                r["notes"].append(f"CLI: {r['e2e_cli']['error']}")

        variants: dict[str, Path] = {}
        if folded_onnx is not None:
            variants["normswap"] = folded_onnx
        r["baselines"] = {}
        for b in args.baseline_list:
            log(f"{name}: torch.onnx.export baseline ({b}) of the unfolded model")
            path = workdir / f"{name}.{b}.onnx"
            try:
                r["baselines"][b] = export_baseline(model, x, path, b, opset)
                variants[b] = path
            except Exception as e:
                r["notes"].append(f"{b} export of the unfolded model failed: {short_error(e)}")
        r["ort_optimized"] = {}
        if not args.no_ort_optimized:
            for src in ("normswap", *args.baseline_list):
                if src not in variants:
                    continue
                dst = workdir / f"{name}.{src}.ort.onnx"
                try:
                    r["ort_optimized"][src] = ort_optimize(variants[src], dst, args.threads)
                    if src == (args.baseline_list[0] if args.baseline_list else "normswap"):
                        variants["ort-opt"] = dst  # onnxruntime's own optimized graph of the plain export
                        r["ort_opt_source"] = src
                except Exception as e:
                    r["notes"].append(f"onnxruntime optimized-model output of {src} failed: {short_error(e)}")
        r["latency"] = []
        for b in args.batch_list:
            log(f"{name}: onnxruntime latency, batch {b}, variants {', '.join(variants)}")
            lat = measure_latency(variants, b, args)
            r["notes"].extend(lat["notes"])
            lat["ratios"] = {  # normswap / each other variant: of medians, median of per-round ratios, of minima
                o: {"median": median_ratio(lat, "normswap", o), "paired": paired_ratio(lat, "normswap", o),
                    "min": ratio((lat["variants"].get("normswap") or {}).get("min_ms"), (lat["variants"].get(o) or {}).get("min_ms"))}
                for o in variants if o != "normswap"
            }
            r["latency"].append(lat)

    r["swaps"] = []
    if name in args.swap_model_list:
        for tgt in swap_targets:
            log(f"{name}: swap target {tgt}")
            s = bench_swap(model, x, tgt, workdir / f"{name}.{tgt}.onnx", folded_onnx, args, name)
            r["swaps"].append(s)
    return r


# ---------------------------------------------------------------------------------------------
# 6. CLI start-up


STARTUP_TORCH_FREE_GOAL_S = 0.3  # issue 13: --help / targets / version answer within ~0.3 s, without torch


def startup_commands() -> list[tuple[str, list[str]]]:
    """(label, argv) of the start-up section: the normswap commands, then the two references."""
    cli = normswap_cli()
    return [
        ("normswap --help", [*cli, "--help"]),
        ("normswap convert --help", [*cli, "convert", "--help"]),
        ("normswap targets", [*cli, "targets"]),
        ("normswap version", [*cli, "version"]),
        ('python -c "import torch"', [sys.executable, "-c", "import torch"]),
        ("python -c pass", [sys.executable, "-c", "pass"]),
    ]


def bench_startup(runs: int) -> dict[str, Any]:
    """Wall seconds of each start-up command as a subprocess: one untimed warm-up (with the import
    profile: did it import torch?), then ``runs`` timed runs, interleaved with a rotating order."""
    cmds = startup_commands()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPROFILEIMPORTTIME", "NORMSWAP_DEBUG")}
    rows: dict[str, dict[str, Any]] = {}
    for label, argv in cmds:
        proc = subprocess.run(argv, capture_output=True, text=True, env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
        mods = {ln.rsplit("|", 1)[1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
        rows[label] = {"command": shlex.join(argv), "returncode": proc.returncode, "imports_torch": "torch" in mods,
                       "samples_s": []}
        if proc.returncode != 0:
            rows[label]["error"] = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:200]
    for r in range(runs):
        order = cmds[r % len(cmds):] + cmds[: r % len(cmds)]
        for label, argv in order:
            if "error" in rows[label]:
                continue
            t = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            rows[label]["samples_s"].append(time.perf_counter() - t)
    torch_med = median(rows['python -c "import torch"']["samples_s"])
    for row in rows.values():
        row["median_s"], row["min_s"] = median(row["samples_s"]), min(row["samples_s"], default=None)
        row["ratio_to_import_torch"] = ratio(row["median_s"], torch_med)
    return {"runs": runs, "goal_s": STARTUP_TORCH_FREE_GOAL_S, "commands": [{"label": k, **v} for k, v in rows.items()]}


def print_startup_table(console: Any, res: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"6. CLI start-up: wall s of a subprocess (median of {res['runs']} interleaved runs after 1 warm-up; "
                    f"goal ≤ {res['goal_s']} s without importing torch)", title_justify="left", show_lines=False)
    for i, c in enumerate(("command", "median s", "min s", "/ import torch", "imports torch")):
        t.add_column(c, justify="left" if i == 0 else "right", overflow="fold")
    for row in res["commands"]:
        label, med = row["label"], row.get("median_s")
        is_normswap = label.startswith("normswap")
        sec = fmt_s(med)
        if is_normswap and med is not None:
            sec = f"[{'green' if med <= res['goal_s'] else 'red'}]{sec}[/]"
        torch_col = ("[red]yes[/]" if is_normswap else "yes") if row["imports_torch"] else "no"
        t.add_row(label, sec if "error" not in row else f"[red]{row['error']}[/]", fmt_s(row.get("min_s")),
                  fmt_ratio(row.get("ratio_to_import_torch")) if is_normswap else fmt_s(row.get("ratio_to_import_torch"), 2),
                  torch_col)
    console.print(t)


def main_scaling(args: argparse.Namespace, command: str) -> int:
    """``--scaling``: section 7 alone (benchmarks/scaling.py)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from rich.console import Console

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import scaling

    torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 200))
    console.print(f"$ {command}")
    console.print(f"torch {torch.__version__}; {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
                  f"load average {loadavg()}")
    t0 = time.perf_counter()
    res = scaling.run(args)
    console.print()
    scaling.print_tables(console, res)
    console.print(f"total {time.perf_counter() - t0:.0f} s; load average at end {loadavg()}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"command": command, "scaling": res}, indent=1, default=str))
        console.print(f"JSON: {args.json_out}")
    return 0


def main_startup(args: argparse.Namespace, command: str) -> int:
    """``--startup``: section 6 alone (no torch imported in this process)."""
    from rich.console import Console

    console = Console(width=max(Console().width, 200))
    console.print(f"$ {command}")
    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "loadavg_start": loadavg(), "normswap_cli": shlex.join(normswap_cli())}
    console.print(f"python {env['python']}; {env['cpu_count']} CPUs, load average {env['loadavg_start']}; "
                  f"normswap = {env['normswap_cli']}")
    res = bench_startup(args.startup_runs)
    console.print()
    print_startup_table(console, res)
    env["loadavg_end"] = loadavg()
    console.print(f"load average at end {env['loadavg_end']} (start {env['loadavg_start']})")
    if args.json_out:
        doc = {"command": command, "environment": env, "args": {k: v for k, v in vars(args).items()}, "startup": res}
        Path(args.json_out).write_text(json.dumps(doc, indent=1, default=str))
        console.print(f"JSON: {args.json_out}")
    return 0


# ---------------------------------------------------------------------------------------------
# tables


def fmt_s(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def fmt_ratio(v: float | None, good: float = 1.0, ok: float = 1.1) -> str:
    if v is None:
        return "–"
    style = "green" if v <= good else ("yellow" if v <= ok else "red")
    return f"[{style}]{v:.2f}×[/]"


def fmt_err(v: float | None) -> str:
    return "–" if v is None else f"{v:.0e}"


def fmt_nodes(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "–"
    return f"{total_nodes(counts)} / {counts.get('BatchNormalization', 0)}"


def print_tables(console: Any, results: list[dict[str, Any]], args: argparse.Namespace,
                 calib: list[dict[str, Any]] | None = None) -> None:
    from rich.table import Table

    def table(title: str, *cols: str) -> Any:
        t = Table(title=title, title_justify="left", show_lines=False)
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i == 0 else "right", overflow="fold")
        return t

    if "fold" in args.target_list:
        t = table(f"1. fold time, wall s (median of {args.repeats} after 1 warm-up, interleaved; each copies the model; "
                  "rewrite = normswap.rewrite(m, 'fold', (x,), verify=False), the public API; fold = the internal pass)",
                  "model", "BN", "rewrite", "fold", "fx fuse", "rewrite/fx", "min/min", "fold/fx", "verify (apart)",
                  "deepcopy alone", "BN left ns/fx", "max rel err ns/fx")
        for r in results:
            f = r.get("fold")
            if not f:
                continue
            t.add_row(r["model"], str(r["bn"]), fmt_s(f.get("rewrite_median_s")), fmt_s(f.get("normswap_median_s")),
                      fmt_s(f.get("fx_median_s")), fmt_ratio(f.get("public_ratio")), fmt_ratio(f.get("public_min_ratio")),
                      fmt_ratio(f.get("ratio")), fmt_s(f.get("verify_s")), fmt_s(f.get("deepcopy_median_s")),
                      f"{f.get('normswap_bn_left', '–')} / {f.get('fx_bn_left', '–')}",
                      f"{fmt_err(f.get('normswap_max_rel_err'))} / {fmt_err(f.get('fx_max_rel_err'))}")
        console.print(t)

        profiled = [r for r in results if r.get("fold_profile")]
        if profiled:
            t = table("1a. where the fold time goes: cProfile cumulative s per phase (min of 3 profiled runs; phases overlap)",
                      "tool / phase", *[r["model"] for r in profiled])
            for tool in ("normswap", "fx"):
                for _s, _f, phase in PROFILE_PHASES[tool]:
                    vals = [r["fold_profile"].get(tool, {}).get(phase) for r in profiled]
                    if all(v is None for v in vals):
                        continue
                    t.add_row(f"{tool}: {phase}", *[fmt_s(v) for v in vals])
            console.print(t)

        t = table("1b. end-to-end `normswap convert --to fold --onnx` (one run each), s",
                  "model", "API rewrite+verify", "API export", "API parity", "API total", "exporter",
                  "CLI wall", "CLI load/rewrite/export/parity")
        for r in results:
            e, c = r.get("e2e_api") or {}, r.get("e2e_cli") or {}
            if not e and not c:
                continue
            stages = c.get("stages_s") or {}
            st = "/".join(fmt_s(stages.get(k), 2) for k in ("load", "rewrite", "export", "parity")) if stages else (c.get("error") or "–")
            t.add_row(r["model"], fmt_s(e.get("rewrite_s"), 2), fmt_s(e.get("export_s"), 2), fmt_s(e.get("parity_s"), 2),
                      fmt_s(e.get("total_s"), 2), str(e.get("exporter", "–")), fmt_s(c.get("wall_s"), 2), st)
        console.print(t)

        cols = ["model", f"normswap ({args.exporter})"] + [f"{b} export" for b in args.baseline_list]
        if not args.no_ort_optimized:
            cols += [f"ORT-opt of {s}" for s in ("normswap", *args.baseline_list)]
        t = table("2. ONNX nodes / BatchNormalization nodes (baselines export the *unfolded* eval model)", *cols)
        for r in results:
            if "baselines" not in r:
                continue
            row = [r["model"], fmt_nodes((r.get("e2e_api") or {}).get("op_counts"))]
            row += [fmt_nodes((r["baselines"].get(b) or {}).get("op_counts")) for b in args.baseline_list]
            if not args.no_ort_optimized:
                row += [fmt_nodes(r["ort_optimized"].get(s)) for s in ("normswap", *args.baseline_list)]
            t.add_row(*row)
        console.print(t)

        base = args.baseline_list[0] if args.baseline_list else None
        others = args.baseline_list[1:] + ([] if args.no_ort_optimized or base is None else ["ort-opt"])
        cols = ["model", "batch", "runs", "normswap ms", "p90/p10"]
        if base:
            cols += [f"{base} ms", f"normswap/{base}"]
        for o in others:
            cols += [f"{o} ms", f"normswap/{o}"]
        spin = "on" if args.ort_spinning else "off"
        t = table(f"3. onnxruntime latency (CPU, ORT_ENABLE_ALL, {args.threads} intra-op threads, spinning {spin}; "
                  "median of interleaved runs)", *cols)
        for r in results:
            for lat in r.get("latency", []):
                v = lat["variants"]
                ns = v.get("normswap") or {}
                spread = ratio(ns.get("p90_ms"), ns.get("p10_ms"))
                row = [r["model"], str(lat["batch"]), str(lat.get("runs", "–")), fmt_ms(ns.get("median_ms")),
                       "–" if spread is None else f"{spread:.2f}"]
                for o in ([base] if base else []) + others:
                    row += [fmt_ms((v.get(o) or {}).get("median_ms")), fmt_ratio(median_ratio(lat, "normswap", o))]
                t.add_row(*row)
        console.print(t)

    swaps = [(r["model"], s) for r in results for s in r.get("swaps", [])]
    if swaps:
        t = table("4. swap targets: rewrite time and batch-1 onnxruntime latency vs the BN-folded ONNX of the same model",
                  "model", "target", "sites rewritten", f"rewrite s (med of {args.swap_repeats})", "export s",
                  "ONNX nodes", "norm ops", "swap ms", "folded ms", "swap/folded",
                  "torch.onnx lowering of the swap / folded", "native peer (torch.onnx) / folded", "swap / peer", "note")
        for model, s in swaps:
            counts = s.get("op_counts") or {}
            norm_ops = ", ".join(f"{k}×{counts[k]}" for k in NORM_OPS if counts.get(k)) or "–"
            summ = s.get("summary") or {}
            rewritten = sum(n for k, n in summ.items() if k != "refuse")
            sites = f"{rewritten}/{sum(summ.values())}" if summ else "–"
            note = s.get("error") or "; ".join(s.get("notes", [])) or ""
            t.add_row(model, s["target"], sites, fmt_s(s.get("rewrite_median_s"), 2), fmt_s(s.get("export_s"), 2),
                      str(s.get("nodes", "–")), norm_ops, fmt_ms(s.get("swap_ms")), fmt_ms(s.get("fold_ms")),
                      fmt_ratio(s.get("ratio")), fmt_ratio(s.get("swap_plain_ratio")), fmt_ratio(s.get("peer_ratio")),
                      fmt_ratio(s.get("swap_over_peer")), f"[red]{note}[/]" if s.get("error") else note)
        console.print(t)

    if calib:
        t = table(f"5. calibration cost vs one forward of the original over the same data (median of {args.calib_repeats}, "
                  "interleaved; target ≤ 3×). stage = run_conversion(model, to, calib=data)'s calibrate stage, every check "
                  "included (20% held out); calibrate() = the bare call on all the data, no held-out set",
                  "model", "data", "target", "forward s", "stage s", "stage/forward", "min/min", "quoted/stage s",
                  "stage parts (× fwd of the fit data)", "calibrate()/forward", "as reported", "1 KD epoch/forward", "note")
        for c in calib:
            data = f"{c['samples']}×{'×'.join(map(str, c['input']))} in {c['batches']}"
            for s in c["targets"]:
                sp = ", ".join(f"{k} {v:.2f}" for k, v in (s.get("stage_parts") or {}).items() if v is not None)
                t.add_row(c["model"], data, s["target"], fmt_s(s.get("forward_median_s")), fmt_s(s.get("stage_median_s")),
                          fmt_ratio(s.get("stage_ratio"), 3.0, 3.0), fmt_ratio(s.get("stage_min_ratio"), 3.0, 3.0),
                          "–" if s.get("quoted_over_stage") is None else f"{s['quoted_over_stage']:.3f}", sp or "–",
                          fmt_ratio(s.get("ratio"), 3.0, 3.0), fmt_ratio(s.get("reported_ratio"), 3.0, 3.0),
                          fmt_ratio(s.get("kd_epoch_ratio"), 1e9, 1e9), f"[red]{s['error']}[/]" if s.get("error") else "")
        console.print(t)


# ---------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv])

    if args.startup:
        return main_startup(args, command)
    if args.scaling:
        return main_scaling(args, command)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy
    import onnx
    import onnxruntime
    import torch
    import torchvision
    from rich.console import Console

    import normswap

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)

    console = Console(width=max(Console().width, 200))
    t_start = time.perf_counter()
    console.print(f"$ {command}")
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
        "normswap": normswap.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "loadavg_start": loadavg(),
    }
    console.print(
        f"torch {env['torch']}, torchvision {env['torchvision']}, onnx {env['onnx']}, onnxruntime {env['onnxruntime']}, "
        f"normswap {env['normswap']}, python {env['python']}; {env['cpu_count']} CPUs, torch threads {env['torch_threads']}, "
        f"load average {env['loadavg_start']}"
    )

    registered = list(normswap.targets())
    wanted = [t for t in registered if t != "fold"] if args.target_list == ["all"] else args.target_list
    if args.target_list == ["all"]:
        args.target_list = ["fold", *wanted]
    notes: list[str] = []
    swap_targets = []
    for t in args.target_list:
        if t == "fold":
            continue
        if t not in registered:
            notes.append(f"target {t!r} is not in normswap.targets() ({', '.join(registered)}); skipped")
        else:
            swap_targets.append(t)
    if swap_targets and not any(m in args.swap_model_list for m in args.model_list):
        notes.append(f"swap targets given but none of --models is in --swap-models ({', '.join(args.swap_model_list)})")

    results: list[dict[str, Any]] = []
    tmp_ctx = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="normswap-bench-")
    with tmp_ctx as wd:
        workdir = Path(wd)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.model_list:
            t0 = time.perf_counter()
            try:
                r = bench_model(name, args, workdir, swap_targets)
            except Exception as e:
                log(traceback.format_exc())
                r = {"model": name, "bn": None, "notes": [f"benchmark failed: {short_error(e)}"]}
            r["seconds"] = time.perf_counter() - t0
            log(f"{name}: done in {r['seconds']:.0f} s")
            results.append(r)

    calib: list[dict[str, Any]] = []
    for name in args.calib_model_list if args.calib_target_list else []:
        log(f"{name}: calibration cost ({', '.join(args.calib_target_list)})")
        try:
            calib.append(bench_calibration(name, args.calib_target_list, args))
        except Exception as e:
            log(traceback.format_exc())
            notes.append(f"{name}: calibration benchmark failed: {short_error(e)}")

    log("CLI start-up")
    startup = bench_startup(args.startup_runs)

    console.print()
    print_tables(console, results, args, calib)
    print_startup_table(console, startup)
    for r in results:
        for n in r.get("notes", []):
            notes.append(f"{r['model']}: {n}")
        for s in r.get("swaps", []):
            if s.get("error"):
                notes.append(f"{r['model']} {s['target']}: skipped — {s['error']}")
    env["loadavg_end"] = loadavg()
    total = time.perf_counter() - t_start
    if notes:
        console.print("notes:\n" + "\n".join(f"  - {n}" for n in notes), markup=False, highlight=False)
    console.print(
        "Ratios are normswap / baseline (< 1 = normswap faster or smaller). Latency: medians over interleaved "
        "round-robin runs of all variants of one model; ratio of medians; p90/p10 of normswap's runs shows the noise "
        "(near 1 on a quiet machine)."
    )
    console.print(f"total {total:.0f} s; load average at end {env['loadavg_end']} (start {env['loadavg_start']})")

    if args.json_out:
        doc = {"command": command, "environment": env, "args": {k: v for k, v in vars(args).items()},
               "notes": notes, "results": results, "calibration": calib, "startup": startup, "seconds": total}
        Path(args.json_out).write_text(json.dumps(doc, indent=1, default=str))
        console.print(f"JSON: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
