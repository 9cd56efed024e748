"""medsynth: MONAI-based diffusion models to synthesise and denoise medical scans (2D and 3D).

The library, from the lowest layer up:

- :mod:`medsynth.io`, :mod:`medsynth.data`, :mod:`medsynth.noise` — scans and files, training data,
  noise models;
- :mod:`medsynth.models`, :mod:`medsynth.diffusion` — networks, noise schedules, objectives and samplers;
- :mod:`medsynth.metrics`, :mod:`medsynth.denoise` — evaluation, and denoising real scans with a
  diffusion prior or classical filters;
- :mod:`medsynth.training` — the training loops and checkpoints;
- beside them: :mod:`medsynth.synthesis` (a trained model to synthetic scans in real units),
  :mod:`medsynth.figures`, :mod:`medsynth.runtime` (devices, ``torchrun`` process groups),
  :mod:`medsynth.config` (the one typed config schema), :mod:`medsynth.tracking` (the only module that
  imports MLflow), :mod:`medsynth.review` and :mod:`medsynth.cli` (the ``medsynth`` command). The
  pipeline stages that wire the library to tracking live in ``pipelines/``.

This package itself holds only the version and :class:`~medsynth.errors.MedsynthError`; importing it
loads neither torch nor MLflow.
"""

from __future__ import annotations

__version__ = "0.1.0"

from medsynth.errors import MedsynthError

__all__ = ["MedsynthError", "__version__"]
