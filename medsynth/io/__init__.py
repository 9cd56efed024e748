"""Files in and out: scans, DICOM series, training state, and atomic writes under them all.

- :mod:`~medsynth.io.volumes` — read NIfTI files and DICOM series, validated, as float32 arrays with a
  RAS affine.
- :mod:`~medsynth.io.nifti` — write NIfTI images.
- :mod:`~medsynth.io.dicom_write` — a processed volume as a derived DICOM series beside its source.
- :mod:`~medsynth.io.dicom_synthetic` — a synthetic volume as a new DICOM series, every attribute made
  here and marked synthetic.
- :mod:`~medsynth.io.state` — checkpoints and model files (tensors and plain values only, read with
  ``weights_only``) and the global RNG states.
- :mod:`~medsynth.io.atomic` — files and output folders that appear complete or not at all, the output
  folder lock, and the removal of what a killed process left.
"""
