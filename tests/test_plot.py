"""Loss-curve PNGs decode with an independent reader and show the curves."""

import struct
import zlib

import numpy as np

from qlora_jax._src.plot import plot_curves


def _decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", None, None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 2)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    assert (raw[:, 0] == 0).all()  # filter type "none" on every row
    return raw[:, 1:].reshape(height, width, 3)


def test_curves_png_decodes_and_contains_both_colors(tmp_path):
    steps = np.arange(30)
    plot_curves(tmp_path / "loss.png", {"qlora": (steps, 2 / (1 + steps)), "lora": (steps, 2.2 / (1 + steps))},
                width=320, height=200)
    image = _decode_png((tmp_path / "loss.png").read_bytes())
    assert image.shape == (200, 320, 3)
    colors = {tuple(c) for c in image.reshape(-1, 3)}
    assert (31, 119, 180) in colors and (214, 39, 40) in colors
    blue = np.argwhere((image == (31, 119, 180)).all(-1))
    assert blue[:, 1].max() - blue[:, 1].min() > 200  # the curve spans the plot, not just the legend
