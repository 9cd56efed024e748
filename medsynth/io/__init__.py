"""Reading and writing scans and outputs (NIfTI, DICOM, atomic files)."""
