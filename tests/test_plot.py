"""The R^2-by-horizon plot: the figure holds the rows' values, and the PNG shows them where
matplotlib's own data-to-pixel transform puts them."""
import math

import numpy as np
import pytest
from PIL import Image

from caip_jax.evaluate import plot

ROWS = {
    "step 400": {1: 0.61, 2: 0.6, 4: 0.58, 8: 0.55, 16: 0.5, 32: 0.42, 64: 0.35},
    "random init": {1: -0.05, 2: -0.06, 4: -0.08, 8: -0.1, 16: -0.12, 32: -0.15, 64: -0.17},
    "siglip2 init": {1: 0.3, 2: 0.29, 4: 0.27, 8: float("nan"), 16: 0.22, 32: 0.18, 64: float("inf")},
}


def row_lines(figure):
    return {line.get_label(): line for line in figure.axes[0].get_lines() if line.get_label() in ROWS}


def test_figure_holds_every_row_and_labels_its_axes():
    figure = plot.r2_by_horizon_figure(ROWS, "R² by horizon")
    axes = figure.axes[0]
    lines = row_lines(figure)
    assert list(lines) == list(ROWS)  # in order, so the legend reads as the rows
    for name, row in ROWS.items():
        np.testing.assert_array_equal(lines[name].get_xdata(), sorted(row))
        expected = [row[h] if math.isfinite(row[h]) else math.nan for h in sorted(row)]
        np.testing.assert_array_equal(lines[name].get_ydata(), expected)  # NaN breaks the line
    assert [t.get_text() for t in axes.get_legend().get_texts()] == list(ROWS)
    assert axes.get_xlabel() == "horizon h (steps at 30 Hz)" and axes.get_ylabel() == "R² of the first h steps"
    assert axes.get_title() == "R² by horizon" and axes.get_xscale() == "log"
    assert list(axes.get_xticks()) == [1, 2, 4, 8, 16, 32, 64]
    (seconds,) = axes.child_axes
    assert seconds.get_xlabel() == "horizon (s)"
    np.testing.assert_allclose(seconds.get_xticks(), np.array([1, 2, 4, 8, 16, 32, 64]) / 30)
    assert axes.get_ylim()[1] == 1.0 and axes.get_ylim()[0] < -0.17


def test_png_shows_the_values_where_matplotlib_places_them(tmp_path):
    path = str(tmp_path / "r2.png")
    plot.plot_r2_by_horizon(ROWS, path, "R² by horizon")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1280, 800)
        pixels = np.asarray(image.convert("RGB"))
    # The same figure rendered here is the file, pixel for pixel, so its transform locates the
    # markers in the file.
    figure = plot.r2_by_horizon_figure(ROWS, "R² by horizon")
    figure.canvas.draw()
    np.testing.assert_array_equal(np.asarray(figure.canvas.buffer_rgba())[..., :3], pixels)
    transform = figure.axes[0].transData
    for i, (name, row) in enumerate(ROWS.items()):
        for h, r2 in row.items():
            if math.isfinite(r2):
                x, y = transform.transform((h, r2))
                assert tuple(pixels[round(800 - y), round(x)]) == plot.COLORS[i], (name, h)


@pytest.mark.parametrize(
    "rows, message",
    [({"trained": {}}, "hold no horizons"), ({"trained": {0: 0.5, 8: 0.4}}, "must be positive steps")],
)
def test_rows_that_cannot_be_plotted_are_refused(rows, message):
    with pytest.raises(ValueError, match=message):
        plot.r2_by_horizon_figure(rows, "R²")
