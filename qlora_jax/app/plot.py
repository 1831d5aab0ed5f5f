"""Loss curves as PNG files without a plotting library.

Draws each series as a polyline on a white canvas with axes and tick marks
(a 5x7 bitmap font draws the tick labels, legend, title and axis labels), then writes a PNG with
`zlib`. Enough to look at a run; not a replacement for a plotting package.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["write_png", "plot_curves"]

_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
# 5x7 glyphs, one int per row (bit 4 = leftmost column).
_FONT = {
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12), ".": (0, 0, 0, 0, 0, 12, 12), "-": (0, 0, 0, 31, 0, 0, 0),
    " ": (0,) * 7,
    "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30), "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (30, 17, 17, 17, 17, 17, 30), "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17), "I": (14, 4, 4, 4, 4, 4, 14),
    "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17), "O": (14, 17, 17, 17, 17, 17, 14),
    "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4), "U": (17, 17, 17, 17, 17, 17, 14),
    "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 10, 4, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31), "_": (0, 0, 0, 0, 0, 0, 31),
    "/": (1, 1, 2, 4, 8, 16, 16), "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8),
    "=": (0, 0, 31, 0, 31, 0, 0), "+": (0, 4, 4, 31, 4, 4, 0), ",": (0, 0, 0, 0, 12, 4, 8),
    ":": (0, 12, 12, 0, 12, 12, 0),
}


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes an RGB `uint8` image `[height, width, 3]` as a PNG file.

    Example:
        >>> import numpy as np, tempfile, os
        >>> from qlora_jax.app.plot import write_png
        >>> p = os.path.join(tempfile.mkdtemp(), "a.png")
        >>> write_png(p, np.zeros((2, 3, 3), np.uint8))
        >>> open(p, "rb").read(8)
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    image = np.ascontiguousarray(image, np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected [height, width, 3] uint8, got shape {image.shape}")
    h, w, _ = image.shape
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def plot_curves(path: str | os.PathLike, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                title: str = "", xlabel: str = "", ylabel: str = "", width: int = 640, height: int = 400) -> None:
    """Plots named `(x, y)` series (e.g. loss per step) into a PNG.

    Ticks fall on round numbers (1, 2, 2.5 or 5 times a power of ten).
    Letters are drawn as capitals.

    Args:
        path: Output file.
        curves: `{name: (xs, ys)}`; non-finite points are skipped.
        title: Drawn centred above the plot.
        xlabel: Drawn centred below the x axis.
        ylabel: Drawn above the y axis.
        width: Image width in pixels.
        height: Image height in pixels.

    Example:
        >>> import tempfile, os
        >>> from qlora_jax.app import plot_curves
        >>> path = os.path.join(tempfile.mkdtemp(), "loss.png")
        >>> plot_curves(path, {"train": ([0, 1, 2], [3.0, 2.0, 1.5])}, title="loss per step", xlabel="step",
        ...             ylabel="loss")
        >>> open(path, "rb").read(4)[1:]
        b'PNG'
    """
    img = np.full((height, width, 3), 255, np.uint8)
    left, right = 60, 12
    top = 12 + (14 if title else 0) + (12 if ylabel else 0)
    bottom = 30 + (14 if xlabel else 0)
    points = [(np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in curves.values()]
    finite = [(x[np.isfinite(y)], y[np.isfinite(y)]) for x, y in points]
    xs = np.concatenate([x for x, _ in finite] or [np.zeros(1)])
    ys = np.concatenate([y for _, y in finite] or [np.zeros(1)])
    x0, x1 = float(xs.min()), float(xs.max()) if xs.max() > xs.min() else float(xs.min()) + 1
    y0, y1 = float(ys.min()), float(ys.max()) if ys.max() > ys.min() else float(ys.min()) + 1
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def to_px(x, y):
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = top + (y1 - y) / (y1 - y0) * (height - top - bottom)
        return px, py

    img[top:height - bottom, left] = 0
    img[height - bottom, left:width - right] = 0
    for value in nice_ticks(y0, y1):
        _, py = to_px(x0, value)
        img[int(py), left - 4:left] = 0
        _text(img, _tick_label(value), 4, int(py) - 3)
    for xv in nice_ticks(x0, x1):
        px, _ = to_px(xv, y0)
        img[height - bottom:height - bottom + 4, int(px)] = 0
        label = _tick_label(xv)
        _text(img, label, int(px) - 3 * len(label), height - bottom + 8)
    if title:
        _text(img, title, (width - 6 * len(title)) // 2, 6)
    if ylabel:
        _text(img, ylabel, 4, top - 12)
    if xlabel:
        _text(img, xlabel, left + (width - left - right - 6 * len(xlabel)) // 2, height - 14)
    for k, ((x, y), name) in enumerate(zip(finite, curves, strict=True)):
        color = _COLORS[k % len(_COLORS)]
        px, py = to_px(x, y)
        for i in range(len(px) - 1):
            _line(img, px[i], py[i], px[i + 1], py[i + 1], color)
        if len(px) == 1:
            _line(img, px[0], py[0], px[0] + 1, py[0], color)
        img[top + 6 + 12 * k: top + 9 + 12 * k, width - 150: width - 130] = color
        _text(img, name, width - 125, top + 4 + 12 * k)
    write_png(path, img)


def nice_ticks(lo: float, hi: float, most: int = 8) -> list[float]:
    """Round-number tick values in `[lo, hi]`: multiples of 1, 2, 2.5 or 5 times a power of ten, at most `most` (>= 2).

    Example:
        >>> from qlora_jax.app.plot import nice_ticks
        >>> nice_ticks(1, 300)
        [50.0, 100.0, 150.0, 200.0, 250.0, 300.0]
        >>> nice_ticks(-0.46, 9.83)
        [0.0, 2.0, 4.0, 6.0, 8.0]
    """
    span = hi - lo
    if not span > 0:
        return [float(lo)]
    magnitude = 10.0 ** math.floor(math.log10(span / (most - 1)))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if span / (m * magnitude) <= most - 1)
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [float(f"{i * step:.12g}") + 0.0 for i in range(first, last + 1)]


def _tick_label(value: float) -> str:
    return f"{value:.4g}"


def _line(img: np.ndarray, xa: float, ya: float, xb: float, yb: float, color) -> None:
    n = int(max(abs(xb - xa), abs(yb - ya))) + 1
    for t in np.linspace(0.0, 1.0, n + 1):
        x, y = int(round(xa + (xb - xa) * t)), int(round(ya + (yb - ya) * t))
        img[max(y - 1, 0):y + 1, max(x - 1, 0):x + 1] = color


def _text(img: np.ndarray, text: str, x: int, y: int) -> None:
    """Draws digits, letters (as capitals) and a little punctuation; other characters as boxes."""
    for ch in text:
        rows = _FONT.get(ch.upper(), _FONT.get(ch, (31, 17, 17, 17, 17, 17, 31)))
        for r, bits in enumerate(rows):
            for c in range(5):
                if bits >> (4 - c) & 1 and 0 <= y + r < img.shape[0] and 0 <= x + c < img.shape[1]:
                    img[y + r, x + c] = 0
        x += 6
