"""Denoising real scans with a diffusion prior (issue 3): noise-level matching first."""
