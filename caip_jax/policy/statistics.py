"""How sure a success rate is: Wilson score intervals, and Fisher's exact test between two
encoders' successes (episodes are independent Bernoulli trials).

With 20-50 episodes a rate is uncertain by +-10-20 points: a table of bare percentages says
more than it knows. The Wilson interval keeps its coverage near 95% down to a handful of
episodes and at rates of 0 or 1, where the normal approximation gives intervals of width 0.
"""
import math

import scipy.stats

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson(successes: int, episodes: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a rate of `successes` in `episodes`:
    (centre -+ half) with centre = (p + z^2 / 2n) / (1 + z^2 / n) and
    half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2). No episodes: (0, 1)."""
    if not 0 <= successes <= episodes:
        raise ValueError(f"{successes} successes in {episodes} episodes")
    if episodes == 0:
        return 0.0, 1.0
    n, p = episodes, successes / episodes
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def fisher(successes_a: int, episodes_a: int, successes_b: int, episodes_b: int) -> float:
    """The two-sided p-value of Fisher's exact test that two encoders succeed equally often
    (scipy.stats.fisher_exact on the 2x2 table of successes and failures)."""
    table = [[successes_a, episodes_a - successes_a], [successes_b, episodes_b - successes_b]]
    return float(scipy.stats.fisher_exact(table, alternative="two-sided").pvalue)


def against_best_other(successes: dict[str, int], episodes: dict[str, int]) -> dict[str, dict]:
    """Per encoder, Fisher's test against the best of the other encoders (highest success rate;
    the first listed on a tie): {encoder: {"against": other, "p": p}}. One encoder: nothing."""
    rate = {e: successes[e] / episodes[e] if episodes[e] else 0.0 for e in successes}
    out = {}
    for encoder in successes:
        others = [e for e in successes if e != encoder]
        if not others:
            continue
        best = max(others, key=lambda e: rate[e])  # max keeps the first of equal rates
        out[encoder] = dict(against=best, p=fisher(successes[encoder], episodes[encoder], successes[best], episodes[best]))
    return out
