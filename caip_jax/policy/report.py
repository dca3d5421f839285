"""What caip-policy-eval writes: results.json, results.md (the paper's table: encoders x tasks
with an average column, the best of each column in bold), a bar chart, and rollout strips and
GIFs to look at. Drawn with PIL only."""
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from caip_jax.evaluate.plot import COLORS


def table(values: dict[str, dict[str, float]], encoders: list[str], columns: list[str], percent: bool,
          higher_is_better: bool) -> str:
    """values[column][encoder] -> a Markdown table, a row per encoder, a column per task and
    the average; the best value of each column in bold (ties all bold)."""
    rows = {e: [values[c][e] for c in columns] for e in encoders}
    rows = {e: v + [float(np.mean(v))] for e, v in rows.items()}
    best = [(max if higher_is_better else min)(rows[e][i] for e in encoders) for i in range(len(columns) + 1)]
    show = (lambda x: f"{100 * x:.1f}") if percent else (lambda x: f"{x:.4g}")
    lines = ["| encoder | " + " | ".join(columns) + " | Avg. |", "|---" + "|---:" * (len(columns) + 1) + "|"]
    for e in encoders:
        cells = [f"**{show(x)}**" if np.isclose(x, b) else show(x) for x, b in zip(rows[e], best)]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(values: dict[str, dict[str, float]], encoders: list[str], path: str, title: str,
              size: tuple[int, int] = (720, 400)) -> None:
    """Grouped bars in [0, 1]: a group per task, a bar per encoder, the legend on the right."""
    width, height = size
    left, right, top, bottom = 48, width - 170, 30, height - 40
    image = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    draw.rectangle((left, top, right, bottom), outline="black")
    for tick in np.linspace(0, 1, 6):
        y = bottom - tick * (bottom - top)
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((left - 6, y), f"{tick:.1f}", fill="black", font=font, anchor="rm")
    tasks = list(values)
    group = (right - left) / len(tasks)
    bar = group * 0.8 / len(encoders)
    for t, task in enumerate(tasks):
        x0 = left + t * group + group * 0.1
        for e, encoder in enumerate(encoders):
            y = bottom - values[task][encoder] * (bottom - top)
            draw.rectangle((x0 + e * bar, y, x0 + (e + 1) * bar - 1, bottom), fill=COLORS[e % len(COLORS)])
        draw.text((left + (t + 0.5) * group, bottom + 6), task, fill="black", font=font, anchor="mt")
    for e, encoder in enumerate(encoders):
        y = top + 10 + 18 * e
        draw.rectangle((right + 12, y - 5, right + 32, y + 5), fill=COLORS[e % len(COLORS)])
        draw.text((right + 38, y), encoder, fill="black", font=font, anchor="lm")
    draw.text(((left + right) / 2, 4), title, fill="black", font=font, anchor="mt")
    image.save(path, format="PNG")


def save_strip(frames: np.ndarray, path: str, count: int = 8) -> None:
    """`count` evenly spaced frames [k, H, W, 3] of a rollout side by side, as a PNG."""
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    Image.fromarray(np.concatenate(list(frames[picks]), axis=1)).save(path, format="PNG")


def save_gif(frames: np.ndarray, path: str, fps: float = 20.0, every: int = 2) -> None:
    """Every `every`-th frame [k, H, W, 3] as an animated GIF at `fps`."""
    images = [Image.fromarray(f) for f in frames[::every]]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)


def write_simulated(results: dict, out: str) -> None:
    """results.json, results.md and success_rate.png of a simulated evaluation (`results`:
    success_rate[task][encoder], episodes[task][encoder], encoders, tasks, ...)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    encoders, tasks = results["encoders"], results["tasks"]
    episodes = sorted({n for task in tasks for n in results["episodes"][task].values()})
    body = table(results["success_rate"], encoders, tasks, percent=True, higher_is_better=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"Success rates (%) over {', '.join(map(str, episodes))} held-out episodes per task "
                f"({results['suite']}, {results['demos']} demonstrations each). Bold = best per column.\n\n{body}\n")
    bar_chart(results["success_rate"], encoders, os.path.join(out, "success_rate.png"), "success rate")


def write_offline(results: dict, out: str) -> None:
    """results.json and results.md of an offline evaluation (`results`: mse[dataset][encoder],
    mse_by_step[dataset][encoder], encoders, datasets)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    encoders, datasets = results["encoders"], results["datasets"]
    parts = ["Held-out action mean squared error (the data's units; lower is better). Bold = best per column.\n",
             table(results["mse"], encoders, datasets, percent=False, higher_is_better=False)]
    for dataset in datasets:
        steps = len(next(iter(results["mse_by_step"][dataset].values())))
        by_step = {f"k={k + 1}": {e: results["mse_by_step"][dataset][e][k] for e in encoders} for k in range(steps)}
        parts += [f"\n{dataset}, by chunk step k:\n", table(by_step, encoders, list(by_step), percent=False,
                                                             higher_is_better=False)]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(parts) + "\n")
