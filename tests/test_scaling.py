"""Scaling: --device / --amp / --workers / image preprocessing, the rank-sharded image loader, and
torchrun with workers (2 gloo CPU processes). CUDA tests skip themselves without a GPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("NORMSWAP_DEBUG", None)
    return {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=_env(),
                          cwd=cwd or REPO, timeout=600)


def _digit_pngs(folder: Path, n: int) -> Path:
    """``n`` digits of the bundled training split as 8×8 grayscale PNGs, half of them in class folders."""
    from PIL import Image

    from normswap.models.digits import load_digits

    x, y = load_digits("train")
    for i in range(n):
        d = folder / (f"class{int(y[i])}" if i % 2 else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0].numpy() * 255).round().astype(np.uint8), mode="L").save(d / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> Path:
    """Photos (RGB JPEGs of two sizes, nested class folders), a grayscale PNG, an RGBA PNG, a text file
    and a truncated JPEG."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("odd")
    photos = load_sample_images().images
    for i in range(6):
        d = root / ("china" if i % 2 else "flower") / ("deep" if i % 3 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos[i % 2][10 * i:10 * i + 120, :150 + 10 * i]).save(d / f"p{i}.jpg")
    Image.fromarray(photos[0][:60, :80].mean(2).astype(np.uint8), mode="L").save(root / "gray.png")
    rgba = np.dstack([photos[1][:64, :64], np.full((64, 64), 100, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(root / "rgba.png")
    (root / "README.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes((root / "china" / "p1.jpg").read_bytes()[:200])
    return root


# ---- options: every bad value is one line, exit 2, before torch is imported -------------------------

BAD = [
    (["convert", "--device", "gpu"], "--device 'gpu' is not a device"),
    (["convert", "--device", "cuda:x"], "--device 'cuda:x'"),
    (["convert", "--calib", "digits", "--recover-steps", "2", "--amp", "fp8"], "--amp 'fp8'"),
    (["convert", "--to", "gn", "--calib", "digits", "--amp", "bf16"], "add --recover-steps"),
    (["convert", "--calib", "FOLDER", "--workers", "-1"], "--workers -1"),
    (["convert", "--calib", "FOLDER", "--size", "0"], "--size '0'"),
    (["convert", "--calib", "FOLDER", "--size", "12,abc"], "--size '12,abc'"),
    (["convert", "--calib", "FOLDER", "--crop", "1.5"], "--crop 1.5"),
    (["convert", "--calib", "FOLDER", "--crop", "0"], "--crop 0.0"),
    (["convert", "--calib", "FOLDER", "--mean", "0.5,x"], "--mean '0.5,x'"),
    (["convert", "--calib", "FOLDER", "--std", "0.2,0,0.2"], "--std '0.2,0,0.2'"),
    (["convert", "--to", "gn", "--calib", "digits", "--size", "112"], "--calib digits is not a folder"),
    (["convert", "--workers", "2"], "--workers applies to a folder of images given to --calib, and no --calib"),
    (["recover", "SAVED", "--calib", "digits", "--device", "tpu"], "--device 'tpu'"),
    (["recover", "SAVED", "--calib", "digits", "--amp", "int8"], "--amp 'int8'"),
    (["compare", "--calib", "digits", "--device", "npu"], "--device 'npu'"),
    (["compare", "--calib", "digits", "--mean", "1,2"], "--mean applies to a folder"),
]


def test_bad_runtime_options_are_one_line_exit_2_before_torch(tmp_path):
    folder = _digit_pngs(tmp_path / "pngs", 4)
    cases = [[a.replace("FOLDER", str(folder)).replace("SAVED", str(tmp_path)) for a in argv] for argv, _ in BAD]
    script = (
        "import contextlib, io, json, sys\n"
        "from cli.main import main\n"
        "out = []\n"
        f"for argv in {cases!r}:\n"
        "    sys.argv = ['normswap', *argv]\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            rc = main()\n"
        "        except SystemExit as e:\n"
        "            rc = e.code\n"
        "    out.append([rc, err.getvalue()])\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'out': out}))\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    for (argv, needle), (rc, err) in zip(BAD, doc["out"]):
        err = err.strip()
        assert rc == 2, (argv, rc, err)
        assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert needle in err, (argv, needle, err)
    assert doc["torch"] is False  # every refusal came before torch was imported


def test_help_lists_the_new_options_without_torch():
    script = ("import sys\nfrom cli.main import main\nsys.argv=['normswap','convert','--help']\n"
              "try:\n    main()\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    for opt in ("--device", "--amp", "--workers", "--size", "--crop", "--mean", "--std"):
        assert opt in p.stdout, opt
    assert "TORCH False" in p.stdout


def test_devices_resolve_and_refuse():
    from normswap.devices import can_run_on, resolve_device
    from normswap.errors import InputError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda:0")
    assert can_run_on("mps") is not None  # no MPS here, or MPS without float64: refused, with the reason


# ---- image folders ----------------------------------------------------------------------------------


def test_odd_folder_is_read_as_documented(odd_folder):
    from normswap.load.data import calibration_batches

    data = calibration_batches(odd_folder, batch=4, size=32, crop=0.875, mean=(0.5,), std=(0.25,))
    xs = torch.cat([b[0] for b in data])
    info = data.to_dict()
    # 6 photos + gray (replicated to RGB) + RGBA (alpha dropped); the text file ignored, the broken JPEG skipped
    assert xs.shape == (8, 3, 32, 32) and torch.isfinite(xs).all()
    assert info["ignored_files"] == 1 and info["unreadable_skipped"] == 1
    assert "broken.jpg" in info["first_unreadable"]
    gray = sorted(odd_folder.rglob("*.*"))
    assert any(p.name == "gray.png" for p in gray)
    assert "crop 0.875" in info["preprocessing"]["description"] and "--size" in info["preprocessing"]["description"]


def test_workers_give_the_same_batches(odd_folder):
    from normswap.load.data import calibration_batches

    zero = [b[0] for b in calibration_batches(odd_folder, batch=3, size=24)]
    two = calibration_batches(odd_folder, batch=3, size=24, workers=2)
    assert [b.shape for b in zero] == [b[0].shape for b in two]
    assert all(torch.equal(a, b[0]) for a, b in zip(zero, two))
    assert all(torch.equal(a, b[0]) for a, b in zip(zero, two))  # a second pass (persistent workers) too
    # passes may nest (recovery evaluates held-out data inside its cycle): each gets its own loader
    outer = []
    for b in two:
        outer.append(b[0])
        inner = [c[0] for c in two]
        assert len(inner) == len(zero) and all(torch.equal(a, c) for a, c in zip(zero, inner))
    assert all(torch.equal(a, c) for a, c in zip(zero, outer))


def test_unreadable_folder_is_refused_in_one_line(tmp_path):
    from normswap.load.data import calibration_batches
    from normswap.errors import InputError

    (tmp_path / "a.jpg").write_text("not a jpeg")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n")
    data = calibration_batches(tmp_path, batch=2, size=8)
    with pytest.raises(InputError) as e:
        list(data)
    assert "no image in" in str(e.value) and "a.jpg" in str(e.value) and len(str(e.value).splitlines()) == 1


def test_preprocessing_defaults_name_their_source():
    from torchvision.models import resnet18

    from normswap.load.images import preprocess_for

    tv = preprocess_for(resnet18(), spec="torchvision.models:resnet18")
    assert tv.size == (224, 224) and tv.resize == 256 and tv.mean == pytest.approx((0.485, 0.456, 0.406))
    assert "torchvision ResNet18_Weights" in tv.describe()
    given = preprocess_for(resnet18(), spec="torchvision.models:resnet18", size=(112, 96), crop=1.0, std=(0.5,))
    assert given.size == (112, 96) and given.resize == 96 and given.std == (0.5, 0.5, 0.5)
    assert given.sources["size"] == "--size" and "torchvision" in given.sources["mean"]

    class TimmLike(torch.nn.Module):
        pretrained_cfg = {"input_size": (3, 160, 160), "crop_pct": 0.95, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    t = preprocess_for(TimmLike())
    assert t.size == (160, 160) and t.crop == 0.95 and "timm pretrained_cfg" in t.describe()


@pytest.mark.parametrize("n,batch,world", [(1, 1, 2), (7, 3, 2), (10, 4, 3), (33, 8, 4), (5, 8, 8), (64, 64, 2)])
def test_sharded_sampler_covers_every_sample_once(n, batch, world):
    from normswap.load.data import shard
    from normswap.load.images import ShardedBatchSampler

    per_rank = [list(ShardedBatchSampler(n, batch, r, world)) for r in range(world)]
    flat = [i for rank in per_rank for b in rank for i in b]
    assert sorted(flat) == list(range(n))  # every sample exactly once
    for k in range(len(per_rank[0])):  # per global batch, the ranks' slices in order are that batch, as shard() cuts it
        whole = torch.arange(k * batch, min(n, (k + 1) * batch))
        assert [i for r in range(world) for i in per_rank[r][k]] == whole.tolist()
        assert all(per_rank[r][k] == shard((whole,), r, world)[0].tolist() for r in range(world))


# ---- mixed precision --------------------------------------------------------------------------------


@pytest.mark.parametrize("amp", ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fp16 autocast is a GPU precision (on the CPU it is slow and not what users run)"))])
def test_recovery_under_autocast(original, amp):
    from normswap.keep.calibrate import calibrate
    from normswap.load.data import calibration_batches
    from normswap.keep.recover import recover
    from tests.helpers import swap_digits

    import copy

    device = "cuda" if amp == "fp16" else "cpu"
    data = calibration_batches("digits", samples=512, batch=64)
    conv = swap_digits(original, "gn", verify=False)
    original = copy.deepcopy(original).to(device)  # the fixture stays as it is
    conv.model.to(device)
    calibrate(original, conv, data)
    before = {k: v.clone() for k, v in conv.model.state_dict().items()}
    rep = recover(original, conv, data, steps=8, progress=False, amp=amp, lr=3e-4, batch_size=256)
    assert rep.end_step == 8 and all(np.isfinite(v) for _, v in rep.history)
    assert all(p.dtype == torch.float32 for p in conv.model.parameters())  # autocast: weights stay float32
    moved = max(float((conv.model.state_dict()[k] - v).abs().max()) for k, v in before.items() if v.is_floating_point())
    assert moved > 0
    assert rep.history[-1][1] < rep.history[0][1]  # the loss falls, as in float32
    assert rep.agreement_after["top1_agreement"] >= 0.95


def test_convert_folder_on_cpu_with_bf16_and_workers(tmp_path):
    folder = _digit_pngs(tmp_path / "pngs", 80)
    p = _cli("convert", "--to", "gn", "--calib", str(folder), "--size", "8", "--workers", "2", "--device", "cpu",
             "--amp", "bf16", "--recover-steps", "4", "--calib-batch", "16", "--report", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ran on cpu" in p.stdout and "bf16 autocast" in p.stdout and "data workers 2" in p.stdout
    rt = json.loads((tmp_path / "r.json").read_text())["runtime"]
    assert rt["device"] == "cpu" and rt["workers"] == 2 and rt["pin_memory"] is False
    assert "center crop 8x8" in rt["preprocessing"] and "--size" in rt["preprocessing"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_convert_on_cuda(tmp_path):
    p = _cli("convert", "--to", "gn", "--calib", "digits", "--calib-samples", "256", "--device", "cuda", "--amp", "bf16",
             "--recover-steps", "10", "--report", str(tmp_path / "r.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["runtime"]["device"] == "cuda:0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path):
    p = _cli("convert", "--to", "gn", "--calib", "digits", "--device", "cuda")
    assert p.returncode == 2 and "no CUDA GPU" in p.stderr and len(p.stderr.strip().splitlines()) == 1


# ---- torchrun ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_with_workers_calibrates_like_one_process(tmp_path):
    """2 gloo processes, each decoding its slice of every batch with a worker: the calibration equals
    one process's, recovery stays within the seed noise, only rank 0 writes."""
    from safetensors.torch import load_file

    folder = _digit_pngs(tmp_path / "pngs", 96)
    common = ["convert", "--to", "gn", "--calib", str(folder), "--calib-batch", "32", "--device", "cpu", "--workers", "1"]
    env = _env()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "cli.main", *common, "--save", str(tmp_path / "two"),
                          "--report", str(tmp_path / "two.json")],
                         capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert two.returncode == 0, (two.stdout[-2000:], two.stderr[-2000:])
    assert two.stdout.count("normswap convert --to gn:") == 1
    one = _cli(*common, "--save", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = load_file(str(tmp_path / "two" / "model.safetensors")), load_file(str(tmp_path / "one" / "model.safetensors"))
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in b if b[k].is_floating_point())
    assert worst <= 1e-6, worst
    rt = json.loads((tmp_path / "two.json").read_text())["runtime"]
    assert rt["processes"] == 2 and rt["backend"] == "gloo" and rt["workers"] == 1
    # recovery on top (DDP, each rank trains on its half of every batch): within the seed noise of one process
    rec = ["--recover-steps", "4", "--recover-batch", "32", "--seed", "0", "--lr", "1e-4"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "cli.main", *common, *rec, "--save", str(tmp_path / "two-r"),
                          "--report", str(tmp_path / "two-r.json")],
                         capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert two.returncode == 0, (two.stdout[-2000:], two.stderr[-2000:])
    one = _cli(*common, *rec, "--save", str(tmp_path / "one-r"), "--report", str(tmp_path / "one-r.json"))
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = load_file(str(tmp_path / "two-r" / "model.safetensors")), load_file(str(tmp_path / "one-r" / "model.safetensors"))
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in b if b[k].is_floating_point())
    assert worst < 5e-2, worst  # averaged gradients of the same samples: Adam amplifies the rounding a little
    stages = [{s["stage"]: s["agreement"]["top1_agreement"] for s in json.loads((tmp_path / f).read_text())["keep_function"]["stages"]}
              for f in ("two-r.json", "one-r.json")]
    assert stages[0]["calibrated"] == stages[1]["calibrated"]
    assert abs(stages[0]["recovered"] - stages[1]["recovered"]) <= 0.05, stages
