"""Loss-curve PNGs decode with an independent reader and show the curves."""

import struct
import zlib

import numpy as np

from qlora_jax.app.plot import plot_curves


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


def test_ticks_fall_on_round_steps_and_labels_are_drawn(tmp_path):
    steps = np.arange(1, 301)
    loss = 9.0 / np.sqrt(steps)
    plain, labelled = tmp_path / "plain.png", tmp_path / "labelled.png"
    plot_curves(plain, {"train": (steps, loss)})
    plot_curves(labelled, {"train": (steps, loss)}, title="fine-tuning loss", xlabel="step", ylabel="loss")
    image = _decode_png(plain.read_bytes())
    height, width = image.shape[:2]
    black = (image == 0).all(-1)
    # Tick marks hang below the x axis (row height - 30); the plot spans x 1..300 over pixels 60..width - 12.
    ticks = np.flatnonzero(black[height - 30 + 2, :])
    expected = [int(60 + (t - 1) / 299 * (width - 72)) for t in (50, 100, 150, 200, 250, 300)]
    np.testing.assert_array_equal(ticks, expected)
    # y ticks: the loss runs 0.52..9.0 (+5% padding), so round steps of 2 from 2 to 8 (not 0: below the padding).
    y_ticks = np.flatnonzero(black[:, 60 - 2])
    y0, y1 = 9.0 / np.sqrt(300), 9.0
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)
    np.testing.assert_array_equal(y_ticks, [int(12 + (y1 - v) / (y1 - y0) * (height - 42)) for v in (8, 6, 4, 2)])
    # Title, y label and x label add ink above and below the plot that the plain figure does not have.
    ink = (_decode_png(labelled.read_bytes()) == 0).all(-1)
    assert not black[:12].any() and ink[:12].any()
    assert ink[-14:].any() and not black[-14:].any()
