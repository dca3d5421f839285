"""Flow matching of action chunks (Lipman et al. 2023; the rectified-flow form of pi0):
a straight path from noise to the data and a network that regresses its velocity.

Time runs from 0 (noise) to 1 (data): x_t = (1 - t) x_0 + t x_1 with x_0 ~ N(0, I), so the
velocity along the path is the constant x_1 - x_0. Sampling integrates the learned velocity
from t = 0 with a few Euler steps.
"""
from typing import Callable

import jax
import jax.numpy as jnp


def noisy_chunk(noise: jax.Array, chunk: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """noise, chunk [B, T, A], t [B] in [0, 1] -> (x_t [B, T, A], target velocity [B, T, A])."""
    t = t[:, None, None]
    return (1.0 - t) * noise + t * chunk, chunk - noise


def masked_mse(prediction: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared error over the steps where mask [B, T] is true (padding past an episode's
    end does not count); prediction, target [B, T, A]."""
    mask = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(mask) * prediction.shape[-1]
    return jnp.sum(mask * (prediction - target) ** 2) / jnp.maximum(total, 1.0)


def sample(velocity: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array, steps: int) -> jax.Array:
    """Euler integration of `velocity(x [B, T, A], t [B]) -> [B, T, A]` from `noise` at t = 0 to
    t = 1 in `steps` equal steps -> the sampled chunk [B, T, A]."""
    dt = 1.0 / steps

    def step(k, x):
        t = jnp.full(x.shape[:1], k * dt, jnp.float32)
        return x + dt * velocity(x, t)

    return jax.lax.fori_loop(0, steps, step, noise)
