"""Loss plots are matplotlib figures: their lines hold the data given, the PNGs are real PNGs of the requested size
(read back by PIL and matplotlib), and no pyplot / global matplotlib state is touched."""

import json
import math
import sys

import matplotlib
import matplotlib.image
import numpy as np
from PIL import Image

from qlora_jax.app.plot import curves_figure, loss_figure, plot_curves, plot_loss


def test_curves_png_and_lines(tmp_path):
    backend, pyplot = matplotlib.get_backend(), sys.modules.get("matplotlib.pyplot")
    steps = np.arange(30)
    qlora, lora = 2 / (1 + steps), 2.2 / (1 + steps)
    lora[5] = np.nan
    fig = curves_figure({"qlora": (steps, qlora), "lora": (steps, lora)}, title="fine-tuning loss", xlabel="step",
                        ylabel="loss", width=320, height=200)
    (ax,) = fig.axes
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("fine-tuning loss", "step", "loss")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["qlora", "lora"]
    first, second = ax.get_lines()
    np.testing.assert_array_equal(first.get_xdata(), steps)
    np.testing.assert_array_equal(first.get_ydata(), qlora)
    np.testing.assert_array_equal(second.get_ydata(), lora)  # NaN stays NaN: a gap in the line
    plot_curves(tmp_path / "loss.png", {"qlora": (steps, qlora)}, width=320, height=200)
    with Image.open(tmp_path / "loss.png") as image:
        assert image.format == "PNG" and image.size == (320, 200)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2  # drawn, not blank
    assert matplotlib.get_backend() == backend and sys.modules.get("matplotlib.pyplot") is pyplot
    assert not list(tmp_path.glob("*.tmp"))


def test_loss_figure_from_metrics_jsonl(tmp_path):
    rows = []
    for step in range(1, 11):
        rows.append({"step": step, "loss": 3.0 / math.sqrt(step), "lr": 2e-4 * min(1.0, step / 3), "grad_norm": 0.1})
        if step % 5 == 0:
            rows.append({"step": step, "eval_loss": 3.2 / math.sqrt(step)})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loss_axes, lr_axes = loss_figure(metrics, title="run").axes
    train, evals = loss_axes.get_lines()
    assert (train.get_label(), evals.get_label(), loss_axes.get_title()) == ("train loss", "eval loss", "run")
    np.testing.assert_array_equal(train.get_xdata(), np.arange(1, 11))
    np.testing.assert_allclose(train.get_ydata(), 3.0 / np.sqrt(np.arange(1, 11)), rtol=1e-15)
    np.testing.assert_array_equal(evals.get_xdata(), [5, 10])
    np.testing.assert_allclose(evals.get_ydata(), 3.2 / np.sqrt([5, 10]), rtol=1e-15)
    (rate,) = lr_axes.get_lines()
    np.testing.assert_allclose(rate.get_ydata(), 2e-4 * np.minimum(1.0, np.arange(1, 11) / 3), rtol=1e-15)
    assert lr_axes.get_xlabel() == "step" and lr_axes.get_ylabel() == "learning rate"
    # A run without evaluation data: one line on top.
    (only,) = loss_figure([r for r in rows if "loss" in r]).axes[0].get_lines()
    assert only.get_label() == "train loss"
    plot_loss(tmp_path / "loss.png", metrics)
    assert matplotlib.image.imread(tmp_path / "loss.png").shape[:2] == (480, 640)
