"""Options shared by ``normswap convert`` / ``recover`` / ``compare``: calibration and recovery, where
they run (``--device``, ``--amp``) and how image folders are read (``--workers``, ``--size``, ``--crop``,
``--mean``, ``--std``). Not a command: the stages themselves are in :mod:`normswap.pipeline`, the
checks of these values in :mod:`normswap.validate` (torch-free, before any work)."""

from __future__ import annotations

from typing import Annotated

import typer


# ---- options ---------------------------------------------------------------------------------
CalibOpt = Annotated[str | None, typer.Option(
    "--calib", help="calibration data (unlabeled): 'digits' (the bundled model's train split), a tensor file "
    "[N, ...] (.pt/.npy/.safetensors), a folder of images, or module:callable returning batches.")]
CalibSamplesOpt = Annotated[int | None, typer.Option("--calib-samples", help="use at most this many calibration samples (default: all).")]
CalibBatchOpt = Annotated[int, typer.Option("--calib-batch", help="calibration / recovery batch size.")]
RecoverStepsOpt = Annotated[int, typer.Option("--recover-steps", help="after calibration, this many label-free distillation steps (0 = none).")]
RecoverBatchOpt = Annotated[int | None, typer.Option("--recover-batch", help="recovery: samples per step, regrouped from the calibration data (default: 256).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed for recovery (same seed + data = same weights).")]
LrOpt = Annotated[float, typer.Option("--lr", help="recovery: Adam learning rate (cosine-decayed).")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="recovery: distillation temperature.")]
FeatureWeightOpt = Annotated[float, typer.Option("--feature-weight", help="recovery: weight of the per-layer feature matching at swapped sites (0 = logits only).")]
TargetAgreementOpt = Annotated[float | None, typer.Option("--target-agreement", help="recovery: stop once top-1 agreement on the calibration data reaches this.")]
NoAugmentOpt = Annotated[bool, typer.Option("--no-augment", help="recovery: train on the calibration batches as they are (no mixup / shifts).")]
OutputKindOpt = Annotated[str | None, typer.Option(
    "--output-kind", help="what the model outputs: logits, probabilities (softmax), multilabel (sigmoid), peaked (sigmoid "
    "bins, one bump a row: pitch, angle, age), regression or dense (per-pixel logits); chooses the distillation loss and the agreement measures (default: detected from the "
    "original's outputs on the calibration data).", show_default=False)]
DecodeOpt = Annotated[str | None, typer.Option(
    "--decode", help="module:fn or file.py:fn turning the model's output [N, ...] into the value you read ([N] or [N, D]: "
    "a pitch in cents, an angle): agreement is then measured in those units and cited by the verdict (default: the "
    "model's normswap_decode, if any).", show_default=False)]
DecodeTolOpt = Annotated[float | None, typer.Option(
    "--decode-tol", help="with --decode: two decoded readings within this distance (in the decoder's units) count as "
    "the same (default: the decoder's tolerance attribute).", show_default=False)]
HeldoutOpt = Annotated[str | None, typer.Option(
    "--heldout", help="held-out data for every agreement number (same forms as --calib); default: the model's known "
    "held-out set (the bundled digits test split), else 20% of the calibration data, split with a fixed seed.",
    show_default=False)]

# ---- where the model runs, and how image folders are read ---------------------------------------
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="where calibration, recovery and the agreement measures run: auto (the GPU when there is one), "
    "cpu, cuda, cuda:N or mps; under torchrun each rank takes cuda:LOCAL_RANK. Export and parity stay on the CPU.")]
AmpOpt = Annotated[str | None, typer.Option(
    "--amp", help="recovery in mixed precision: bf16 or fp16 (autocast; fp16 with a grad scaler). Calibration sums "
    "stay in float64.", show_default=False)]
WorkersOpt = Annotated[int, typer.Option("--workers", help="image folders: DataLoader worker processes decoding images (0 = in this process).")]
SizeOpt = Annotated[str | None, typer.Option(
    "--size", help="image folders: the side S (or H,W) the model sees after the center crop (default: the model's "
    "timm/torchvision preprocessing, else its input shape).", show_default=False)]
CropOpt = Annotated[float | None, typer.Option(
    "--crop", help="image folders: the crop's share of the resized short side, in (0, 1] (0.875: resize 256, crop "
    "224; default: the model's preprocessing, else 1).", show_default=False)]
MeanOpt = Annotated[str | None, typer.Option(
    "--mean", help="image folders: per-channel mean, e.g. 0.485,0.456,0.406 (default: the model's preprocessing, else 0).",
    show_default=False)]
StdOpt = Annotated[str | None, typer.Option(
    "--std", help="image folders: per-channel std, e.g. 0.229,0.224,0.225 (default: the model's preprocessing, else 1).",
    show_default=False)]
