"""torch.distributed: two gloo processes (CPU) calibrate exactly as one process on the same data, and
recover under DDP with both ranks in lock-step."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

TARGETS = ("gn", "bin", "sn")
SAMPLES, BATCH = 96, 32


def _calibrate_all(out: Path, rank: int) -> None:
    from normswap.keep.calibrate import calibrate
    from normswap.load.data import calibration_batches
    from normswap.models.digits import digits_resnet
    from normswap.keep.recover import recover
    from tests.helpers import swap_digits

    original = digits_resnet()
    data = calibration_batches("digits", samples=SAMPLES, batch=BATCH)
    result = {}
    for to in TARGETS:
        conv = swap_digits(original, to, verify=False)
        rep = calibrate(original, conv, data)
        result[to] = {"state": {k: v.clone() for k, v in conv.model.state_dict().items()},
                      "world": rep.world_size, "samples": rep.samples}
    conv = swap_digits(original, "gn", verify=False)
    calibrate(original, conv, data)
    rec = recover(original, conv, data, steps=4, seed=0, progress=False)
    result["recovered"] = {"state": conv.model.state_dict(), "world": rec.world_size, "end": rec.end_step,
                           "agreement": rec.agreement_after}
    torch.save(result, out / f"rank{rank}.pt")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _calibrate_all(Path(out), rank)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS",)}
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _calibrate_all(out, 0)
    finally:
        torch.set_num_threads(n)
    return out


@pytest.mark.parametrize("to", TARGETS)
def test_two_processes_calibrate_like_one(two_ranks, one_rank, to):
    r0 = torch.load(two_ranks / "rank0.pt", weights_only=True)[to]
    r1 = torch.load(two_ranks / "rank1.pt", weights_only=True)[to]
    single = torch.load(one_rank / "rank0.pt", weights_only=True)[to]
    assert r0["world"] == 2 and single["world"] == 1
    assert r0["samples"] == single["samples"] == SAMPLES  # each rank saw half, the sums cover all
    for k, v in single["state"].items():
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # both ranks hold the same model
        if v.is_floating_point():
            # closed-form fits: float64 sums, equal to ~1e-16 before the cast; Switchable Norm's Adam
            # steps on all-reduced float32 gradients: equal to float32 rounding
            tol = 1e-5 if to == "sn" else 1e-6
            diff = float((r0["state"][k].double() - v.double()).abs().max())
            assert diff <= tol, (to, k, diff)
        else:
            assert torch.equal(r0["state"][k], v), k


def test_ddp_recovery_keeps_ranks_in_lock_step(two_ranks, one_rank):
    r0 = torch.load(two_ranks / "rank0.pt", weights_only=True)["recovered"]
    r1 = torch.load(two_ranks / "rank1.pt", weights_only=True)["recovered"]
    single = torch.load(one_rank / "rank0.pt", weights_only=True)["recovered"]
    assert r0["world"] == 2 and r0["end"] == 4
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # same data, averaged gradients: close to the single-process run (Adam amplifies rounding a little)
    worst = max(float((r0["state"][k].double() - single["state"][k].double()).abs().max())
                for k in r0["state"] if r0["state"][k].is_floating_point())
    assert worst < 5e-2, worst
    assert r0["agreement"]["top1_agreement"] is not None


def test_cli_under_torchrun_calibrates_like_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 normswap convert --calib ...` joins a gloo group: the calibration
    equals the single-process one, and only rank 0 writes the outputs."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("NORMSWAP_DEBUG", None)
    common = ["convert", "--to", "gn", "--calib", "digits", "--calib-samples", "96", "--calib-batch", "32"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
              "-m", "cli.main", *common, "--save", str(tmp_path / "two"), "--report", str(tmp_path / "two.json")]
    p = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    assert p.stdout.count("normswap convert --to gn:") == 1  # rank 1 is silent
    single = [sys.executable, "-m", "cli.main", *common, "--save", str(tmp_path / "one")]
    env1 = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    p1 = subprocess.run(single, capture_output=True, text=True, env=env1, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert p1.returncode == 0, p1.stderr[-2000:]
    two, one = load_file(str(tmp_path / "two" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    assert two.keys() == one.keys()
    worst = max(float((two[k].double() - one[k].double()).abs().max()) for k in one)
    assert worst <= 1e-6, worst
    import json

    cal = json.loads((tmp_path / "two.json").read_text())["keep_function"]["calibration"]
    assert cal["world_size"] == 2 and cal["samples"] == 96
