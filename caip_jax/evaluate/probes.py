"""Linear probes on frozen features: closed-form ridge regression (regulariser chosen on a
held-out split), pooled R^2 (also per horizon prefix), and an L-BFGS logistic-regression probe.

Fits in float32 (R^2 is scored in float64). Matmuls ask for full float32 precision: by default GPUs use TF32 and TPUs bf16
passes for float32 matmuls, which costs ridge its ~1e-4 recovery of a planted map.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

_mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)

LAMBDAS = tuple(10.0**p for p in range(-6, 4))  # 1e-6 ... 1e3
L2S = tuple(10.0**p for p in range(-6, 0))  # 1e-6 ... 1e-1


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of range(n) cut into (fit rows, val rows); val gets
    round(val_fraction * n) rows."""
    n_val = int(round(val_fraction * n))
    if not 1 <= n_val <= n - 2:
        raise ValueError(f"val_fraction={val_fraction} of n={n} rows leaves {n_val} val rows; "
                         "need 1 <= val rows <= n - 2: use more rows or another val_fraction")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_val:], perm[:n_val]


# ---------------------------------------------------------------------------------- ridge


@dataclasses.dataclass(frozen=True)
class Ridge:
    """predict(x) = x @ kernel [d, k] + bias [k]; lam was picked from lambdas by val_scores
    (the held-out weighted MSE of each lambda, fitted on the fit rows only)."""
    kernel: jax.Array
    bias: jax.Array
    lam: float
    lambdas: tuple[float, ...]
    val_scores: tuple[float, ...]


@jax.jit
def _spectrum(x, y):
    """Centres x [n, d], y [n, k] and diagonalises the ridge problem once for all lambdas:
    kernel(lam) = q @ (b / (s + n lam)[:, None]) with s [r], q [d, r], b [r, k]; also the means.
    Primal (eigh of the d x d Gram xc^T xc) when d <= n, else dual (eigh of the n x n xc xc^T)."""
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    if x.shape[1] <= x.shape[0]:
        s, v = jnp.linalg.eigh(_mm(xc.T, xc))
        q, b = v, _mm(v.T, _mm(xc.T, yc))
    else:
        s, u = jnp.linalg.eigh(_mm(xc, xc.T))
        q, b = _mm(xc.T, u), _mm(u.T, yc)
    # Round-off leaves null directions slightly negative; s + n lam must stay positive.
    return jnp.maximum(s, 0.0), q, b, x_mean, y_mean


@jax.jit
def _val_scores(x_fit, y_fit, x_val, y_val, w_val, lambdas):
    """Weighted val MSE [L] of the ridge fitted on (x_fit, y_fit) at each of lambdas [L]."""
    s, q, b, x_mean, y_mean = _spectrum(x_fit, y_fit)
    p = _mm(x_val - x_mean, q)  # [n_val, r]: one projection serves every lambda

    def score(lam):
        pred = _mm(p, b / (s + x_fit.shape[0] * lam)[:, None]) + y_mean
        return jnp.sum(w_val * (y_val - pred) ** 2) / jnp.sum(w_val)

    return jax.lax.map(score, lambdas)


@jax.jit
def _solve(x, y, lam):
    s, q, b, x_mean, y_mean = _spectrum(x, y)
    kernel = _mm(q, b / (s + x.shape[0] * lam)[:, None])
    return kernel, y_mean - _mm(x_mean, kernel)


def fit_ridge(x, y, lambdas=LAMBDAS, val_fraction: float = 0.2, seed: int = 0,
              weights=None) -> Ridge:
    """Ridge regression x [n, d] -> y [n, k]: minimises (1/n) sum_i ||y_i - x_i W - b||^2 +
    lam ||W||^2 (features centred, bias unpenalised; lam is per row, so one grid fits any n).

    lam is chosen from `lambdas` by MSE on a held-out split (`split_rows(n, val_fraction, seed)`;
    the smallest MSE wins, ties go to the larger lam), then the probe is refitted on all n rows.
    weights [n, k] in {0, 1} marks valid targets: masked entries count in neither the val MSE
    nor (via r2_score) R^2, but the fit itself treats masked targets as 0 (one Gram matrix for
    all targets instead of one per mask pattern).
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"need x [n, d] and y [n, k]; got {x.shape} and {y.shape}: reshape y "
                         "to [n, -1]")
    w = np.ones_like(y) if weights is None else np.broadcast_to(np.asarray(weights, np.float32), y.shape)
    y = np.where(w > 0, y, 0.0).astype(np.float32)
    lambdas = tuple(float(lam) for lam in lambdas)
    fit, val = split_rows(len(x), val_fraction, seed)
    scores = np.asarray(_val_scores(x[fit], y[fit], x[val], y[val], w[val],
                                    jnp.asarray(lambdas, jnp.float32)))
    scores = np.where(np.isnan(scores), np.inf, scores)
    best = min(range(len(lambdas)), key=lambda i: (scores[i], -lambdas[i]))
    kernel, bias = _solve(x, y, jnp.float32(lambdas[best]))
    return Ridge(kernel, bias, lambdas[best], lambdas, tuple(float(s) for s in scores))


def predict(probe: Ridge, x) -> jax.Array:
    """x [n, d] -> [n, k]."""
    return _mm(jnp.asarray(x, jnp.float32), probe.kernel) + probe.bias


# ---------------------------------------------------------------------------------- R^2


def r2_score(y_true, y_pred, weights=None) -> float:
    """Pooled R^2 of y_pred [n, k] against y_true [n, k] over the valid entries (weights [n, k]
    in {0, 1}, default all valid): 1 - SSE / SST, where SSE sums the squared errors over all
    columns and SST the squared deviations of y_true from its per-column mean of valid values,
    over all columns (sklearn's multioutput="variance_weighted"). nan when SST is 0. In float64
    with numpy: a score, not a step of a program (and no compile per shape)."""
    y_true = np.asarray(y_true, np.float64)
    y_pred = np.asarray(y_pred, np.float64)
    w = np.ones_like(y_true) if weights is None else np.broadcast_to(np.asarray(weights, np.float64), y_true.shape)
    # Zero masked entries before squaring: a huge masked value times 0 weight is still inf * 0.
    valid = w > 0
    y_true, y_pred = np.where(valid, y_true, 0.0), np.where(valid, y_pred, 0.0)
    mean = np.sum(w * y_true, 0) / np.maximum(np.sum(w, 0), 1.0)
    sse = np.sum(w * (y_true - y_pred) ** 2)
    sst = np.sum(w * (y_true - mean) ** 2)
    return float(1.0 - sse / sst) if sst > 0 else float("nan")


def horizon_r2(y_true, y_pred, mask=None, horizons=(8, 32, 64)) -> dict[str, float]:
    """R^2 of trajectories y [n, T, ...]: "overall", and f"first_{h}" over steps [0, h) for each
    h <= T. Each is r2_score on the prefix flattened to [n, h * ...], so SST is taken around the
    per-(step, dimension) mean, the baseline a probe's bias can reach. mask [n, T, ...] (1 =
    valid) is broadcast to y after appending missing trailing axes ([n, T] masks whole steps).
    A prefix's sums are those of its steps: one pass gives them all (float64)."""
    y_true = np.asarray(y_true, np.float64)
    y_pred = np.asarray(y_pred, np.float64).reshape(y_true.shape)
    if y_true.ndim < 2:
        raise ValueError(f"need y [n, T, ...]; got shape {y_true.shape}")
    w = np.ones_like(y_true) if mask is None else np.asarray(mask, np.float64)
    w = np.broadcast_to(w.reshape(w.shape + (1,) * (y_true.ndim - w.ndim)), y_true.shape)
    valid = w > 0  # masked entries zeroed before squaring, as in r2_score
    y_true, y_pred = np.where(valid, y_true, 0.0), np.where(valid, y_pred, 0.0)
    mean = np.sum(w * y_true, 0) / np.maximum(np.sum(w, 0), 1.0)  # [T, ...]
    per_step = (0, *range(2, y_true.ndim))
    sse = np.cumsum(np.sum(w * (y_true - y_pred) ** 2, per_step))  # [T]: over steps [0, h)
    sst = np.cumsum(np.sum(w * (y_true - mean) ** 2, per_step))

    def prefix(h):
        return float(1.0 - sse[h - 1] / sst[h - 1]) if sst[h - 1] > 0 else float("nan")

    out = {"overall": prefix(y_true.shape[1])}
    out.update({f"first_{h}": prefix(h) for h in horizons if h <= y_true.shape[1]})
    return out


# ---------------------------------------------------------------------------------- logistic


@dataclasses.dataclass(frozen=True)
class Logistic:
    """Softmax probe on standardised features: logits = ((x - mean) / std) @ kernel [d, C] +
    bias [C]; l2 was picked from l2s by val_accuracies."""
    kernel: jax.Array
    bias: jax.Array
    mean: jax.Array
    std: jax.Array
    l2: float
    l2s: tuple[float, ...]
    val_accuracies: tuple[float, ...]


def _standardise(x, w):
    """Mean and std [d] of x [n, d] over the rows weighted by w [n] (summing to 1)."""
    mean = _mm(w, x)
    std = jnp.sqrt(_mm(w, (x - mean) ** 2))
    return mean, jnp.maximum(std, 1e-6)  # constant features would divide by 0


def _class_slots(num_classes: int) -> int:
    """Classes a probe is compiled for: a power of two, at least 8, so that the labels of a
    dataset (2, 4, 12 classes ...) share one or two programs instead of one each."""
    return max(8, 1 << (num_classes - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("slots", "steps", "learning_rate"))
def _train_logistic(x, labels, rows, num_classes, l2, slots, steps, learning_rate):
    """Full-batch L-BFGS on the mean softmax cross-entropy over the rows where rows [n] is 1
    (a held-out split's fit rows, or all: one program for both), + l2 ||W||^2 -> (kernel
    [d, slots], bias [slots], mean [d], std [d]). Classes num_classes.. of the `slots` have
    logits -inf: probability 0, gradient 0, so their parameters stay 0 and the others are those
    of a num_classes probe. The objective is strongly convex, so L-BFGS with a line search
    converges in tens of steps (`steps` at most); it stops once the gradient vanishes (further
    curvature pairs would be 0 / 0) or a step leaves the finite numbers, keeping the parameters
    it had. (Fitting a grid at once under vmap is slower on a CPU: every lane runs the longest
    line search.)"""
    w = rows / jnp.sum(rows)
    mean, std = _standardise(x, w)
    z = (x - mean) / std
    absent = jnp.where(jnp.arange(slots) < num_classes, 0.0, -jnp.inf)

    def loss(params):
        kernel, bias = params
        logits = _mm(z, kernel) + bias + absent
        ce = jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        return ce + l2 * jnp.sum(kernel**2)

    opt = optax.lbfgs(learning_rate=learning_rate)
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        i, params, state, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, new_state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
        new_params = optax.apply_updates(params, updates)
        done = (optax.tree.norm(grad) < 1e-6) | ~jnp.isfinite(optax.tree.norm(new_params))
        params, state = jax.tree.map(lambda old, new: jnp.where(done, old, new), (params, state), (new_params, new_state))
        return i + 1, params, state, done

    params = (jnp.zeros((x.shape[1], slots)), jnp.zeros(slots))
    _, params, _, _ = jax.lax.while_loop(lambda carry: (carry[0] < steps) & ~carry[3], step,
                                         (0, params, opt.init(params), False))
    return (*params, mean, std)


@jax.jit
def _predicted_classes(kernel, bias, mean, std, x):
    """x [n, d] -> the class [n] of the largest logit."""
    return jnp.argmax(_mm((x - mean) / std, kernel) + bias, -1)


def fit_logistic(x, labels, num_classes: int, l2=L2S, val_fraction: float = 0.2,
                 steps: int = 500, learning_rate: float | None = None, seed: int = 0) -> Logistic:
    """Softmax regression x [n, d] -> labels [n] int in [0, num_classes). l2 is chosen from the
    grid by accuracy on a held-out split (`split_rows`; ties go to the larger l2), then the probe
    is refitted on all rows. learning_rate None lets L-BFGS's zoom line search pick each step."""
    x = np.asarray(x, np.float32)
    labels = np.asarray(labels, np.int32)
    if labels.shape != (len(x),) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"need labels [n={len(x)}] in [0, {num_classes}); got shape "
                         f"{labels.shape}, range [{labels.min()}, {labels.max()}]: drop unseen "
                         "(-1) rows from training or raise num_classes")
    l2 = tuple(float(v) for v in l2)
    fit, val = split_rows(len(x), val_fraction, seed)
    fit_rows = np.zeros(len(x), np.float32)
    fit_rows[fit] = 1.0

    def train(rows, v):
        kernel, bias, mean, std = _train_logistic(x, labels, rows, num_classes, jnp.float32(v), slots=_class_slots(num_classes),
                                                  steps=steps, learning_rate=learning_rate)
        return kernel[:, :num_classes], bias[:num_classes], mean, std

    accs = [accuracy(labels[val], np.asarray(_predicted_classes(*train(fit_rows, v), x[val]))) for v in l2]
    best = max(range(len(l2)), key=lambda i: (accs[i], l2[i]))
    return Logistic(*train(np.ones(len(x), np.float32), l2[best]), l2[best], l2, tuple(accs))


def predict_logistic(probe: Logistic, x) -> jax.Array:
    """x [n, d] -> predicted class ids [n]."""
    return _predicted_classes(probe.kernel, probe.bias, probe.mean, probe.std, jnp.asarray(x, jnp.float32))


def accuracy(labels, predicted) -> float:
    """Fraction of labels [n] equal to predicted [n] (a label of -1 never matches)."""
    return float(np.mean(np.asarray(labels) == np.asarray(predicted)))


def encode_labels(train: list[str], test: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Label strings -> (train ids [n_train], test ids [n_test], classes): classes are the sorted
    distinct train labels, ids index them; a test label never seen in train gets -1, which no
    prediction matches, so it counts as wrong in `accuracy`."""
    classes = sorted(set(train))
    index = {c: i for i, c in enumerate(classes)}
    return (np.array([index[c] for c in train], np.int32),
            np.array([index.get(c, -1) for c in test], np.int32), classes)
