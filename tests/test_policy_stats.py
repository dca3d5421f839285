"""The report's statistics against references nobody here wrote: scipy's Fisher exact test
against a brute-force sum over hypergeometric tables, the Wilson interval against the roots of
its defining quadratic; the table and the plot show them."""
import math

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from caip_jax.policy import report, statistics


def brute_force_fisher(a: int, n1: int, b: int, n2: int) -> float:
    """Two-sided Fisher: the probability, under fixed margins, of every table no more likely
    than the one seen (math.comb, every table enumerated)."""
    successes, total = a + b, n1 + n2
    probability = lambda x: math.comb(n1, x) * math.comb(n2, successes - x) / math.comb(total, successes)
    seen = probability(a)
    tables = range(max(0, successes - n2), min(n1, successes) + 1)
    return min(1.0, sum(probability(x) for x in tables if probability(x) <= seen * (1 + 1e-7)))


@pytest.mark.parametrize("a,n1,b,n2", [(10, 20, 8, 20), (45, 50, 12, 50), (0, 50, 0, 50), (50, 50, 3, 50),
                                       (7, 9, 1, 13), (3, 50, 25, 50), (1, 1, 0, 1)])
def test_fisher_is_the_brute_force_hypergeometric_sum(a, n1, b, n2):
    np.testing.assert_allclose(statistics.fisher(a, n1, b, n2), brute_force_fisher(a, n1, b, n2), rtol=1e-9)
    np.testing.assert_allclose(statistics.fisher(a, n1, b, n2), statistics.fisher(b, n2, a, n1), rtol=1e-12)


def test_the_readmes_old_comparison_is_not_significant():
    """The README's CAIP 10/20 against random 8/20 (issue 23): p = 0.75."""
    assert statistics.fisher(10, 20, 8, 20) == pytest.approx(0.7512, abs=1e-4)


@pytest.mark.parametrize("k,n", [(0, 20), (1, 20), (10, 20), (19, 20), (20, 20), (45, 50), (3, 7), (1, 1)])
def test_wilson_interval_solves_its_quadratic(k, n):
    """The Wilson interval is the set of p with |k/n - p| <= z sqrt(p (1 - p) / n): its ends are
    the roots of (k/n - p)^2 n = z^2 p (1 - p), found here by numpy's polynomial roots, with z
    from scipy's normal quantile."""
    z = scipy.stats.norm.ppf(0.975)
    phat = k / n
    # n (phat - p)^2 - z^2 p (1 - p) = (n + z^2) p^2 - (2 n phat + z^2) p + n phat^2
    roots = np.sort(np.roots([n + z * z, -(2 * n * phat + z * z), n * phat * phat]).real)
    low, high = statistics.wilson(k, n)
    np.testing.assert_allclose([low, high], np.clip(roots, 0, 1), atol=1e-12)
    assert low <= phat <= high
    assert statistics.wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="21 successes in 20 episodes"):
        statistics.wilson(21, 20)


def test_the_issues_intervals_overlap_at_20_and_separate_at_50():
    """0.9 against 0.5: Wilson intervals touch at 20 episodes each (issue 23), not at 50."""
    assert statistics.wilson(18, 20)[0] < statistics.wilson(10, 20)[1] + 0.05
    assert statistics.wilson(45, 50)[0] > statistics.wilson(25, 50)[1]


def test_each_encoder_is_tested_against_the_best_other_one():
    successes, episodes = dict(state=48, blind=5, caip=30), dict(state=50, blind=50, caip=50)
    tests = statistics.against_best_other(successes, episodes)
    assert {e: t["against"] for e, t in tests.items()} == dict(state="caip", blind="state", caip="state")
    assert tests["caip"]["p"] == pytest.approx(scipy.stats.fisher_exact([[30, 20], [48, 2]]).pvalue)
    assert statistics.against_best_other(dict(a=1), dict(a=2)) == {}


def results(tasks=("sweep-v3", "button-press-v3")):
    successes = {"sweep-v3": dict(state=45, blind=3, caip=20), "button-press-v3": dict(state=50, blind=31)}
    episodes = {"sweep-v3": dict(state=50, blind=50, caip=50), "button-press-v3": dict(state=50, blind=50)}
    controls = {"button-press-v3": "solvable blind"}
    out = dict(suite="metaworld", demos=50, tasks=list(tasks), controls=controls, encoders=["state", "blind", "caip"],
               successes=successes, episodes=episodes, missing=["caip on button-press-v3"])
    out.update(report.simulated_statistics(successes, episodes, out["encoders"], list(tasks), controls))
    return out


def test_the_table_shows_counts_intervals_pooled_and_fisher(tmp_path):
    r = results()
    assert r["pooled_tasks"] == ["sweep-v3"]  # the control is left out
    assert r["pooled"]["caip"] == dict(successes=20, episodes=50, rate=0.4, wilson95=list(statistics.wilson(20, 50)))
    text = report.simulated_markdown(r)
    low, high = statistics.wilson(45, 50)
    assert "| encoder | sweep-v3 | button-press-v3 (control) | Pooled |" in text
    assert f"| state | **45/50 90 [{100 * low:.0f}, {100 * high:.0f}]** | **50/50 100 [93, 100]** | **45/50 90" in text
    assert "| caip | 20/50 40 [" in text and "| – |" in text  # caip did not run on the control
    p = scipy.stats.fisher_exact([[20, 30], [45, 5]]).pvalue
    assert f"| caip | {p:.2g} vs state | – | {p:.2g} vs state |" in text
    assert "Not run (yet): caip on button-press-v3." in text and "button-press-v3: solvable blind" in text


def test_the_plot_draws_each_interval(tmp_path):
    """A whisker spans each bar's interval: black pixels at the bar's centre from the upper
    end to the lower end of the interval, none far above it."""
    path = str(tmp_path / "plot.png")
    values = {"task": {"a": 0.5, "b": 0.9}}
    intervals = {"task": {"a": (0.3, 0.7), "b": (0.7, 0.97)}}
    report.bar_chart(values, ["a", "b"], path, "t", size=(400, 300), intervals=intervals)
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    left, right, top, bottom = 48, 400 - 170, 30, 300 - 40
    group = right - left
    bar = group * 0.8 / 2
    for e, name in enumerate(["a", "b"]):
        x = int(left + group * 0.1 + (e + 0.5) * bar)
        column = (image[:, x - 1:x + 2].sum(axis=2) == 0).any(axis=1)  # a black pixel near the centre line
        low, high = (bottom - v * (bottom - top) for v in intervals["task"][name])
        inside = np.arange(int(np.ceil(high)) + 1, int(low))
        assert column[inside].all(), name
        assert not column[top + 2:int(high) - 3].any(), name  # above the whisker: nothing black
