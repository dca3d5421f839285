"""Linear probes, R^2, retrieval recall and the R^2 plot, each against an independent reference:
a planted truth, a float64 numpy formula, or a brute-force loop."""
import math

import numpy as np
import pytest
from PIL import Image

from caip_jax.evaluate import plot, probes, retrieval


def planted(rng, n, d, k, noise=0.0):
    x = rng.normal(size=(n, d)) + rng.normal(size=d) * 3  # off-centre: the bias must absorb it
    w, b = rng.normal(size=(d, k)) / math.sqrt(d), rng.normal(size=k)
    return x.astype(np.float32), (x @ w + b + noise * rng.normal(size=(n, k))).astype(np.float32), w, b


def ridge64(x, y, lam):
    """float64 normal equations of (1/n) ||y - x W - b||^2 + lam ||W||^2 -> (W, b)."""
    x, y = np.float64(x), np.float64(y)
    xc, yc = x - x.mean(0), y - y.mean(0)
    w = np.linalg.solve(xc.T @ xc + len(x) * lam * np.eye(x.shape[1]), xc.T @ yc)
    return w, y.mean(0) - x.mean(0) @ w


def r2_64(y, p, w=None):
    y, p = np.float64(y), np.float64(p)
    w = np.ones_like(y) if w is None else np.broadcast_to(np.float64(w), y.shape)
    sse = sst = 0.0
    for j in range(y.shape[1]):
        valid = w[:, j] > 0
        sse += np.sum((y[valid, j] - p[valid, j]) ** 2)
        sst += np.sum((y[valid, j] - y[valid, j].mean()) ** 2) if valid.any() else 0.0
    return 1 - sse / sst


def test_ridge_recovers_planted_map():
    rng = np.random.default_rng(0)
    x, y, w, b = planted(rng, 600, 24, 5)
    probe = probes.fit_ridge(x, y)
    np.testing.assert_allclose(probe.kernel, w, atol=1e-4)
    np.testing.assert_allclose(probe.bias, b, atol=1e-4)
    x_test = (rng.normal(size=(200, 24)) + x.mean(0)).astype(np.float32)  # new rows, same map
    assert probes.r2_score(x_test @ w + b, probes.predict(probe, x_test)) > 0.9999


def test_ridge_lambda_selection_under_noise():
    rng = np.random.default_rng(1)
    x, y, _, _ = planted(rng, 120, 60, 3)
    noisy = y + 1.0 * rng.normal(size=y.shape).astype(np.float32)
    clean, regularised = probes.fit_ridge(x, y), probes.fit_ridge(x, noisy)
    assert regularised.lam > clean.lam
    for probe in (clean, regularised):
        best = int(np.argmin(probe.val_scores))
        assert probe.lam == probe.lambdas[best] and len(probe.val_scores) == len(probes.LAMBDAS)


@pytest.mark.parametrize("n,d", [(300, 20), (40, 90)])  # primal (d <= n) and dual (d > n)
def test_ridge_matches_float64_normal_equations(n, d):
    rng = np.random.default_rng(2)
    x, y, _, _ = planted(rng, n, d, 4, noise=0.5)
    probe = probes.fit_ridge(x, y, lambdas=(0.03,))
    w, b = ridge64(x, y, 0.03)
    np.testing.assert_allclose(probe.kernel, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
    np.testing.assert_allclose(probe.bias, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_ridge_validation_scores_and_masking():
    rng = np.random.default_rng(3)
    x, y, _, _ = planted(rng, 400, 30, 6, noise=0.3)
    weights = (rng.random(y.shape) > 0.3).astype(np.float32)
    y = y * weights  # as the action targets arrive: zero where masked
    corrupt = np.where(weights > 0, y, 1e6 * rng.normal(size=y.shape)).astype(np.float32)
    lambdas = (1e-4, 1e-2, 1.0)
    probe = probes.fit_ridge(x, y, lambdas, weights=weights)
    bad = probes.fit_ridge(x, corrupt, lambdas, weights=weights)
    np.testing.assert_allclose(bad.val_scores, probe.val_scores, rtol=1e-6)
    np.testing.assert_allclose(bad.kernel, probe.kernel, rtol=1e-6, atol=1e-7)
    # The reported val scores: weighted MSE on the val rows of float64 fits on the fit rows.
    fit, val = probes.split_rows(len(x), 0.2, 0)
    for lam, score in zip(lambdas, probe.val_scores):
        w, b = ridge64(x[fit], y[fit], lam)
        err = weights[val] * (y[val] - (x[val] @ w + b)) ** 2
        np.testing.assert_allclose(score, err.sum() / weights[val].sum(), rtol=1e-4)
    pred = np.asarray(probes.predict(probe, x))
    r2 = probes.r2_score(corrupt, pred, weights)
    assert r2 == pytest.approx(r2_64(y, pred, weights), abs=1e-5)
    assert r2 == pytest.approx(probes.r2_score(y, pred, weights), abs=1e-6)


def test_r2_score_against_float64():
    rng = np.random.default_rng(4)
    y = rng.normal(size=(500, 7)) * rng.uniform(0.1, 10, size=7) + 5
    p = y + rng.normal(size=y.shape)
    assert probes.r2_score(y, p) == pytest.approx(r2_64(y, p), abs=1e-5)
    weights = rng.random(y.shape) > 0.5
    assert probes.r2_score(y, p, weights) == pytest.approx(r2_64(y, p, weights), abs=1e-5)


def test_horizon_r2_prefixes():
    rng = np.random.default_rng(5)
    n, steps, dims = 64, 40, 3
    y = rng.normal(size=(n, steps, dims)).cumsum(1)
    p = y + rng.normal(size=y.shape) * np.linspace(0.1, 3, steps)[None, :, None]
    mask = (rng.random((n, steps)) > 0.2).astype(np.float32)
    out = probes.horizon_r2(y, p, mask, horizons=(8, 32, 64))
    assert set(out) == {"overall", "first_8", "first_32"}  # 64 > T is skipped
    for key, h in (("overall", steps), ("first_8", 8), ("first_32", 32)):
        m = np.repeat(mask[:, :h, None], dims, axis=2).reshape(n, -1)
        assert out[key] == pytest.approx(r2_64(y[:, :h].reshape(n, -1), p[:, :h].reshape(n, -1), m), abs=1e-5)
    assert out["first_8"] > out["overall"]  # the planted error grows with the step


def test_logistic_separable_blobs():
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(4, 6)) * 8
    labels = rng.integers(0, 4, size=800)
    x = centres[labels] + rng.normal(size=(800, 6))
    probe = probes.fit_logistic(x[:400], labels[:400], 4)
    assert probes.accuracy(labels[400:], probes.predict_logistic(probe, x[400:])) == 1.0
    assert all(a == 1.0 for a in probe.val_accuracies) and probe.l2 == max(probe.l2s)  # ties -> larger


def test_logistic_reaches_bayes_accuracy():
    rng = np.random.default_rng(7)
    mu = 0.5
    labels = rng.integers(0, 2, size=24000)
    x = rng.normal(size=(24000, 4))
    x[:, 0] += np.where(labels == 1, mu, -mu)
    probe = probes.fit_logistic(x[:4000], labels[:4000], 2)
    bayes = 0.5 * (1 + math.erf(mu / math.sqrt(2)))  # Phi(mu)
    acc = probes.accuracy(labels[4000:], probes.predict_logistic(probe, x[4000:]))
    assert abs(acc - bayes) < 0.03, (acc, bayes)


@pytest.mark.parametrize("num_classes", [3, 8])  # 3 of 8 class slots (5 absent), and all 8
def test_logistic_probes_are_the_minimisers_over_their_rows(num_classes):
    """One program fits a probe on any rows (a held-out split's fit rows, all rows) with any
    l2, for any class count up to 8 (absent classes masked): at what it returns, the float64
    gradient of its objective over its rows alone vanishes, with those rows' own mean and std."""
    import jax.numpy as jnp

    rng = np.random.default_rng(8)
    labels = rng.integers(0, num_classes, size=300)
    x = (rng.normal(size=(300, 5)) + 0.7 * rng.normal(size=(num_classes, 5))[labels]) * [1, 2, 3, 4, 5] + 10
    for chosen_rows, l2 in ((rng.random(300) < 0.6, 1e-2), (np.ones(300, bool), 1e-2), (rng.random(300) < 0.3, 1e-3)):
        kernel, bias, mean, std = (np.float64(a) for a in probes._train_logistic(
            x.astype(np.float32), labels.astype(np.int32), jnp.asarray(chosen_rows, jnp.float32), num_classes,
            jnp.float32(l2), slots=8, steps=500, learning_rate=None))
        assert not kernel[:, num_classes:].any() and not bias[num_classes:].any()
        chosen = x[chosen_rows > 0]
        np.testing.assert_allclose(mean, chosen.mean(0), rtol=1e-5)
        np.testing.assert_allclose(std, chosen.std(0), rtol=1e-4)
        z = (chosen - chosen.mean(0)) / chosen.std(0)
        logits = z @ kernel[:, :num_classes] + bias[:num_classes]
        p = np.exp(logits - logits.max(1, keepdims=True))
        error = p / p.sum(1, keepdims=True) - np.eye(num_classes)[labels[chosen_rows > 0]]
        grad_kernel = z.T @ error / len(z) + 2 * l2 * kernel[:, :num_classes]
        grad_bias = error.mean(0)
        assert max(np.abs(grad_kernel).max(), np.abs(grad_bias).max()) < 1e-4
        assert np.abs(kernel).max() > 0.1  # not a vanishing gradient of a probe that learnt nothing


def test_encode_labels_unseen_count_wrong():
    train_ids, test_ids, classes = probes.encode_labels(["b", "a", "b"], ["a", "c", "b"])
    assert classes == ["a", "b"] and list(train_ids) == [1, 0, 1] and list(test_ids) == [0, -1, 1]
    assert probes.accuracy(test_ids, [0, 0, 1]) == pytest.approx(2 / 3)


def brute_recall(q, k, ks):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    ranks = []
    for i in range(len(q)):
        own = q[i] @ k[i]
        ranks.append(1 + sum(q[i] @ k[j] >= own for j in range(len(k)) if j != i))
    return {f"recall@{m}": float(np.mean(np.array(ranks) <= m)) for m in ks}


def tied_embeddings(rng, n, d):
    """Rows with 4 entries of +-1 (times a power of two): after normalisation every entry is
    +-0.5 or 0, so all cosines are exact in float32 and duplicate rows tie exactly."""
    x = np.zeros((n, d), np.float32)
    for row in x:
        row[rng.choice(d, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return x * 2.0 ** rng.integers(0, 3, size=(n, 1))


@pytest.mark.parametrize("kind", ["ties", "gaussian"])
def test_recall_against_brute_force(kind):
    rng = np.random.default_rng(8)
    n, ks = 150, (1, 5, 10)
    if kind == "ties":
        keys = tied_embeddings(rng, n, 6)  # 6 dims: many keys repeat
        queries = np.where(rng.random((n, 1)) < 0.5, keys, tied_embeddings(rng, n, 6))
    else:
        keys = rng.normal(size=(n, 16)).astype(np.float32)
        queries = (keys + rng.normal(size=keys.shape) * 1.5).astype(np.float32)
    expected = brute_recall(np.float64(queries), np.float64(keys), ks)
    assert 0 < expected["recall@1"] < expected["recall@10"] < 1  # a test that can fail
    assert retrieval.recall_at_k(queries, keys, ks) == pytest.approx(expected, abs=1e-9)
    assert retrieval.recall_at_k(queries, keys, ks, block_size=32) == pytest.approx(expected, abs=1e-9)
    report = retrieval.retrieval_report(queries, keys, ks, block_size=64)
    backward = brute_recall(np.float64(keys), np.float64(queries), ks)
    for m in expected:
        assert report[f"image_text_to_action/{m}"] == pytest.approx(expected[m], abs=1e-9)
        assert report[f"action_to_image_text/{m}"] == pytest.approx(backward[m], abs=1e-9)


def test_plot_r2_by_horizon(tmp_path):
    rows = {"trained": {8: 0.9, 32: 0.7, 64: 0.5}, "random init": {8: 0.2, 32: -0.1, 64: -0.3},
            "siglip2 init": {8: 0.6, 32: 0.4, 64: 0.2}}
    path = str(tmp_path / "r2.png")
    plot.plot_r2_by_horizon(rows, path, "R^2 by horizon", size=(500, 320))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (500, 320)
        colors = {c for _, c in image.convert("RGB").getcolors(500 * 320)}
    for i in range(len(rows)):
        assert plot.COLORS[i] in colors
