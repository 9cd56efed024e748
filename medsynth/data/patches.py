"""Training sets for the pixel-space trainers: whole model inputs, or random crops of whole scans.

A :class:`ImageSet` is the cached ``(N, C, *spatial)`` array of resized (or padded) inputs; a
:class:`PatchSet` keeps every scan at its own spacing and crops ``size`` windows at random, as MONAI's
``RandCropByPosNegLabeld`` does: a crop is centred on a foreground voxel with probability
``foreground`` and on a background voxel otherwise (centres from MONAI's
``generate_pos_neg_label_crop_centers``, which moves a centre inward until the crop fits). Several
crops come from each drawn scan (``per_scan``, MONAI's ``num_samples``).

A 2D network trained on 3D scans gets planar crops: size 1 across the slice axis, i.e. a window of one
slice. With ``axes`` listing several axes, each crop takes one of them at random, so one 2D prior
sees axial, coronal and sagittal slices.

Both sets draw from the step's generator only, so a batch is a pure function of (seed, step) and a
resumed run draws the same crops.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms.utils import generate_pos_neg_label_crop_centers, map_binary_to_indices

from medsynth.errors import MedsynthError


class ImageSet:
    """Whole model inputs ``(N, C, *spatial)``; an index selects images."""

    per_index = 1

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.spatial_dims = images.ndim - 2
        self.channels = int(images.shape[1])
        self.item_shape = [int(s) for s in images.shape[2:]]

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> list[int]:
        return [int(s) for s in self.images.shape[1:]]

    def take(self, index: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        return self.images[torch.as_tensor(index, device=self.images.device)]


class PatchSet:
    """Random crops of ``size`` from whole scans ``(C, X, Y[, Z])`` at their own spacing.

    Args:
        volumes: the scans in the model's normalised units, channel first.
        masks: their foreground (boolean, the scans' spatial shape).
        size: the crop (the network's input), one entry per network dimension.
        per_scan: crops from each drawn scan.
        foreground: share of crops centred on a foreground voxel.
        axes: for a 2D network on 3D scans, the axes a crop may lie across (one slice thick).
        names: how errors name the scans (never a path from the user's data).
        flips: flip each crop along each axis with probability 1/2 (augmentation).
        rotations: also swap the crop's first two axes with probability 1/2 when they are the same size;
            with ``flips`` the crops then take all eight 90-degree turns and mirror images of that plane.

    Raises:
        MedsynthError: a scan smaller than the crop, or of another channel count / dimension.
    """

    def __init__(
        self,
        volumes: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        size: Sequence[int],
        *,
        per_scan: int = 1,
        foreground: float = 0.9,
        axes: Sequence[int] = (2,),
        names: Sequence[str] | None = None,
        flips: bool = False,
        rotations: bool = False,
    ) -> None:
        if not volumes:
            raise MedsynthError("no scans to crop patches from")
        names = list(names) if names is not None else [f"scan {i}" for i in range(len(volumes))]
        self.size = [int(s) for s in size]
        self.spatial_dims = len(self.size)
        self.per_index = int(per_scan)
        self.foreground = float(foreground)
        self.flips = bool(flips)
        self.rotations = bool(rotations) and len(self.size) >= 2 and self.size[0] == self.size[1]
        self.axes = [int(a) for a in axes]
        self.volumes = [np.ascontiguousarray(v, dtype=np.float32) for v in volumes]
        self.channels = int(self.volumes[0].shape[0])
        self.item_shape = list(self.size)
        self.rois: list[list[tuple[int, list[int]]]] = []  # per scan: (axis or -1, 3D/2D crop size)
        self.indices: list[tuple[np.ndarray, np.ndarray]] = []
        for volume, mask, name in zip(self.volumes, masks, names):
            spatial = list(volume.shape[1:])
            if volume.shape[0] != self.channels or len(spatial) not in (self.spatial_dims, self.spatial_dims + 1):
                raise MedsynthError(
                    f"{name}: shape {list(volume.shape)} does not fit {self.spatial_dims}D crops of "
                    f"{self.channels} channel(s)"
                )
            self.rois.append(crop_rois(self.size, spatial, self.axes, name))
            fg, bg = map_binary_to_indices(np.asarray(mask, dtype=bool)[None])  # MONAI: channel-first labels
            self.indices.append((np.asarray(fg), np.asarray(bg)))

    def __len__(self) -> int:
        return len(self.volumes)

    def describe(self) -> list:
        """What a resumed run must match: crop size and sampling, and the scans' shapes."""
        sampling = {"per_scan": self.per_index, "foreground": self.foreground, "flips": self.flips, "axes": self.axes}
        if self.rotations:  # only when on, so that runs from before the option resume
            sampling["rotations"] = True
        return [self.channels, *self.size, {"scans": [list(v.shape[1:]) for v in self.volumes], **sampling}]

    def _crop(self, scan: int, rng: np.random.RandomState) -> np.ndarray:
        volume, rois = self.volumes[scan], self.rois[scan]
        axis, roi = rois[rng.randint(len(rois))] if len(rois) > 1 else rois[0]
        fg, bg = self.indices[scan]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns when a scan has no foreground (or no background)
            (centre,) = generate_pos_neg_label_crop_centers(
                roi, 1, self.foreground, volume.shape[1:], fg, bg, rand_state=rng
            )
        # MONAI SpatialCrop's convention: the window starts size // 2 before the centre
        window = tuple(slice(int(c) - r // 2, int(c) - r // 2 + r) for c, r in zip(centre, roi))
        crop = volume[(slice(None), *window)]
        crop = crop[(slice(None), *(0 if a == axis else slice(None) for a in range(crop.ndim - 1)))]
        if self.flips:  # a random flip along each axis: more anatomy from few scans (noise is isotropic)
            flipped = [a + 1 for a in range(crop.ndim - 1) if rng.rand() < 0.5]
            crop = np.flip(crop, axis=flipped) if flipped else crop
        if self.rotations and rng.rand() < 0.5:  # with the flips: every 90-degree turn of the crop's plane
            crop = np.swapaxes(crop, 1, 2)
        return np.ascontiguousarray(crop)

    def take(self, index: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """``per_scan`` crops of each scan in ``index``, scan by scan: ``(len(index) * per_scan, C, *size)``."""
        # one draw from the step's generator seeds MONAI's (numpy) centre sampling for this batch
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device).item())
        rng = np.random.RandomState(seed)
        crops = [self._crop(int(scan), rng) for scan in index for _ in range(self.per_index)]
        return torch.from_numpy(np.stack(crops))

    def fixed(self, per_scan: int, seed: int) -> np.ndarray:
        """``per_scan`` reproducible crops of every scan, scan by scan (validation, previews, the cache)."""
        rng = np.random.RandomState(seed)
        return np.stack([self._crop(scan, rng) for scan in range(len(self)) for _ in range(per_scan)])


def crop_rois(
    size: Sequence[int], spatial: Sequence[int], axes: Sequence[int], name: str
) -> list[tuple[int, list[int]]]:
    """The crops a scan of ``spatial`` shape gives: ``(axis, roi)``, axis -1 for a crop of the scan's own
    dimension, else the axis a one-slice-thick planar crop lies across.

    Raises:
        MedsynthError: the scan is smaller than the crop (named ``name``).
    """
    size, spatial = [int(s) for s in size], [int(s) for s in spatial]
    if len(spatial) == len(size):
        rois = [(-1, list(size))]
    else:  # planar crops of a 3D scan: one slice thick across each allowed axis
        rois = [(int(a), size[:a] + [1] + size[a:]) for a in axes]
    for _, roi in rois:
        if any(r > s for r, s in zip(roi, spatial)):
            raise MedsynthError(
                f"{name}: the scan ({'x'.join(map(str, spatial))} voxels) is smaller than the "
                f"{'x'.join(map(str, size))} patch (data.image_size); use smaller patches"
            )
    return rois


def plane_axes(axes: str, slice_axis: int) -> tuple[int, ...]:
    """The axes 2D crops of 3D scans lie across: ``"slice"`` -> the slice axis, ``"all"`` -> all three."""
    return (slice_axis,) if axes == "slice" else (0, 1, 2)
