"""The per-layer drift plot (PIL)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ...atomic import atomic_path

if TYPE_CHECKING:
    from .report import FunctionReport


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
            key = next((k for k in s.agreement if k != "rel_err"), "top1_agreement")
            a = s.agreement.get(key)
            d.text((x1 + 46, ly), s.stage + (f" ({a:.3f})" if a is not None else ""), fill="black", font=font)
        d.text((x1 + 15, y0 + 10 + 22 * len(stages) + 6), f"({next((k for k in stages[0].agreement if k != 'rel_err'), 'agreement')}, held-out)" if stages else "(agreement)", fill=(90, 90, 90), font=font)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
