"""The flow-matching head learns a multimodal action distribution that a mean-squared-error head
averages away; the flow path and sampler are the paper formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caip_jax.policy import config as policy_config
from caip_jax.policy import flow, train
from caip_jax.policy.dataset import TrainingSet

MODES = np.array([[1.0, 1.0], [-1.0, -1.0]])
WEIGHT = 0.7  # of MODES[0]
SPREAD = 0.05


def bimodal(n: int, seed: int) -> TrainingSet:
    """n one-step chunks [n, 1, 2] from the two modes (70 / 30), nothing to condition on."""
    rng = np.random.default_rng(seed)
    which = (rng.random(n) >= WEIGHT).astype(int)
    actions = MODES[which] + SPREAD * rng.standard_normal((n, 2))
    return TrainingSet.build([np.zeros((n, 1, 1))], [np.zeros((n, 1))], [actions], ["move"], horizon=1)


def fitted(head: str, workdir: str) -> train.TrainedPolicy:
    config = policy_config.policy_config("tiny")
    config.model.head = head
    config.horizon, config.execute = 1, 1
    config.total_steps, config.batch_size = 800, 128
    # Two devices: the batch is split and the gradients reduced over the mesh, as on a pod.
    return train.train(config, bimodal(4000, seed=0), workdir, devices=jax.devices()[:2])


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, np.ndarray]:
    n = 2000
    out = {}
    for head in ("flow", "mse"):
        policy = fitted(head, str(tmp_path_factory.mktemp(head)))
        out[head] = policy.act(np.zeros((n, 1, 1)), np.zeros((n, 1)), np.zeros(n, np.int32), train.key(1))[:, 0]
    return out


def test_flow_samples_land_in_both_modes_in_proportion(samples):
    x = samples["flow"]
    distance = np.linalg.norm(x[:, None] - MODES[None], axis=-1)  # [n, 2]
    nearest = distance.argmin(axis=1)
    assert np.mean(distance.min(axis=1) < 0.3) > 0.95  # on a mode, not between them
    # 70% +- 5 standard errors of a 2000-sample binomial (0.051), well inside the model's error.
    share = np.mean(nearest == 0)
    assert abs(share - WEIGHT) < 5 * np.sqrt(WEIGHT * (1 - WEIGHT) / len(x)), share


def test_mse_head_collapses_between_the_modes(samples):
    x = samples["mse"]
    mean = WEIGHT * MODES[0] + (1 - WEIGHT) * MODES[1]  # what the squared error is minimised by
    np.testing.assert_allclose(x.mean(axis=0), mean, atol=0.1)
    assert np.linalg.norm(x[:, None] - MODES[None], axis=-1).min() > 0.5  # no sample on a mode


def test_path_and_euler_sampler_are_the_formulas():
    rng = np.random.default_rng(0)
    noise, chunk = rng.standard_normal((2, 3, 4, 2))
    t = np.array([0.0, 0.25, 1.0])
    x_t, velocity = flow.noisy_chunk(noise, chunk, t)
    for i in range(3):
        np.testing.assert_allclose(x_t[i], (1 - t[i]) * noise[i] + t[i] * chunk[i], rtol=1e-6)
        np.testing.assert_allclose(velocity[i], chunk[i] - noise[i], rtol=1e-6)
    # The true velocity of the straight path carries any noise to its target in one Euler step
    # or ten; dx/dt = -x from x0 after k steps is x0 (1 - 1/k)^k (brute-force loop).
    target = jnp.asarray(chunk)
    np.testing.assert_allclose(flow.sample(lambda x, t: target - jnp.asarray(noise), jnp.asarray(noise), 10), chunk, rtol=1e-5)
    x = noise.copy()
    for _ in range(7):
        x = x + (1 / 7) * -x
    np.testing.assert_allclose(flow.sample(lambda x, t: -x, jnp.asarray(noise), 7), x, rtol=1e-5)


def test_masked_mse_ignores_padding():
    prediction, target = np.zeros((2, 3, 2)), np.ones((2, 3, 2))
    target[0, 2] = 100.0  # padded step: must not count
    mask = np.array([[True, True, False], [True, True, True]])
    assert float(flow.masked_mse(prediction, target, mask)) == pytest.approx(1.0)
