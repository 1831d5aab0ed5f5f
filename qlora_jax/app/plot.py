"""Loss curves with matplotlib: the `loss.png` of `qlora-jax finetune` and `qlora-jax demo`.

Figures are made as `matplotlib.figure.Figure` objects drawn by the Agg
canvas attached here, without pyplot: nothing touches matplotlib's global
state (its backend, pyplot's current figure), so a notebook keeps its own
backend and a figure returned here is displayed inline by Jupyter as is.

* `loss_figure(metrics)`: a run's training and evaluation loss per step, and
  its learning rate in a second panel, from `metrics.jsonl` rows (or the file).
* `curves_figure(curves)`: named `(x, y)` series in one panel.
* `save_png(figure, path)` writes a figure; `plot_curves` and `plot_loss` make
  and write in one call.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib is imported when a figure is made (the command line starts faster without it)
    from matplotlib.figure import Figure

__all__ = ["curves_figure", "loss_figure", "plot_curves", "plot_loss", "read_metrics", "save_png"]

DPI = 100


def _figure(width: int, height: int, rows: int = 1, **gridspec: Any) -> tuple[Figure, list[Any]]:
    """A figure of `width x height` pixels (at `DPI`) on its own Agg canvas, with `rows` stacked axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False, gridspec_kw=gridspec or None)[:, 0]
    return fig, list(axes)


def curves_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str = "",
                  xlabel: str = "", ylabel: str = "", width: int = 640, height: int = 400) -> Figure:
    """Named `(x, y)` series (e.g. the loss per step of two methods) as lines in one panel.

    Args:
        curves: `{name: (xs, ys)}`; the names make the legend. Non-finite
            points are left out (a gap in the line).
        title: The figure's title.
        xlabel: The x axis' label.
        ylabel: The y axis' label.
        width: Figure width in pixels.
        height: Figure height in pixels.

    Returns:
        The figure, drawn on its own Agg canvas (`save_png` writes it).

    Example:
        >>> from qlora_jax.app.plot import curves_figure
        >>> fig = curves_figure({"qlora": ([1, 2, 3], [3.0, 2.0, 1.5])}, xlabel="step", ylabel="loss")
        >>> line, = fig.axes[0].get_lines()
        >>> line.get_label(), line.get_ydata().tolist()
        ('qlora', [3.0, 2.0, 1.5])
    """
    fig, (ax,) = _figure(width, height)
    for name, (xs, ys) in curves.items():
        points = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
        ax.plot([x for x, _ in points], [y if math.isfinite(y) else math.nan for _, y in points],
                label=name, marker="." if len(points) == 1 else None)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    return fig


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's `metrics.jsonl` (one dict per line; a missing file has none).

    Example:
        >>> from qlora_jax.app.plot import read_metrics
        >>> _ = (tmp / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\\n{"step": 1, "eval_loss": 2.7}\\n')
        >>> read_metrics(tmp / "metrics.jsonl")
        [{'step': 1, 'loss': 2.5}, {'step': 1, 'eval_loss': 2.7}]
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e.msg})") from None
    return rows


def loss_figure(metrics: Iterable[Mapping[str, Any]] | str | os.PathLike, *, title: str = "qlora-jax finetune",
                width: int = 640, height: int = 480) -> Figure:
    """A fine-tuning run's curves: training and evaluation loss per step, and the learning rate below.

    Reads the rows `qlora-jax finetune` writes to `metrics.jsonl`: a training
    row has `step`, `loss` and `lr`, an evaluation row `step` and
    `eval_loss`. The top panel shows `loss` ("train loss") and `eval_loss`
    ("eval loss", with markers), the bottom panel `lr` ("learning rate"); a
    series with no row is not drawn (a run without evaluation data has one
    line on top). In a notebook, the returned figure displays itself inline.

    Args:
        metrics: The rows, or the path of a `metrics.jsonl` file.
        title: The figure's title.
        width: Figure width in pixels.
        height: Figure height in pixels.

    Returns:
        The figure (two axes: loss, learning rate), on its own Agg canvas.

    Example:
        >>> from qlora_jax.app.plot import loss_figure
        >>> rows = [{"step": 1, "loss": 2.0, "lr": 1e-4}, {"step": 2, "loss": 1.5, "lr": 2e-4},
        ...         {"step": 2, "eval_loss": 1.7}]
        >>> fig = loss_figure(rows)
        >>> loss_axes, lr_axes = fig.axes
        >>> [(line.get_label(), line.get_xdata().tolist(), line.get_ydata().tolist()) for line in loss_axes.get_lines()]
        [('train loss', [1, 2], [2.0, 1.5]), ('eval loss', [2], [1.7])]
        >>> lr_axes.get_lines()[0].get_ydata().tolist()
        [0.0001, 0.0002]
    """
    rows = read_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)

    def series(key: str) -> tuple[list[int], list[float]]:
        picked = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [s for s, _ in picked], [float(v) for _, v in picked]

    fig, (loss_ax, lr_ax) = _figure(width, height, rows=2, height_ratios=(3, 1))
    for key, label, style in (("loss", "train loss", {}), ("eval_loss", "eval loss", {"marker": "o"})):
        steps, values = series(key)
        if steps:
            loss_ax.plot(steps, values, label=label, **style)
    loss_ax.set(title=title, ylabel="loss")
    if loss_ax.get_lines():
        loss_ax.legend()
    steps, values = series("lr")
    if steps:
        lr_ax.plot(steps, values, label="learning rate", color="tab:green")
    lr_ax.set(xlabel="step", ylabel="learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=0.3)
    return fig


def save_png(figure: Figure, path: str | os.PathLike) -> Path:
    """Writes `figure` as a PNG of its size in pixels; the file is replaced whole (never seen half-written).

    Example:
        >>> from qlora_jax.app.plot import curves_figure, save_png
        >>> path = save_png(curves_figure({"a": ([0, 1], [1.0, 0.5])}, width=320, height=200), tmp / "a.png")
        >>> path.read_bytes()[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    path = Path(path)
    partial = path.with_name(path.name + ".tmp")
    figure.savefig(partial, format="png", dpi=DPI)
    os.replace(partial, path)
    return path


def plot_curves(path: str | os.PathLike, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                title: str = "", xlabel: str = "", ylabel: str = "", width: int = 640, height: int = 400) -> None:
    """Plots named `(x, y)` series (e.g. loss per step) into a PNG: `curves_figure` written by `save_png`.

    Example:
        >>> from qlora_jax.app import plot_curves
        >>> plot_curves(tmp / "loss.png", {"train": ([0, 1, 2], [3.0, 2.0, 1.5])}, title="loss per step",
        ...             xlabel="step", ylabel="loss")
        >>> (tmp / "loss.png").read_bytes()[1:4]
        b'PNG'
    """
    save_png(curves_figure(curves, title=title, xlabel=xlabel, ylabel=ylabel, width=width, height=height), path)


def plot_loss(path: str | os.PathLike, metrics: Iterable[Mapping[str, Any]] | str | os.PathLike, *,
              title: str = "qlora-jax finetune") -> None:
    """Writes `loss_figure(metrics)` (loss and learning rate per step) as a PNG: `finetune`'s `loss.png`.

    Example:
        >>> from qlora_jax.app.plot import plot_loss
        >>> plot_loss(tmp / "loss.png", [{"step": 1, "loss": 2.0, "lr": 1e-4}, {"step": 2, "loss": 1.5, "lr": 1e-4}])
        >>> (tmp / "loss.png").read_bytes()[1:4]
        b'PNG'
    """
    save_png(loss_figure(metrics, title=title), path)
