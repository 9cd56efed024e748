"""Noise models and noise-level estimation (2D and 3D, seeded)."""
