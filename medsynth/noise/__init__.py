"""Noise in scans, on arrays in 2D and 3D: seeded noise models, noise-level estimation, Rician bias.

- :mod:`~medsynth.noise.models` — Gaussian and Rician noise (MONAI), and low-dose CT simulated in the
  projection domain (with the image-domain Gaussian shortcut to compare against).
- :mod:`~medsynth.noise.estimation` — the standard deviation of the noise in an image's own units:
  Gaussian (wavelet MAD), Rician from the background, CT in HU.
- :mod:`~medsynth.noise.correction` — Rician bias correction for magnitude MRI.
"""
