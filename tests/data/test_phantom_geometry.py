"""Phantoms written as NIfTI sit correctly in RAS world space: spine posterior, liver on the patient's right."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.config import DataConfig
from medsynth.data.phantoms import CT_LABELS
from medsynth.data.prepare import phantom_cases


@pytest.mark.parametrize("shape", [[48, 48], [32, 32, 24]], ids=["2d", "3d"])
def test_body_ct_anatomy_in_world_coordinates(tmp_path: Path, shape: list[int]) -> None:
    data = DataConfig(
        spatial_dims=len(shape), image_size=shape, phantom={"kind": "body_ct", "count": 3, "shape": shape}
    )
    cases, _, _ = phantom_cases(data, tmp_path, seed=0)
    for case in cases:
        labels_img = nib.load(tmp_path / case.label)
        labels = np.asarray(labels_img.dataobj)

        def world_centroid(mask: np.ndarray, affine: np.ndarray = labels_img.affine) -> np.ndarray:
            index = np.argwhere(mask).mean(axis=0)
            index = np.concatenate([index, np.zeros(3 - len(index))])
            return affine[:3, :3] @ index + affine[:3, 3]

        body = world_centroid(labels > 0)
        assert world_centroid(labels == CT_LABELS["bone"])[1] < body[1]  # spine is posterior (RAS -y)
        assert world_centroid(labels == CT_LABELS["liver"])[0] < body[0]  # liver on the patient's right (RAS -x)
