"""R^2 of the action probe against the prediction horizon, a line per model, as a PNG drawn by
matplotlib's Agg renderer (no display, no pyplot state)."""
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from caip_jax import storage

# Row i is drawn in COLORS[i % len(COLORS)] (RGB; matplotlib's tab10 blue, red, green, ...), so
# the first row (the trained model) keeps its colour whatever baselines follow.
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
          (140, 86, 75), (227, 119, 194), (127, 127, 127))


def r2_by_horizon_figure(rows: dict[str, dict[int, float]], title: str, size: tuple[int, int] = (1280, 800),
                         dpi: int = 200, steps_per_second: float = 30.0) -> Figure:
    """rows {name: {horizon h in steps: R^2 over the first h steps}} -> a Figure of `size`
    (width, height) pixels: one line with markers per row, in order, broken where R^2 is not finite;
    horizons on a log2 axis ticked where measured, seconds on the top axis, R^2 = 0 (the
    probe's training mean) drawn as a reference, a grid and a legend."""
    steps = sorted({h for row in rows.values() for h in row})
    if not steps:
        raise ValueError(f"rows {rows!r} hold no horizons to plot")
    if steps[0] <= 0:
        raise ValueError(f"horizons {steps} must be positive steps (the x axis is logarithmic)")
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, (name, row) in enumerate(rows.items()):
        horizons = sorted(row)
        r2 = [row[h] if math.isfinite(row[h]) else math.nan for h in horizons]  # NaN: a gap
        color = tuple(c / 255 for c in COLORS[i % len(COLORS)])
        axes.plot(horizons, r2, marker="o", markersize=4, linewidth=1.5, color=color, label=name)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xscale("log", base=2)
    axes.xaxis.set_major_locator(FixedLocator(steps))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticklabels([str(h) for h in steps])
    axes.set_xlim(steps[0] / 2 ** 0.25, steps[-1] * 2 ** 0.25)
    axes.set_ylim(top=1.0)
    axes.set_xlabel(f"horizon h (steps at {steps_per_second:g} Hz)")
    axes.set_ylabel("R² of the first h steps")
    seconds = axes.secondary_xaxis("top", functions=(lambda h: h / steps_per_second, lambda s: s * steps_per_second))
    seconds.set_xlabel("horizon (s)")
    seconds.xaxis.set_major_locator(FixedLocator([h / steps_per_second for h in steps]))
    seconds.xaxis.set_minor_locator(NullLocator())
    seconds.set_xticklabels([f"{h / steps_per_second:.2g}" for h in steps])
    axes.grid(True, which="major", linewidth=0.5, alpha=0.5)
    axes.legend(loc="best", fontsize="small")
    axes.set_title(title)
    return figure


def plot_r2_by_horizon(rows: dict[str, dict[int, float]], path: str, title: str, **figure_args) -> None:
    """`r2_by_horizon_figure(rows, title, **figure_args)` saved as a PNG at `path`."""
    figure = r2_by_horizon_figure(rows, title, **figure_args)
    storage.write_encoded(path, lambda f: figure.savefig(f, format="png"))
