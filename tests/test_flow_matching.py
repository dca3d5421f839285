"""The flow-matching head learns a multimodal distribution of whole chunks that a mean-squared-
error head averages away, and obeys its instruction; the flow path, sampler and pi0's time
distribution are the paper formulas; the decoder's mask is pi0's block-causal one; scanned and
rematerialised blocks compute what the unrolled ones do."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from caip_jax.policy import config as policy_config
from caip_jax.policy import flow, model, train
from caip_jax.policy.dataset import TrainingSet

MODES = np.array([[1.0, 1.0], [-1.0, -1.0]])
WEIGHT = 0.7  # of MODES[0]
SPREAD = 0.05
HORIZON = 2  # a chunk is both steps of one mode: its steps must agree
INSTRUCTIONS = ("either", "down")  # "either": 70 / 30 over the modes; "down": always MODES[1]


def bimodal(n: int, seed: int) -> TrainingSet:
    """n rows per instruction, each a chunk [HORIZON, 2] whose steps are one mode (plus noise):
    drawn 70 / 30 under "either", always MODES[1] under "down"; nothing else to condition on.
    Each row is its own one-step episode, so its whole chunk is real (no padding)."""
    rng = np.random.default_rng(seed)
    which = np.concatenate([(rng.random(n) >= WEIGHT).astype(int), np.ones(n, int)])
    chunks = MODES[which][:, None] + SPREAD * rng.standard_normal((2 * n, HORIZON, 2))
    texts = [INSTRUCTIONS[0]] * n + [INSTRUCTIONS[1]] * n
    # One-step episodes whose chunk is the whole chunk: build with horizon 1, then put the chunks in.
    data = TrainingSet.build([np.zeros((1, 1, 1))] * (2 * n), [np.zeros((1, 1))] * (2 * n),
                             [c[:1] for c in chunks], texts, horizon=1, instructions=INSTRUCTIONS)
    data.chunk, data.chunk_mask = chunks.astype(np.float32), np.ones((2 * n, HORIZON), bool)
    return data


def fitted(head: str, workdir: str) -> train.TrainedPolicy:
    config = policy_config.policy_config("tiny")
    config.model.head = head
    config.horizon, config.execute = HORIZON, 1
    config.total_steps, config.batch_size = 400, 128
    # Two devices: the batch is split and the gradients reduced over the mesh, as on a pod.
    return train.train(config, bimodal(2000, seed=0), workdir, devices=jax.devices()[:2])


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """head -> instruction -> 2000 sampled chunks [n, HORIZON, 2]."""
    n = 2000
    out = {}
    for head in ("flow", "mse"):
        policy = fitted(head, str(tmp_path_factory.mktemp(head)))
        out[head] = {text: policy.act(np.zeros((n, 1, 1)), np.zeros((n, 1)), np.full(n, policy.instruction_id(text), np.int32),
                                      train.key(1))
                     for text in INSTRUCTIONS}
    return out


def test_flow_samples_land_in_both_modes_in_proportion(samples):
    chunks = samples["flow"]["either"]
    distance = np.linalg.norm(chunks[:, :, None] - MODES[None, None], axis=-1)  # [n, T, 2]
    nearest = distance.argmin(axis=-1)
    assert np.mean(distance.min(axis=-1) < 0.3) > 0.95  # on a mode, not between them
    assert np.mean(nearest[:, 0] == nearest[:, 1]) > 0.95  # the chunk's steps agree on one mode
    # 70% +- 5 standard errors of a 2000-sample binomial (0.051), well inside the model's error.
    share = np.mean(nearest[:, 0] == 0)
    assert abs(share - WEIGHT) < 5 * np.sqrt(WEIGHT * (1 - WEIGHT) / len(chunks)), share


def test_the_instruction_changes_the_action(samples):
    """The same features and state, another instruction: "down" puts (nearly) every chunk on
    MODES[1], where "either" put 70% on MODES[0]."""
    for head in ("flow", "mse"):
        down = samples[head]["down"]
        assert np.mean(np.linalg.norm(down - MODES[1], axis=-1) < 0.3) > 0.95, head
    assert np.abs(samples["flow"]["either"].mean(axis=(0, 1)) - samples["flow"]["down"].mean(axis=(0, 1))).min() > 0.8


def test_mse_head_collapses_between_the_modes(samples):
    x = samples["mse"]["either"]
    mean = WEIGHT * MODES[0] + (1 - WEIGHT) * MODES[1]  # what the squared error is minimised by
    np.testing.assert_allclose(x.mean(axis=0), np.stack([mean] * HORIZON), atol=0.1)
    assert np.linalg.norm(x[:, :, None] - MODES[None, None], axis=-1).min() > 0.5  # no sample on a mode


def small_policy(depth: int = 3, **fields) -> model.Policy:
    return model.Policy(width=32, depth=depth, num_heads=4, mlp_dim=64, num_instructions=2, **fields)


def inputs(seed: int, batch: int = 2, horizon: int = 4, patches: int = 3):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((batch, patches, 5)), jnp.float32), jnp.asarray(rng.standard_normal((batch, 4)), jnp.float32),
            jnp.array([0, 1][:batch], jnp.int32), jnp.asarray(rng.standard_normal((batch, horizon, 3)), jnp.float32),
            jnp.asarray(rng.uniform(size=batch), jnp.float32))


def test_mask_is_pi0s_block_causal_one():
    mask = model.attention_mask(3, 2)
    want = np.array([[1, 1, 1, 0, 0]] * 3 + [[1, 1, 1, 1, 1]] * 2, bool)
    np.testing.assert_array_equal(mask, want)


def test_every_action_step_sees_the_whole_noisy_chunk_and_the_prefix_none_of_it():
    """Changing the noisy action of the last chunk step changes the velocity of the first (a
    causal mask would hide it); the prefix tokens' activations in every block do not change
    (they never see the noisy actions)."""
    policy = small_policy()
    features, state, instruction, chunk, t = inputs(0)
    params = policy.init(jax.random.key(0), features, state, instruction, chunk, t)["params"]
    params = jax.tree.map(lambda x: x, nn.unbox(params))
    other = chunk.at[:, -1].add(1.0)
    run = lambda c: policy.apply({"params": params}, features, state, instruction, c, t, capture_intermediates=True)
    (out, captured), (out_other, captured_other) = run(chunk), run(other)
    assert np.abs(np.asarray(out[:, 0] - out_other[:, 0])).min() > 1e-4  # step 0 sees step 3
    prefix = 2 + features.shape[1]  # instruction, state, feature tokens
    for i in range(policy.depth):
        mine = captured["intermediates"][f"block_{i}"]["__call__"][0][0]
        theirs = captured_other["intermediates"][f"block_{i}"]["__call__"][0][0]
        np.testing.assert_array_equal(mine[:, :prefix], theirs[:, :prefix])
        assert np.abs(np.asarray(mine[:, prefix:] - theirs[:, prefix:])).max() > 1e-3


def test_scan_and_remat_compute_what_the_unrolled_blocks_do():
    """The same parameters stacked along a [depth] axis give the same outputs and gradients
    under nn.scan, with and without rematerialisation."""
    features, state, instruction, chunk, t = inputs(1)
    unrolled = small_policy(depth=2)
    params = nn.unbox(unrolled.init(jax.random.key(1), features, state, instruction, chunk, t)["params"])
    blocks = [params.pop(f"block_{i}") for i in range(unrolled.depth)]
    stacked = dict(params, blocks=jax.tree.map(lambda *x: jnp.stack(x), *blocks))
    for i, block in enumerate(blocks):
        params[f"block_{i}"] = block

    def value_and_grad(module, p):
        loss = lambda p: jnp.sum(module.apply({"params": p}, features, state, instruction, chunk, t) ** 2)
        return jax.value_and_grad(loss)(p)

    want, want_grad = value_and_grad(unrolled, params)
    want_grad = dict(want_grad, blocks=jax.tree.map(lambda *x: jnp.stack(x), *[want_grad.pop(f"block_{i}") for i in range(2)]))
    for remat in ("none", "dots_no_batch"):  # the 0.8 B config's
        scanned = small_policy(depth=2, scan=True, remat_policy=remat)
        shapes = jax.eval_shape(lambda: nn.unbox(scanned.init(jax.random.key(1), features, state, instruction, chunk, t)["params"]))
        assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, stacked)
        got, got_grad = value_and_grad(scanned, stacked)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got_grad, want_grad)


def test_flow_times_are_pi0s_beta_distribution():
    """t = 0.999 (1 - u) with u ~ Beta(1.5, 1): the draws pass scipy's Kolmogorov-Smirnov test
    against that law, and uniform draws fail it (the test can tell the two apart)."""
    beta = np.asarray(train.flow_times(train.key(0), 20_000, "beta"))
    uniform = np.asarray(train.flow_times(train.key(0), 20_000, "uniform"))
    assert 0 <= beta.min() and beta.max() <= 0.999
    law = scipy.stats.beta(1.5, 1.0)
    assert scipy.stats.kstest(1 - beta / 0.999, law.cdf).pvalue > 1e-3
    assert scipy.stats.kstest(1 - uniform / 0.999, law.cdf).pvalue < 1e-6
    assert np.mean(beta < 0.5) == pytest.approx(1 - law.cdf(1 - 0.5 / 0.999), abs=0.02)  # 0.65: the noisy half


def test_keys_are_threefry_the_same_bits_on_every_backend():
    key = train.key(3)
    assert str(jax.random.key_impl(key)) == "threefry2x32"
    np.testing.assert_array_equal(jax.random.key_data(key), [0, 3])
    # The classic uint32 threefry key of the same seed draws the same numbers.
    np.testing.assert_array_equal(jax.random.normal(key, (4,)), jax.random.normal(jax.random.PRNGKey(3), (4,)))


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


def test_features_are_standardised_so_their_scale_does_not_matter(tmp_path):
    """Encoders' feature scales differ by orders of magnitude; the policy standardises each
    dimension on the demonstrations, so features scaled and shifted per dimension train the same
    policy and give the same actions (without it the decoder sees inputs 1000x larger)."""
    rng = np.random.default_rng(0)
    features = [rng.standard_normal((12, 3, 5)) for _ in range(4)]
    states, actions = [rng.standard_normal((12, 2)) for _ in range(4)], [rng.standard_normal((12, 2)) for _ in range(4)]
    scale, shift = np.array([1e3, 1e-3, 1.0, 50.0, 2.0]), np.array([5.0, -1.0, 0.0, 300.0, 0.5])
    config = policy_config.policy_config("tiny")
    config.total_steps, config.batch_size, config.model.depth = 30, 16, 1
    probe = rng.standard_normal((6, 3, 5))
    acted = []
    for name, transform in (("raw", lambda f: f), ("affine", lambda f: f * scale + shift)):
        data = TrainingSet.build([transform(f) for f in features], states, actions, ["go"] * 4, horizon=config.horizon)
        policy = train.train(config, data, str(tmp_path / name), devices=jax.devices()[:1])
        acted.append(policy.act(transform(probe), np.zeros((6, 2)), np.zeros(6, np.int32), train.key(1)))
    np.testing.assert_allclose(acted[0], acted[1], rtol=1e-4, atol=1e-4)
    assert np.abs(acted[0]).max() > 0.1  # the policy acts (not a trivially equal zero output)
