"""The stages of ``convert`` for a model called with a list of images (``model([img, ...])``:
torchvision's detectors, or any model with ``--images N``).

* Inputs: ``N`` images of one ``C×H×W`` shape (default: the size the detector's transform resizes
  to), uniform in [0, 1); ``--samples`` may be a folder of real images, read by the ``--calib`` loader.
* The ONNX takes exactly those ``N`` images (one input each, fixed size), as torchvision's own ONNX
  tests export detectors; the report says so.
* Parity at the right level (:mod:`normswap.detection`): the pre-post-processing tensors of a
  registered detector are judged against the tolerance, the post-processed outputs against the
  original's noise floor; boxes/scores/labels agreement is reported for every pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["image_count", "refuse_image_lists", "image_shape", "example_images", "parity_batches", "list_parity", "DEFAULT_IMAGE_SHAPE"]

DEFAULT_IMAGE_SHAPE = (3, 224, 224)


def image_count(model: Any, images: int | None) -> int | None:
    """How many images the model is called with: ``images`` when given (any model), 1 for a registered
    detector, else None (a model that takes tensors)."""
    from normswap import validate
    from normswap.detection import takes_image_list

    if images is not None:
        validate.positive_int("--images", images)
        return int(images)
    return 1 if takes_image_list(model) else None


def refuse_image_lists(model: Any, what: str) -> None:
    """One line instead of a crash: ``what`` (compare, recover) works on tensor batches only."""
    from normswap.detection import takes_image_list
    from normswap.errors import InputError

    if takes_image_list(model):
        raise InputError(f"{what} works on models that take tensor batches; {type(model).__name__} takes a list of images "
                         "— use `normswap convert MODEL --to TARGET` per target (fold is verified before post-processing)")


def image_shape(model: Any, given: Sequence[int] | None, images: int) -> tuple[tuple[int, ...], str]:
    """One image's ``(C, H, W)`` and where it came from: ``--input-shape`` (``C,H,W``, or ``1,C,H,W``),
    else the detector's own transform size, else :data:`DEFAULT_IMAGE_SHAPE`."""
    from normswap import validate
    from normswap.detection import default_image_shape
    from normswap.errors import InputError

    if given is not None:
        shape = tuple(int(d) for d in given)
        if len(shape) == 4 and shape[0] == 1:
            shape = shape[1:]
        if len(shape) != 3:
            raise InputError(f"--input-shape {','.join(map(str, given))}: with a list of images give one image's "
                             "C,H,W, e.g. --input-shape 3,320,320 --images 2")
        src = "--input-shape"
    else:
        own = default_image_shape(model)
        shape, src = (own, "the detector's transform size") if own else (DEFAULT_IMAGE_SHAPE, "default (pass --input-shape C,H,W)")
    validate.input_size((1, *shape), batch_sizes=(images,))
    return shape, src


def example_images(shape: Sequence[int], images: int, dtype: Any = None) -> list[Any]:
    """The seeded list of images every stage traces and exports with (the first parity draw)."""
    from normswap.detection import image_list_inputs

    return image_list_inputs(shape, images, dtype=dtype)[0][1][0]


def parity_batches(shape: Sequence[int], images: int, samples: Any, dtype: Any = None,
                   model: Any = None) -> tuple[list[tuple[str, tuple[Any, ...]]], list[str]]:
    """Seeded draws of ``images`` random images (one for a detector, two otherwise), then ``samples`` (a tensor ``[M, C, H, W]``, a tensor
    file or a folder of images) in groups of ``images`` — the count the ONNX takes. Returns the batches
    and notes (samples left over)."""
    import torch

    from normswap.detection import image_list_inputs
    from normswap.errors import InputError

    from normswap.detection import takes_image_list

    # a detector runs once per draw plus its noise floor (a float64 copy, a nudged run): one draw of
    # random images — its R-CNN heads are probed on fixed boxes anyway; a plain list model gets two
    labels = ("images",) if model is not None and takes_image_list(model) else ("images", "images#2")
    batches: list[tuple[str, tuple[Any, ...]]] = list(image_list_inputs(shape, images, dtype=dtype, labels=labels))
    notes: list[str] = []
    if samples is None:
        return batches, notes
    x = load_samples(samples, shape, model=model, detector=True)
    if tuple(x.shape[1:]) != tuple(shape):
        raise InputError(f"--samples holds images of shape {tuple(x.shape[1:])} but the model is checked at {tuple(shape)}; "
                         "pass matching --input-shape C,H,W")
    if x.shape[0] < images:
        raise InputError(f"--samples holds {x.shape[0]} image(s) but --images is {images}; give at least {images}")
    if dtype is not None:
        x = x.to(dtype)
    groups = x.shape[0] // images
    for k in range(groups):
        batches.append((f"samples{'' if groups == 1 else f' {k + 1}'}×{images}", (list(torch.unbind(x[k * images:(k + 1) * images])),)))
    if x.shape[0] % images:
        notes.append(f"--samples: the last {x.shape[0] % images} image(s) were not used (groups of --images {images})")
    return batches, notes


def load_samples(samples: Any, shape: Sequence[int], *, model: Any = None, detector: bool = False) -> Any:
    """``--samples`` as one tensor ``[M, ...]``: a tensor, a tensor file, or a folder of images read by the
    ``--calib`` loader at ``shape``'s H×W (a detector's images stay in [0, 1]: it normalises them itself)."""
    import torch

    if isinstance(samples, (str, Path)) and Path(samples).expanduser().is_dir():
        from normswap.load.data import calibration_batches

        c = int(shape[-3]) if len(shape) >= 3 else 3
        norm = {"mean": (0.0,) * c, "std": (1.0,) * c} if detector else {}
        data = calibration_batches(Path(samples).expanduser(), size=tuple(int(d) for d in shape[-2:]),
                                   model=None if detector else model, **norm)
        return torch.cat([b[0] for b in data])
    if isinstance(samples, (str, Path)):
        from normswap.load import load_tensor_file

        samples = load_tensor_file(samples)
    return samples


def list_parity(original: Any, conv: Any, onnx_path: Any, batches: list[tuple[str, tuple[Any, ...]]],
                atol: float, rtol: float) -> Any:
    """Parity for a list-of-images model. A registered detector is compared through its probe
    (``pre.*`` against the tolerance, ``post*`` against the noise floor); onnxruntime, which runs the
    model as exported, is compared on the post-processed outputs. Every side runs once per batch; the
    original's noise floor (measured only if an output misses its tolerance) serves every pair of the
    batch. A function-changing swap checks its export only. Box/score/label agreement lands in the notes."""
    from normswap.detection import Probed, takes_image_list
    from normswap.errors import NormswapError, first_line
    from normswap.parity import PAIR_ORIGINAL_ORT, PAIR_ORIGINAL_REWRITTEN, PAIR_REWRITTEN_ORT, ParityResult, check_parity
    from normswap.parity.check import _run_failure
    from normswap.parity.rule import check_tolerances, judge
    from normswap.parity.running import _run_torch, eval_mode

    detector = takes_image_list(original)
    if not detector:
        if conv.exact:
            return check_parity(original, conv.model, onnx_path, inputs=batches, atol=atol, rtol=rtol)
        res = check_parity(conv.model, None, onnx_path, inputs=batches, atol=atol, rtol=rtol, reference_name="rewritten")
        res.notes.append(f"'{conv.to}' changes the model's function by design: parity checks the export only")
        return res
    check_tolerances(atol, rtol)
    # a swap changed the function on purpose: its export is checked against it, not the original
    reference, candidate = (original, conv.model) if conv.exact else (conv.model, None)
    ref_name = "original" if conv.exact else "rewritten"
    pair_ort = PAIR_ORIGINAL_ORT if conv.exact else PAIR_REWRITTEN_ORT
    res = ParityResult(stats=[], atol=atol, rtol=rtol)
    if onnx_path is not None:
        res.notes.append("onnxruntime CPU, optimization=all, threads=default")
    agreement: list[str] = []
    with eval_mode(reference, candidate):
        for label, xs in batches:
            ref = _run_torch(Probed(reference), xs)
            floors: dict[str, Any] = {}  # the reference's noise on its post-processed outputs, measured once
            sides: list[tuple[str, Any]] = []
            if candidate is not None:
                try:
                    cand = _run_torch(Probed(candidate), xs)
                except Exception as e:  # noqa: BLE001 - recorded as a failed comparison
                    res.stats.append(_run_failure(PAIR_ORIGINAL_REWRITTEN, label, f"the rewritten model raised {first_line(e)}"))
                else:
                    stats, fl = judge(Probed(reference), ref, cand, xs, pair=PAIR_ORIGINAL_REWRITTEN, batch=label, atol=atol, rtol=rtol)
                    res.stats.extend(stats)
                    if fl is not None:
                        floors["post"] = fl[len(ref["pre"]):]
                    sides.append(("rewritten", cand["post"]))
            if onnx_path is not None:
                from torch.utils import _pytree as pytree

                from normswap.parity import run_onnxruntime

                try:
                    flat = run_onnxruntime(onnx_path, xs)
                except NormswapError as e:
                    res.stats.append(_run_failure(pair_ort, label, str(e)))
                else:
                    stats, fl = judge(reference, ref["post"], flat, xs, pair=pair_ort, batch=label, atol=atol, rtol=rtol,
                                      floors=floors.get("post"))
                    res.stats.extend(stats)
                    if fl is not None:
                        floors["post"] = fl
                    if candidate is not None:  # the rewritten model computes the original's function: same noise
                        stats, _ = judge(None, sides[0][1], flat, xs, pair=PAIR_REWRITTEN_ORT, batch=label, atol=atol,
                                         rtol=rtol, floors=floors.get("post"))
                        for st in stats:  # the floor measured is the original's: say whose it is
                            if st.note:
                                st.note = st.note.replace("the rewritten model's own", "the original model's own")
                        res.stats.extend(stats)
                    leaves, spec = pytree.tree_flatten(ref["post"])
                    if len(flat) == len(leaves):
                        import torch

                        sides.append(("onnxruntime", pytree.tree_unflatten([torch.as_tensor(a) for a in flat], spec)))
            agreement.append(_agreement_line(label, ref["post"], sides, ref_name))
    res.notes.append("detector: the pre-post-processing tensors (pre.*: backbone/FPN features, dense head outputs, R-CNN "
                     "heads on a fixed grid of boxes) are held to the tolerance; the post-processed outputs (post_*, "
                     f"output_*) to the {ref_name} model's own noise floor")
    if not conv.exact:
        res.notes.append(f"'{conv.to}' changes the model's function by design: parity checks the export only")
    res.notes.extend(a for a in agreement if a)
    return res


def _agreement_line(label: str, ref: Any, sides: list[tuple[str, Any]], ref_name: str) -> str:
    """Detections found by each side on one batch and how many of the reference's each matches."""
    from normswap.detection import detection_agreement

    if not isinstance(ref, (list, tuple)) or not all(isinstance(r, dict) and "boxes" in r for r in ref):
        return ""
    parts = []
    for name, out in sides:
        a = detection_agreement(ref, out)
        parts.append(f"{name} {a['candidate']}, matched {a['matched']}/{a['reference']}"
                     + (f" (max |Δscore| {a['max_score_diff']:.1e}, max box shift {a['max_box_shift']:.1e} px)" if a["matched"] else ""))
    n = sum(len(r["boxes"]) for r in ref)
    scores = [r["scores"] for r in ref if "scores" in r and len(r["scores"]) > 1]
    if scores and all(bool((sc == sc[0]).all()) for sc in scores):
        parts.append("every score of the reference is equal, so which boxes survive top-k/NMS is arbitrary")
    hint = (" — none to compare: with random or untrained weights pass e.g. --arg box_score_thresh=0.0 (R-CNN) "
            "or --arg score_thresh=0.0 (RetinaNet/FCOS/SSD)") if n == 0 else ""
    return f"detections on {label}: {ref_name} {n}; " + "; ".join(parts) + hint
