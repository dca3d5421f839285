"""R^2 against prediction horizon as a line chart PNG, drawn with PIL only."""
import math

from PIL import Image, ImageDraw, ImageFont

# Row i is drawn in COLORS[i % len(COLORS)] (matplotlib's tab10 order).
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
          (140, 86, 75), (227, 119, 194), (127, 127, 127))


def plot_r2_by_horizon(rows: dict[str, dict[int, float]], path: str, title: str,
                       size: tuple[int, int] = (640, 400)) -> None:
    """rows {name: {horizon steps: R^2}} -> a PNG at path of size (width, height): one line per
    row, x = horizon steps, y from min(0, lowest R^2) to 1; non-finite values are skipped."""
    width, height = size
    left, right, top, bottom = 56, width - 150, 30, height - 44  # plot box; legend on the right
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    steps = sorted({h for row in rows.values() for h in row})
    values = [v for row in rows.values() for v in row.values() if math.isfinite(v)]
    if not steps:
        raise ValueError(f"rows {rows!r} hold no horizons to plot")
    x_lo, x_hi = steps[0], max(steps[-1], steps[0] + 1)
    y_lo = min([0.0] + values)

    def to_px(step, r2):
        return (left + (step - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (r2 - y_lo) / (1.0 - y_lo) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline="black")
    for step in steps:  # x ticks at every horizon measured
        x = to_px(step, y_lo)[0]
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x, bottom + 6), str(step), fill="black", font=font, anchor="mt")
    unit = 10 ** math.floor(math.log10((1.0 - y_lo) / 6))  # y ticks: <= 6 round steps, 0 and 1 among them
    tick = next(m * unit for m in (1, 2, 2.5, 5, 10) if (1.0 - y_lo) / (m * unit) <= 6)
    for i in range(math.ceil(y_lo / tick - 1e-9), math.floor(1 / tick + 1e-9) + 1):
        r2 = i * tick
        y = to_px(x_lo, r2)[1]
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((left - 6, y), f"{r2:.4g}", fill="black", font=font, anchor="rm")
    draw.text(((left + right) / 2, height - 4), "horizon (steps)", fill="black", font=font, anchor="md")
    draw.text((4, top - 8), "R^2", fill="black", font=font, anchor="lm")
    draw.text(((left + right) / 2, 4), title, fill="black", font=font, anchor="mt")
    for i, (name, row) in enumerate(rows.items()):
        color = COLORS[i % len(COLORS)]
        points = [to_px(h, v) for h, v in sorted(row.items()) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        y = top + 10 + 18 * i
        draw.line((right + 12, y, right + 36, y), fill=color, width=3)
        draw.text((right + 42, y), name, fill="black", font=font, anchor="lm")
    image.save(path, format="PNG")
