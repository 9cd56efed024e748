"""Training data: procedural phantoms, data preparation and the scan-to-model-input transforms.

- :mod:`~medsynth.data.phantoms` — deterministic brain MRI and abdominal CT phantoms with label maps,
  2D and 3D from one code path.
- :mod:`~medsynth.data.prepare` — a data source (phantoms or the user's NIfTI/DICOM folder) to NIfTI
  files, a MONAI-style datalist, a seeded case-level train/validation split and cached model inputs.
- :mod:`~medsynth.data.transforms` — MONAI geometry transforms (orientation, spacing, size) and the
  invertible per-modality intensity conventions (CT Hounsfield window, MR foreground percentile) to
  ``[-1, 1]``.
"""
