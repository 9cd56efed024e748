"""Random crops of whole scans for patch training: windows of the scan, foreground-weighted, planar crops of
volumes across one or all axes, reproducible from the step's generator, refused when the scan is too small."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsynth.data.patches import ImageSet, PatchSet, plane_axes
from medsynth.errors import MedsynthError


def scan(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A scan whose voxel values are their own flat index (so a crop tells where it came from) and a
    foreground box in one corner."""
    volume = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape)
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(0, s // 3) for s in shape)] = True
    return volume, mask


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def is_window(crop: np.ndarray, volume: np.ndarray) -> bool:
    """``crop`` is a contiguous window of ``volume`` (values are flat indices): consecutive along the last axis."""
    return bool(np.isin(crop, volume).all() and (np.diff(crop, axis=-1) == 1).all())


@pytest.mark.parametrize("shape, size", [((40, 36), [16, 16]), ((30, 28, 26), [12, 12, 12])], ids=["2d", "3d"])
def test_crops_are_windows_of_the_scan_with_the_network_size(shape, size) -> None:
    volume, mask = scan(shape)
    patches = PatchSet([volume], [mask], size, per_scan=3, foreground=0.5)
    crops = patches.take(np.array([0, 0]), generator(0)).numpy()
    assert crops.shape == (6, 1, *size)
    assert all(is_window(c[0], volume[0]) for c in crops)
    assert len(patches) == 1 and patches.item_shape == size and patches.per_index == 3


@pytest.mark.parametrize("shape, size", [((48, 40), [8, 8]), ((30, 28, 26), [6, 6, 6])], ids=["2d", "3d"])
def test_foreground_share_sets_where_crops_are_centred(shape, size) -> None:
    volume, mask = scan(shape)
    centre = tuple(s // 2 for s in size)

    def centred_in_foreground(foreground: float) -> float:
        crops = PatchSet([volume], [mask], size, per_scan=200, foreground=foreground).take(np.array([0]), generator(1))
        index = crops[(slice(None), 0, *centre)].numpy().astype(np.int64)
        return float(mask.ravel()[index].mean())

    assert centred_in_foreground(1.0) == 1.0
    assert centred_in_foreground(0.0) < 0.2  # background centres; a few crops near the box still start inside it
    assert 0.3 < centred_in_foreground(0.5) < 0.7


def test_planar_crops_of_a_volume_lie_across_the_allowed_axes() -> None:
    volume, mask = scan((24, 22, 20))
    along_z = PatchSet([volume], [mask], [8, 8], per_scan=50, axes=(2,)).take(np.array([0]), generator(2)).numpy()
    # across axis 2: one slice, so within a crop rows step by 20 (one y) and columns by 22 * 20 (one x)
    assert (np.diff(along_z[:, 0], axis=-1) == 20).all() and (np.diff(along_z[:, 0], axis=-2) == 22 * 20).all()
    mixed = PatchSet([volume], [mask], [8, 8], per_scan=60, axes=plane_axes("all", 2)).take(np.array([0]), generator(3))
    steps = {int(d) for d in np.diff(mixed.numpy()[:, 0], axis=-1)[:, 0, 0]}
    assert steps == {1, 20}  # last-axis neighbours: z (axes 0, 1 planes) or y (the axial plane)
    rows = {int(d) for d in np.diff(mixed.numpy()[:, 0], axis=-2)[:, 0, 0]}
    assert rows == {20, 22 * 20}


def test_the_same_generator_gives_the_same_crops_and_another_other_crops() -> None:
    volumes = [scan((40, 40), s) for s in range(3)]
    patches = PatchSet([v for v, _ in volumes], [m for _, m in volumes], [16, 16], per_scan=2)
    index = np.array([2, 0, 1])
    first, again = patches.take(index, generator(5)), patches.take(index, generator(5))
    assert torch.equal(first, again)
    assert not torch.equal(first, patches.take(index, generator(6)))
    np.testing.assert_array_equal(patches.fixed(4, 9), patches.fixed(4, 9))


@pytest.mark.parametrize(
    "shape, size, axes",
    [((20, 40), [32, 32], (2,)), ((40, 40, 10), [16, 16, 16], (2,)), ((40, 12, 40), [16, 16], (0,))],
)
def test_a_scan_smaller_than_the_patch_is_refused_by_name(shape, size, axes) -> None:
    volume, mask = scan(shape)
    with pytest.raises(MedsynthError, match="case_7: the scan .* is smaller than the .* patch"):
        PatchSet([volume], [mask], size, axes=axes, names=["case_7"])


def test_image_set_takes_whole_images_by_index() -> None:
    images = torch.arange(5 * 16, dtype=torch.float32).reshape(5, 1, 4, 4)
    chosen = ImageSet(images).take(np.array([3, 1]), generator(0))
    assert torch.equal(chosen, images[[3, 1]])


def test_flips_and_turns_give_all_eight_orientations_of_a_square_crop() -> None:
    """With flips and rotations a 2D crop comes in each of the 8 orientations of its plane (told apart by the
    steps between neighbours); flips alone give 4 and keep the rows and columns where they were."""
    volume, mask = scan((40, 36))

    def orientations(**augment: bool) -> set[tuple[int, int]]:
        crops = PatchSet([volume], [mask], [8, 8], per_scan=200, **augment).take(np.array([0]), generator(4)).numpy()
        return {(int(c[0, 0, 1] - c[0, 0, 0]), int(c[0, 1, 0] - c[0, 0, 0])) for c in crops}

    assert orientations(flips=True) == {(1, 36), (-1, 36), (1, -36), (-1, -36)}
    turned = orientations(flips=True, rotations=True)
    assert len(turned) == 8 and {(36, 1), (-36, -1)} <= turned
    assert orientations(rotations=True) == {(1, 36), (36, 1)}
    # non-square crops are never turned (the network's input shape is fixed)
    assert PatchSet([volume], [mask], [8, 12], rotations=True).rotations is False


def test_rotations_enter_the_resume_identity_only_when_on() -> None:
    volume, mask = scan((40, 36))
    plain = PatchSet([volume], [mask], [8, 8], flips=True).describe()
    assert "rotations" not in plain[-1]
    assert PatchSet([volume], [mask], [8, 8], flips=True, rotations=True).describe()[-1]["rotations"] is True
