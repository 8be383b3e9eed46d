"""Diffusion math: processes over (alpha_t, sigma_t), losses, samplers, the bound."""
