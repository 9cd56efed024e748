"""Evaluation of synthetic and denoised scans: image sets ``(N, C, *spatial)`` (tensors or arrays), 2D and 3D.

- :mod:`~medsynth.metrics.fidelity` — set-level fidelity against held-out real images (MONAI MMD,
  MS-SSIM diversity, per-tissue-class intensity histogram distances).
- :mod:`~medsynth.metrics.features` — FID, precision/recall and kernel MMD in the feature space of a
  network that medsynth trains on the real training images or reads from a local file (no download).
- :mod:`~medsynth.metrics.memorisation` — nearest-neighbour audit: does a synthetic scan copy a
  training patient?
- :mod:`~medsynth.metrics.utility` — downstream utility: does adding synthetic scans help a model
  trained on them? Scores on held-out real cases, per training regime, and their figure.
- :mod:`~medsynth.metrics.classifier` — the classifier network that checks a class-conditional model
  makes the class it was asked for.
- :mod:`~medsynth.metrics.label_adherence` — does an image generated from a label map put its tissues
  where the map says?
- :mod:`~medsynth.metrics.restoration` — PSNR and SSIM over the whole image and inside a foreground
  mask, for denoising.
"""
