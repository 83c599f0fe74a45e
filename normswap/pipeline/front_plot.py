"""The front's PNG: onnxruntime latency (×the original, x) against held-out quality (y), one point per
prefix of sites folded cheapest first; the original, the chosen point and the all-folded point marked.

Drawn with PIL in the style of ``normswap compare``'s batch-sweep PNG (:func:`normswap.compare_sweep._save_sweep_plot`)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

__all__ = ["save_front_plot"]

_BLUE, _GREEN, _RED, _GREY = (31, 119, 180), (44, 160, 44), (214, 39, 40), (90, 90, 90)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _ticks(lo: float, hi: float, n: int = 6, min_span: float = 0.01) -> tuple[float, float, list[float]]:
    """A nice step for about ``n`` ticks over [lo, hi] (widened to ``min_span``), the rounded range, and the ticks."""
    if hi - lo < min_span:
        mid = (hi + lo) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    span = hi - lo
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    a, b = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    if b <= a:
        b = a + step
    return a, b, [a + i * step for i in range(int(round((b - a) / step)) + 1)]


def _decimals(ticks: list[float]) -> int:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    return max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if round(step / 10 ** math.floor(math.log10(step)), 6) == 2.5 else 0)


def _ascii(text: str) -> str:
    """PIL's default font has no ×, µ, ≈, →: their ASCII spellings."""
    for a, b in (("×", "x"), ("µ", "u"), ("≈", "~"), ("→", "->"), ("–", "-"), ("—", "-"), ("²", "^2")):
        text = text.replace(a, b)
    return text


def _wrap(d: Any, text: str, font: Any, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        cand = f"{line} {word}".strip()
        if line and d.textlength(cand, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = cand
    return lines + [line] if line else lines


def save_front_plot(rep: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``rep``'s (a :class:`~normswap.pipeline.fold_norms.FoldNormsReport` with ``latency``) front as a PNG."""
    from PIL import Image, ImageDraw

    from normswap.atomic import atomic_path

    lat = rep.latency
    W, H = 1000, 620
    L, T, PW, PH = 100, 116, 620, 400
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f13, f15, f18 = _font(13), _font(15), _font(18)
    order = rep.front[-1].folded if rep.front else []
    # (k, ratio, quality): the original is k = 0
    pts = [(0, 1.0 if lat.original_ms else None, rep.base)]
    pts += [(k, lat.ratio(ms), p.quality) for k, (p, ms) in enumerate(zip(rep.front, lat.points_ms), start=1)]
    good = [(k, x, y) for k, x, y in pts if x is not None and y is not None]
    d.text((L, 14), "Folding per-sample norms: latency against held-out quality", fill="black", font=f18)
    against = "" if "original" in rep.measure else " against the original"
    sub = (f"sites folded cumulatively, cheapest first (their affine fits alone); {rep.measure}{against} on {rep._n()} "
           f"({rep.evaluated_on})")
    for i, text in enumerate(_wrap(d, _ascii(sub), f13, W - L - 20)[:2] + [_ascii(f"latency: {lat.runtime}")]):
        d.text((L, 40 + 16 * i), text, fill=_GREY, font=f13)
    chosen_k = rep.chosen_point()
    extra = []  # the chosen sites when they are not a front point
    if chosen_k is None and lat.chosen_ms is not None and rep.stages:
        q = next((s.agreement.quality for s in rep.stages if s.stage == "calibrated"), None)
        if q is not None:
            extra.append((lat.ratio(lat.chosen_ms), q))
    # the chosen model as delivered (after step 5's refit and any recovery) when it differs from its front
    # point, which is the affine fits alone: a filled green point at the same latency
    delivered = None
    final = rep.stages[-1] if rep.stages else None
    fq = getattr(getattr(final, "agreement", None), "quality", None)
    if chosen_k and fq is not None and 0 < chosen_k < len(pts) and pts[chosen_k][1] is not None \
            and pts[chosen_k][2] is not None and abs(fq - pts[chosen_k][2]) > 1e-9:
        delivered = (pts[chosen_k][1], fq, final.stage)
    xs = [x for _, x, _ in good] + [x for x, _ in extra] + ([delivered[0]] if delivered else [])
    ys = [y for _, _, y in good] + [y for _, y in extra] + ([delivered[1]] if delivered else [])
    floor = None
    if rep.mode == "auto" and rep.base is not None:
        floor = rep.base - rep.max_drop
        ys.append(floor)
    if not xs:
        d.text((L, T + PH / 2), "no latency was measured", fill=_RED, font=f15)
    else:
        x_lo, x_hi, xt = _ticks(min(xs), max(xs), min_span=0.1)
        y_lo, y_hi, yt = _ticks(min(ys), max(ys))
        M = 16  # pixels kept free inside the frame: no point sits on it
        px = lambda v: L + M + (PW - 2 * M) * (v - x_lo) / (x_hi - x_lo)
        py = lambda v: T + PH - M - (PH - 2 * M) * (v - y_lo) / (y_hi - y_lo)
        d.rectangle([L, T, L + PW, T + PH], outline="black")
        xd, yd = _decimals(xt), _decimals(yt)
        for v in xt:
            xx = px(v)
            d.line([xx, T, xx, T + PH], fill=(235, 235, 235))
            d.line([xx, T + PH, xx, T + PH + 5], fill="black")
            s = f"{v:.{xd}f}x"
            d.text((xx - d.textlength(s, font=f13) / 2, T + PH + 8), s, fill="black", font=f13)
        for v in yt:
            yy = py(v)
            d.line([L, yy, L + PW, yy], fill=(235, 235, 235))
            d.line([L - 5, yy, L, yy], fill="black")
            s = f"{v:.{yd}f}"
            d.text((L - 8 - d.textlength(s, font=f13), yy - 7), s, fill="black", font=f13)
        xl = "onnxruntime latency, x the original's (left = faster)"
        d.text((L + PW / 2 - d.textlength(xl, font=f13) / 2, T + PH + 30), xl, fill="black", font=f13)
        yl = _ascii(f"held-out {rep.measure}")
        tw = math.ceil(d.textlength(yl, font=f13)) + 4
        label = Image.new("RGBA", (tw, 20), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((0, 0), yl, fill="black", font=f13)
        rot = label.rotate(90, expand=True)
        img.paste(rot, (L - 78, int(T + PH / 2 - tw / 2)), rot)
        if floor is not None:  # auto's bar
            yy = py(floor)
            for x0 in range(L, L + PW, 12):
                d.line([x0, yy, min(x0 + 6, L + PW), yy], fill=_RED, width=1)
            text = f"auto's bar: drop <= --max-drop {rep.max_drop:g}"
            d.text((L + PW - 8 - d.textlength(text, font=f13), yy + 4), text, fill=_RED, font=f13)
        line = [(px(x), py(y)) for _, x, y in good]
        if len(line) > 1:
            d.line(line, fill=_BLUE, width=2)
        n = len(order)
        for k, x, y in good:
            xx, yy = px(x), py(y)
            r = 4
            d.ellipse([xx - r, yy - r, xx + r, yy + r], fill=_BLUE)
            d.text((xx - 4, yy - 30 if k % 2 else yy + 14), str(k), fill=_BLUE, font=f13)
            if k == 0:  # the original: a hollow diamond
                r = 9
                d.polygon([(xx, yy - r), (xx + r, yy), (xx, yy + r), (xx - r, yy)], outline="black", width=2)
            if k == n:  # every site folded: a hollow square
                r = 8
                d.rectangle([xx - r, yy - r, xx + r, yy + r], outline="black", width=2)
            if k == chosen_k:  # auto's (or the named) choice: a green ring
                r = 12
                d.ellipse([xx - r, yy - r, xx + r, yy + r], outline=_GREEN, width=3)
        for x, y in extra:
            xx, yy = px(x), py(y)
            d.ellipse([xx - 12, yy - 12, xx + 12, yy + 12], outline=_GREEN, width=3)
            d.ellipse([xx - 4, yy - 4, xx + 4, yy + 4], fill=_GREEN)
        if delivered is not None:  # same latency as its front point; a dotted stem joins them
            xx, yy, y0 = px(delivered[0]), py(delivered[1]), py(pts[chosen_k][2])
            for y_ in range(int(min(yy, y0)) + 8, int(max(yy, y0)) - 8, 6):
                d.line([xx, y_, xx, y_ + 3], fill=_GREEN, width=1)
            d.ellipse([xx - 6, yy - 6, xx + 6, yy + 6], fill=_GREEN)
    # legend
    lx, ly = L + PW + 24, T
    d.text((lx, ly - 24), "points", fill="black", font=f15)
    d.line([lx, ly + 8, lx + 26, ly + 8], fill=_BLUE, width=2)
    d.ellipse([lx + 9, ly + 4, lx + 17, ly + 12], fill=_BLUE)
    d.text((lx + 34, ly), "front: k sites folded", fill="black", font=f13)
    ly += 28
    d.polygon([(lx + 13, ly - 1), (lx + 22, ly + 8), (lx + 13, ly + 17), (lx + 4, ly + 8)], outline="black", width=2)
    d.text((lx + 34, ly), "original (k = 0)", fill="black", font=f13)
    ly += 28
    d.rectangle([lx + 5, ly, lx + 21, ly + 16], outline="black", width=2)
    d.text((lx + 34, ly), f"all {len(order)} folded", fill="black", font=f13)
    ly += 28
    d.ellipse([lx + 1, ly - 4, lx + 25, ly + 20], outline=_GREEN, width=3)
    mode = rep.mode if isinstance(rep.mode, str) else "named sites"
    d.text((lx + 34, ly), f"chosen ({mode})", fill="black", font=f13)
    ly += 26
    if chosen_k is not None and 0 <= chosen_k <= len(pts) - 1 and pts[chosen_k][1] is not None:
        _, cx, cy = pts[chosen_k]
        d.text((lx + 34, ly), f"k = {chosen_k}: {cx:.2f}x, {'-' if cy is None else f'{cy:.4f}'}", fill="black", font=f13)
        ly += 18
        if delivered is not None:
            what = "refit" if delivered[2] == "calibrated" and rep.refit_kept else delivered[2]
            d.ellipse([lx + 7, ly, lx + 19, ly + 12], fill=_GREEN)
            d.text((lx + 34, ly), f"as delivered ({what}): {delivered[1]:.4f}", fill="black", font=f13)
            ly += 18
    elif extra:
        cx, cy = extra[0]
        d.text((lx + 34, ly), f"{len(rep.folded)} sites: {cx:.2f}x, {cy:.4f}", fill="black", font=f13)
        ly += 18
    ly += 14
    for i, n_ in enumerate(order, start=1):  # which site each k adds
        if ly > T + PH + 40:
            d.text((lx, ly), "...", fill=_GREY, font=f13)
            break
        ms = lat.saved_ms(i)
        d.text((lx, ly), f"{i}: + {n_}" + ("" if ms is None else f"  saves {ms * 1e3:.0f} us"), fill=_GREY, font=f13)
        ly += 17
    d.text((L, H - 26), "saves: the latency that site's fold saves along the front, with the cheaper sites folded "
           + ("(timing noise under 0.1 us)" if (lat.noise_ms or 0) * 1e3 < 0.05
            else f"(timing noise about {(lat.noise_ms or 0) * 1e3:.1f} us)"), fill=_GREY, font=f13)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
