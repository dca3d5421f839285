"""caip-jax: Contrastive Action-Image Pre-training for visuomotor control, in JAX/Flax."""
