"""diffusion_jax: a JAX/Flax trainer for diffusion models."""

__version__ = '0.1.0'
