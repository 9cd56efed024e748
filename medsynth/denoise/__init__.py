"""Denoising real scans: a diffusion prior from the scan's own noise level, and classical baselines.

:mod:`~medsynth.denoise.registry` lists the methods and prior modes (torch-free);
:mod:`~medsynth.denoise.matching` maps a noise level onto the trained process,
:mod:`~medsynth.denoise.prior` runs the prior, :mod:`~medsynth.denoise.classical` the baselines,
:mod:`~medsynth.denoise.scan` one scan in its own units and :mod:`~medsynth.denoise.files` files in and out.
"""
