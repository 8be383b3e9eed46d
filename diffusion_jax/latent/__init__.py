"""Latent diffusion: the autoencoder source, the latent cache and its
encoder (Rombach et al. 2022)."""
