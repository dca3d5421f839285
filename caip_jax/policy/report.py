"""What caip-policy-eval writes: results.json, results.md (the paper's table: encoders x tasks
with a pooled column, the best of each column in bold, each cell successes/episodes with its
Wilson 95% interval, and Fisher's exact test of each encoder against the best other one), a bar
chart with the intervals, and rollout strips and GIFs to look at. Drawn with PIL only; every
file goes through caip_jax.storage (local or object storage)."""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from caip_jax import storage
from caip_jax.evaluate.plot import COLORS
from caip_jax.policy import statistics


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
              size: tuple[int, int] = (720, 400), intervals: dict[str, dict[str, tuple]] | None = None) -> None:
    """Grouped bars in [0, 1]: a group per column (task), a bar per encoder, the legend on the
    right; `intervals[column][encoder]` = (low, high) drawn as a whisker over its bar. A
    missing value leaves its bar out."""
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
            if values[task].get(encoder) is None:
                continue
            y = bottom - values[task][encoder] * (bottom - top)
            draw.rectangle((x0 + e * bar, y, x0 + (e + 1) * bar - 1, bottom), fill=COLORS[e % len(COLORS)])
            if intervals and intervals[task].get(encoder) is not None:
                low, high = (bottom - v * (bottom - top) for v in intervals[task][encoder])
                middle, cap = x0 + (e + 0.5) * bar, max(2.0, bar / 4)
                draw.line((middle, low, middle, high), fill="black", width=1)
                draw.line((middle - cap, low, middle + cap, low), fill="black", width=1)
                draw.line((middle - cap, high, middle + cap, high), fill="black", width=1)
        draw.text((left + (t + 0.5) * group, bottom + 6), task, fill="black", font=font, anchor="mt")
    for e, encoder in enumerate(encoders):
        y = top + 10 + 18 * e
        draw.rectangle((right + 12, y - 5, right + 32, y + 5), fill=COLORS[e % len(COLORS)])
        draw.text((right + 38, y), encoder, fill="black", font=font, anchor="lm")
    draw.text(((left + right) / 2, 4), title, fill="black", font=font, anchor="mt")
    storage.write_encoded(path, lambda f: image.save(f, format="PNG"))


def save_strip(frames: np.ndarray, path: str, count: int = 8) -> None:
    """`count` evenly spaced frames [k, H, W, 3] of a rollout side by side, as a PNG."""
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    strip = Image.fromarray(np.concatenate(list(frames[picks]), axis=1))
    storage.write_encoded(path, lambda f: strip.save(f, format="PNG"))


def save_gif(frames: np.ndarray, path: str, fps: float = 20.0, every: int = 2) -> None:
    """Every `every`-th frame [k, H, W, 3] as an animated GIF at `fps`."""
    images = [Image.fromarray(f) for f in frames[::every]]
    storage.write_encoded(path, lambda f: images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                                                         duration=int(1000 / fps), loop=0))


def simulated_statistics(successes: dict[str, dict[str, int]], episodes: dict[str, dict[str, int]],
                         encoders: list[str], tasks: list[str], controls: dict[str, str]) -> dict:
    """Per task and encoder the rate and its Wilson 95% interval, and Fisher's test against the
    best other encoder; the same pooled over the tasks that are not controls (all of them if
    every task is one), for the encoders that finished all of those. Missing runs are left out."""
    done = lambda task: [e for e in encoders if e in successes[task]]
    rate = {t: {e: successes[t][e] / episodes[t][e] if episodes[t][e] else 0.0 for e in done(t)} for t in tasks}
    interval = {t: {e: statistics.wilson(successes[t][e], episodes[t][e]) for e in done(t)} for t in tasks}
    fisher = {t: statistics.against_best_other({e: successes[t][e] for e in done(t)},
                                               {e: episodes[t][e] for e in done(t)}) for t in tasks}
    pooled_tasks = [t for t in tasks if t not in controls] or list(tasks)
    finished = [e for e in encoders if all(e in successes[t] for t in pooled_tasks)]
    pooled = {}
    for e in finished:
        k, n = sum(successes[t][e] for t in pooled_tasks), sum(episodes[t][e] for t in pooled_tasks)
        pooled[e] = dict(successes=k, episodes=n, rate=k / n if n else 0.0, wilson95=list(statistics.wilson(k, n)))
    pooled_fisher = statistics.against_best_other({e: pooled[e]["successes"] for e in finished},
                                                  {e: pooled[e]["episodes"] for e in finished})
    return dict(success_rate=rate, wilson95={t: {e: list(v) for e, v in interval[t].items()} for t in tasks},
                fisher=fisher, pooled=pooled, pooled_tasks=pooled_tasks, pooled_fisher=pooled_fisher)


def _cell(k: int, n: int, low: float, high: float) -> str:
    return f"{k}/{n} {100 * k / n if n else 0:.0f} [{100 * low:.0f}, {100 * high:.0f}]"


def simulated_markdown(results: dict) -> str:
    """results.md of a simulated evaluation: the success table and the Fisher table."""
    encoders, tasks, controls = results["encoders"], results["tasks"], results.get("controls", {})
    pooled, pooled_tasks = results["pooled"], results["pooled_tasks"]
    header = [f"{t} (control)" if t in controls else t for t in tasks] + ["Pooled"]
    columns = [(t, {e: (results["successes"][t][e], results["episodes"][t][e], *results["wilson95"][t][e])
                    for e in results["successes"][t]}) for t in tasks]
    columns.append(("Pooled", {e: (p["successes"], p["episodes"], *p["wilson95"]) for e, p in pooled.items()}))
    best = [max((k / n for k, n, _, _ in cells.values() if n), default=None) for _, cells in columns]
    lines = ["| encoder | " + " | ".join(header) + " |", "|---" + "|---:" * len(header) + "|"]
    for e in encoders:
        row = []
        for (_, cells), top in zip(columns, best):
            if e not in cells:
                row.append("–")
                continue
            k, n, low, high = cells[e]
            text = _cell(k, n, low, high)
            row.append(f"**{text}**" if n and np.isclose(k / n, top) else text)
        lines.append(f"| {e} | " + " | ".join(row) + " |")
    fisher_columns = [results["fisher"][t] for t in tasks] + [results["pooled_fisher"]]
    fisher_lines = ["| encoder | " + " | ".join(header) + " |", "|---" + "|---:" * len(header) + "|"]
    for e in encoders:
        cells = [f"{c[e]['p']:.2g} vs {c[e]['against']}" if e in c else "–" for c in fisher_columns]
        fisher_lines.append(f"| {e} | " + " | ".join(cells) + " |")
    counts = sorted({n for t in tasks for n in results["episodes"][t].values()})
    text = [f"Success over {', '.join(map(str, counts)) or 'no'} held-out episodes per task ({results['suite']}, "
            f"{results['demos']} demonstrations each): successes/episodes, the rate in % and its Wilson 95% interval. "
            "Bold = best per column."]
    if controls:
        left_out = not set(controls) & set(pooled_tasks)
        text.append(("Controls, left out of the pooled column: " if left_out else "Controls (every task is one, so all "
                     "are pooled): ") + "; ".join(f"{t}: {why}" for t, why in controls.items()) + ".")
    text.append(f"Pooled: the successes over all episodes of {', '.join(pooled_tasks)}.")
    text += ["", "\n".join(lines), "",
             "Two-sided Fisher exact test of each encoder against the best other encoder of the column "
             "(p, and which encoder):", "", "\n".join(fisher_lines)]
    if results.get("missing"):
        text += ["", "Not run (yet): " + "; ".join(results["missing"]) + "."]
    return "\n".join(text) + "\n"


def write_simulated(results: dict, out: str) -> None:
    """results.json, results.md and success_rate.png of a simulated evaluation into `out`
    (local or object storage). `results`: successes[task][encoder], episodes[task][encoder],
    encoders, tasks, controls, suite, demos and what `simulated_statistics` adds."""
    storage.write_json(storage.join(out, "results.json"), results)
    storage.write_text(storage.join(out, "results.md"), simulated_markdown(results))
    tasks = results["tasks"]
    values = {t: dict(results["success_rate"][t]) for t in tasks}
    intervals = {t: {e: tuple(v) for e, v in results["wilson95"][t].items()} for t in tasks}
    if results["pooled"]:
        values["pooled"] = {e: p["rate"] for e, p in results["pooled"].items()}
        intervals["pooled"] = {e: tuple(p["wilson95"]) for e, p in results["pooled"].items()}
    bar_chart(values, results["encoders"], storage.join(out, "success_rate.png"),
              "success rate (whiskers: Wilson 95% intervals)", size=(180 + 130 * len(values), 400), intervals=intervals)


def write_offline(results: dict, out: str) -> None:
    """results.json and results.md of an offline evaluation (`results`: mse[dataset][encoder],
    mse_by_step[dataset][encoder], encoders, datasets)."""
    storage.write_json(storage.join(out, "results.json"), results)
    encoders, datasets = results["encoders"], results["datasets"]
    parts = ["Held-out action mean squared error (the data's units; lower is better). Bold = best per column.\n",
             table(results["mse"], encoders, datasets, percent=False, higher_is_better=False)]
    for dataset in datasets:
        steps = len(next(iter(results["mse_by_step"][dataset].values())))
        by_step = {f"k={k + 1}": {e: results["mse_by_step"][dataset][e][k] for e in encoders} for k in range(steps)}
        parts += [f"\n{dataset}, by chunk step k:\n", table(by_step, encoders, list(by_step), percent=False,
                                                             higher_is_better=False)]
    storage.write_text(storage.join(out, "results.md"), "\n".join(parts) + "\n")
