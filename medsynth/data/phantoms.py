"""Procedural, deterministic phantoms: a T1-weighted brain MRI and an abdominal CT, in 2D and 3D.

Each phantom is built from a handful of ellipsoids and smooth random fields on the normalised grid
``[-1, 1]^d`` (``np.meshgrid(indexing="ij")``), so one code path makes a 2D axial slice (axes x, y) and
a 3D volume (axes x, y, z, z cranio-caudal). Orientation: x runs from the patient's right to left and
y from anterior to posterior, so ``image.T`` shown with ``imshow`` is in the radiological convention;
:data:`PHANTOM_AXIS_SIGNS` says how these axes sit in RAS world coordinates, for the NIfTI affine.

All randomness comes from the ``rng`` argument and every random parameter is drawn up front, whatever
the options: the same seed gives the same anatomy with and without a lesion or a bias field, and the
options change only what they name.

Usage::

    phantom = generate_phantom("brain_mri", (64, 64), seed=0)
    phantom.image, phantom.labels, phantom.class_label
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from medsynth.errors import MedsynthError

BRAIN_LABELS: dict[str, int] = {
    "background": 0,
    "csf": 1,
    "gray_matter": 2,
    "white_matter": 3,
    "skull": 4,
    "scalp_fat": 5,
    "lesion": 6,
}
CT_LABELS: dict[str, int] = {
    "air": 0,
    "fat": 1,
    "soft_tissue": 2,
    "liver": 3,
    "kidney": 4,
    "bone": 5,
    "lesion": 6,
}
PHANTOM_KINDS: tuple[str, ...] = ("brain_mri", "body_ct")
# Array axes in RAS world terms: x runs right -> left (along RAS +x), y runs
# anterior -> posterior (against RAS +A), z runs superior -> inferior (against RAS +S).
PHANTOM_AXIS_SIGNS = (1.0, -1.0, -1.0)
MIN_PHANTOM_SIZE = 16

# Lowest value a CT scanner stores; noise in air is clipped there as on a real scanner.
_CT_FLOOR_HU = -1024.0


@dataclass(frozen=True, eq=False)
class Phantom:
    """One synthetic scan with its ground truth.

    ``eq=False`` because field-wise ``==`` on arrays has no single truth value; compare arrays instead.

    Attributes:
        image: float32 intensities. MR: arbitrary positive T1-like units (white matter near 800);
            CT: Hounsfield units.
        labels: uint8 label map of the same shape, values from :data:`BRAIN_LABELS` or :data:`CT_LABELS`.
        class_label: 1 when the label map holds a lesion, else 0.
        modality: ``"mr"`` or ``"ct"``.
    """

    image: np.ndarray
    labels: np.ndarray
    class_label: int
    modality: str


# ----------------------------------------------------------------------------- validation


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Return ``shape`` as a tuple of ints, or raise if it is not 2 or 3 sizes of at least 16."""
    sizes = tuple(shape) if isinstance(shape, (tuple, list)) else None
    if (
        sizes is None
        or len(sizes) not in (2, 3)
        or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) for n in sizes)
        or any(n < MIN_PHANTOM_SIZE for n in sizes)
    ):
        raise MedsynthError(f"phantom shape must be 2 or 3 integers >= {MIN_PHANTOM_SIZE} (x, y[, z]), got {shape!r}")
    return tuple(int(n) for n in sizes)


def _check_range(name: str, value: float, low: float, high: float = np.inf) -> None:
    """Raise unless ``low <= value <= high``."""
    if not low <= value <= high:
        raise MedsynthError(f"{name} must be in [{low}, {high}], got {value!r}")


# ----------------------------------------------------------------------------- geometry


def _normalised_grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Voxel-centre coordinates on ``[-1, 1]`` per axis, as sparse broadcastable ``ij`` grids."""
    axes = [(np.arange(n) + 0.5) * (2.0 / n) - 1.0 for n in shape]
    return list(np.meshgrid(*axes, indexing="ij", sparse=True))


def _axial_frame(coords: Sequence[np.ndarray], centre: Sequence[float], angle: float, scale: float) -> list[np.ndarray]:
    """Coordinates in an object's own frame: shifted to ``centre``, rotated by ``angle`` (radians) in
    the axial (x, y) plane, and divided by ``scale``. Axes past the second (z) are only shifted."""
    shifted = [c - c0 for c, c0 in zip(coords, centre)]
    cos, sin = np.cos(angle), np.sin(angle)
    rotated = [cos * shifted[0] + sin * shifted[1], -sin * shifted[0] + cos * shifted[1], *shifted[2:]]
    return [axis / scale for axis in rotated]


def _ellipsoid_radius(
    frame: Sequence[np.ndarray],
    centre: Sequence[float],
    semi_axes: Sequence[float],
    angle: float = 0.0,
) -> np.ndarray:
    """Normalised ellipsoid radius (< 1 inside) of each voxel.

    ``centre`` and ``semi_axes`` give (x, y, z); a 2D frame uses the first two. An infinite semi-axis
    makes a cylinder along that axis (the z term vanishes), which is how bodies extend along z.
    """
    local = _axial_frame(frame, centre, angle, 1.0)
    return np.sqrt(sum((u / a) ** 2 for u, a in zip(local, semi_axes)))


def _smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, correlation: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with a correlation length in normalised units.

    Gaussian-filtered white noise works in any dimension; sigma is set per axis so the field is
    isotropic in normalised coordinates whatever the voxel counts.
    """
    sigma = [max(correlation * n / 2.0, 0.5) for n in shape]
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma)
    return (field - field.mean()) / max(float(field.std()), 1e-12)


def _project_radially(
    field: np.ndarray,
    coords: Sequence[np.ndarray],
    centre: Sequence[float],
    radius: np.ndarray,
    shell: float,
    straightness: float,
) -> np.ndarray:
    """Sample ``field`` on each voxel's ray from ``centre``, pulled towards the surface ``radius == shell``.

    ``radius`` must scale linearly along rays (an ellipsoid radius does). With ``straightness`` 1 every
    voxel samples where its ray crosses the surface, so the result is a surface pattern extruded
    exactly radially; below 1 deeper voxels sample deeper, and the extruded lines wander.
    """
    shape = field.shape
    stretch = (shell / np.maximum(radius, 1e-3)) ** straightness
    # World coordinates on [-1, 1] -> fractional voxel indices of the voxel-centre grid.
    index = [
        np.broadcast_to((c0 + (c - c0) * stretch + 1.0) * (n / 2.0) - 0.5, shape)
        for c, c0, n in zip(coords, centre, shape)
    ]
    return ndimage.map_coordinates(field, index, order=1, mode="nearest")


def _bias_field(
    coords: Sequence[np.ndarray], shape: tuple[int, ...], rng: np.random.Generator, amplitude: float
) -> np.ndarray:
    """Smooth multiplicative field in ``[1 - amplitude, 1 + amplitude]``.

    A random quadratic polynomial of the coordinates: the low-order smooth model of MR intensity
    non-uniformity that N3 (Sled et al., IEEE TMI 1998) and its successors assume.
    """
    ndim = len(coords)
    linear = rng.uniform(-1.0, 1.0, size=ndim)
    quadratic = rng.uniform(-1.0, 1.0, size=(ndim, ndim))
    poly = sum(linear[i] * coords[i] for i in range(ndim)) + sum(
        quadratic[i, j] * coords[i] * coords[j] for i in range(ndim) for j in range(i, ndim)
    )
    # Scale over the unit ball, where the anatomy is, not the whole box: the box corners would
    # otherwise take the extremes and leave the head almost flat.
    poly = np.broadcast_to(poly, shape)
    ball = np.broadcast_to(sum(c**2 for c in coords) <= 1.0, shape)
    poly = poly - poly[ball].mean()
    peak = max(float(np.abs(poly[ball]).max()), 1e-12)
    return 1.0 + amplitude * np.clip(poly / peak, -1.0, 1.0)


def _paint(tissue: np.ndarray, mask: np.ndarray, value: int) -> np.ndarray:
    """``tissue`` with ``value`` wherever the (broadcastable) ``mask`` holds."""
    return np.where(mask, np.uint8(value), tissue)


def _pick_voxel(
    candidates: np.ndarray, fallback: np.ndarray, fraction: float, coords: Sequence[np.ndarray]
) -> tuple[float, ...] | None:
    """Coordinates (x, y, z) of one voxel of ``candidates`` (``fallback`` if empty), chosen by a
    uniform ``fraction`` in [0, 1); None if both are empty. Padded to three entries."""
    index = np.flatnonzero(candidates)
    if index.size == 0:
        index = np.flatnonzero(fallback)
    if index.size == 0:
        return None
    voxel = np.unravel_index(index[int(fraction * index.size)], candidates.shape)
    point = [float(np.broadcast_to(c, candidates.shape)[voxel]) for c in coords]
    return tuple(point + [0.0] * (3 - len(point)))


# ----------------------------------------------------------------------------- brain MRI

# T1-weighted means (arbitrary units, white matter ~800): fat brightest, then WM > GM > CSF, cortical
# bone dark, air black. Each is jittered by +-8 %; the gaps are wide enough that the order survives.
_BRAIN_T1_MEANS: dict[str, float] = {
    "background": 0.0,
    "csf": 250.0,
    "gray_matter": 560.0,
    "white_matter": 800.0,
    "skull": 80.0,
    "scalp_fat": 1000.0,
}
# Shells in units of the head ellipsoid's normalised radius, from outside in.
_SKULL_OUTER, _CSF_OUTER, _BRAIN_OUTER = 0.92, 0.85, 0.81


def brain_mri_phantom(
    shape: tuple[int, ...],
    rng: np.random.Generator,
    *,
    bias_field: bool = True,
    lesion_probability: float = 0.5,
    noise_std: float = 0.01,
    lesion_size: float = 1.0,
) -> Phantom:
    """T1-weighted axial brain MRI phantom (2D slice or 3D volume).

    Scalp fat, skull, CSF, a folded cortex (gray matter) over white matter, two lateral ventricles and
    an interhemispheric fissure. With probability ``lesion_probability`` a small bright (enhancing)
    ellipsoidal lesion sits in deep white matter.

    Args:
        shape: (x, y) or (x, y, z) voxel counts, each >= 16.
        rng: source of all randomness.
        bias_field: multiply by a smooth intensity non-uniformity of up to +-15 %.
        lesion_probability: chance of a lesion, in [0, 1].
        noise_std: standard deviation of the Rician noise, relative to the white-matter mean.
        lesion_size: scale of the lesion's axes (1: 3.5-7 % of the head's half-width); the random draws
            are the same for every size, so only the lesion changes.

    Returns:
        The phantom; ``image`` is non-negative, ``modality`` is ``"mr"``.
    """
    shape = _check_shape(shape)
    _check_range("lesion_probability", lesion_probability, 0.0, 1.0)
    _check_range("noise_std", noise_std, 0.0)
    _check_range("lesion_size", lesion_size, 0.1, 5.0)
    coords = _normalised_grid(shape)
    labels = BRAIN_LABELS

    # 1. Draw every random parameter, in a fixed order.
    head_centre = rng.uniform(-0.04, 0.04, size=3)
    head_angle = np.deg2rad(rng.uniform(-10.0, 10.0))
    head_scale = rng.uniform(0.86, 1.0)
    head_axes = rng.uniform((0.70, 0.86, 0.80), (0.78, 0.94, 0.92))
    # Ventricle bodies run antero-posteriorly, close together at the frontal horns and diverging
    # towards the atria, as in an axial slice at the level of the lateral ventricles.
    ventricle_offset = rng.uniform(0.08, 0.11)
    ventricle_axes = rng.uniform((0.035, 0.20, 0.10), (0.060, 0.27, 0.16))
    ventricle_angle = np.deg2rad(rng.uniform(4.0, 12.0))
    ventricle_y = rng.uniform(-0.06, 0.02)
    white_matter_level = rng.uniform(0.53, 0.58)
    gyrus_height = rng.uniform(0.13, 0.17)
    means = {name: mean * rng.uniform(0.92, 1.08) for name, mean in _BRAIN_T1_MEANS.items()}
    has_lesion = rng.random() < lesion_probability
    lesion_axes = rng.uniform(0.035, 0.07, size=3) * lesion_size
    lesion_angle = rng.uniform(0.0, np.pi)
    lesion_pick = rng.random()
    lesion_contrast = rng.uniform(1.25, 1.40)
    bias_amplitude = rng.uniform(0.10, 0.15)
    folding = _smooth_noise(shape, rng, correlation=0.05)
    bias = _bias_field(coords, shape, rng, bias_amplitude)
    noise = rng.standard_normal((2, *shape))

    # 2. Anatomy, painted from outside in.
    head = _axial_frame(coords, head_centre, head_angle, head_scale)
    radius = _ellipsoid_radius(head, (0.0, 0.0, 0.0), head_axes)
    tissue = np.zeros(shape, dtype=np.uint8)
    tissue = _paint(tissue, radius < 1.0, labels["scalp_fat"])
    tissue = _paint(tissue, radius < _SKULL_OUTER, labels["skull"])
    tissue = _paint(tissue, radius < _CSF_OUTER, labels["csf"])
    # Gyri and sulci from one random pattern on the brain surface, extruded radially: sulci are thin
    # CSF clefts along its zero crossings, and white matter reaches up into each gyrus between them,
    # deepest where the pattern is far from zero, so every gyrus is a WM core lined with cortex.
    pattern = _project_radially(folding, coords, head_centre, radius, _BRAIN_OUTER, straightness=0.6)
    white_matter_edge = white_matter_level + gyrus_height * np.tanh(2.0 * np.abs(pattern))
    brain = radius < _BRAIN_OUTER
    tissue = _paint(tissue, brain, labels["gray_matter"])
    sulci = brain & (np.abs(pattern) < 0.2) & (radius > white_matter_level + 0.05)
    tissue = _paint(tissue, sulci, labels["csf"])
    tissue = _paint(tissue, radius < white_matter_edge, labels["white_matter"])
    fissure = brain & (np.abs(head[0]) < 0.02) & (np.abs(head[1]) > 0.35)
    tissue = _paint(tissue, fissure, labels["csf"])
    for side in (-1.0, 1.0):
        ventricle = _ellipsoid_radius(
            head, (side * ventricle_offset, ventricle_y, 0.05), ventricle_axes, -side * ventricle_angle
        )
        tissue = _paint(tissue, ventricle < 1.0, labels["csf"])

    # 3. Lesion, centred on a deep white-matter voxel so it is never empty when drawn.
    if has_lesion:
        white_matter = tissue == labels["white_matter"]
        centre = _pick_voxel(white_matter & (radius < 0.45), white_matter, lesion_pick, head)
        if centre is not None:
            lesion = _ellipsoid_radius(head, centre, lesion_axes, lesion_angle) < 1.0
            tissue = _paint(tissue, lesion & white_matter, labels["lesion"])

    # 4. Intensities: tissue means, bias field, then Rician noise (magnitude of complex Gaussian
    # noise, as in a magnitude MR image), which also keeps the image non-negative.
    lookup = np.zeros(max(labels.values()) + 1)
    for name, mean in means.items():
        lookup[labels[name]] = mean
    lookup[labels["lesion"]] = lesion_contrast * means["white_matter"]
    clean = lookup[tissue] * (bias if bias_field else 1.0)
    sigma = noise_std * means["white_matter"]
    image = np.hypot(clean + sigma * noise[0], sigma * noise[1])
    return Phantom(
        image=image.astype(np.float32),
        labels=tissue,
        class_label=int(np.any(tissue == labels["lesion"])),
        modality="mr",
    )


# ----------------------------------------------------------------------------- body CT

# Internal compartments: more than the labels, because some labels span two HU levels (cortical and
# trabecular bone; muscle, bowel, blood, spleen and the spinal canal are all "soft_tissue").
_CT_COMPARTMENTS: tuple[tuple[str, str], ...] = (
    ("air", "air"),
    ("fat", "fat"),
    ("muscle", "soft_tissue"),
    ("bowel", "soft_tissue"),
    ("blood", "soft_tissue"),
    ("spleen", "soft_tissue"),
    ("spinal_canal", "soft_tissue"),
    ("liver", "liver"),
    ("kidney", "kidney"),
    ("cortical_bone", "bone"),
    ("trabecular_bone", "bone"),
    ("lesion", "lesion"),
)
_CT_INDEX: dict[str, int] = {name: i for i, (name, _) in enumerate(_CT_COMPARTMENTS)}
# Unenhanced abdominal HU ranges (low, high) for each compartment.
_CT_HU_RANGES: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0),
    "fat": (-115.0, -85.0),
    "muscle": (38.0, 50.0),
    "bowel": (25.0, 40.0),
    "blood": (35.0, 48.0),
    "spleen": (40.0, 50.0),
    "spinal_canal": (15.0, 30.0),
    "liver": (55.0, 68.0),
    "kidney": (25.0, 35.0),
    "cortical_bone": (700.0, 1000.0),
    "trabecular_bone": (200.0, 300.0),
    "lesion": (10.0, 25.0),
}
_MAX_GAS_POCKETS = 3


def body_ct_phantom(
    shape: tuple[int, ...],
    rng: np.random.Generator,
    *,
    lesion_probability: float = 0.5,
    noise_std_hu: float = 8.0,
    lesion_size: float = 1.0,
) -> Phantom:
    """Unenhanced abdominal CT phantom in Hounsfield units (2D axial slice or 3D volume).

    An elliptic body (wider left-right than antero-posterior, a cylinder along z) with subcutaneous
    fat, a muscle wall, bowel with visceral fat and gas pockets, the liver on the patient's right, the
    spleen on the left, two kidneys in perirenal fat, the aorta and IVC, and a vertebra (cortical rim,
    trabecular body, canal, posterior arch) between paraspinal muscles. With probability
    ``lesion_probability`` a hypodense lesion sits in the liver.

    Args:
        shape: (x, y) or (x, y, z) voxel counts, each >= 16.
        rng: source of all randomness.
        lesion_probability: chance of a liver lesion, in [0, 1].
        noise_std_hu: standard deviation of the additive Gaussian noise, in HU.
        lesion_size: scale of the lesion's axes (1: 4-8 % of the body's half-width).

    Returns:
        The phantom; ``modality`` is ``"ct"``.
    """
    shape = _check_shape(shape)
    _check_range("lesion_probability", lesion_probability, 0.0, 1.0)
    _check_range("noise_std_hu", noise_std_hu, 0.0)
    _check_range("lesion_size", lesion_size, 0.1, 5.0)
    coords = _normalised_grid(shape)
    part = _CT_INDEX
    inf = np.inf

    # 1. Draw every random parameter, in a fixed order.
    body_centre = (rng.uniform(-0.03, 0.03), rng.uniform(-0.05, 0.02), 0.0)
    body_angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    body_scale = rng.uniform(0.88, 1.0)
    body_axes = (rng.uniform(0.84, 0.94), rng.uniform(0.58, 0.68), inf)
    fat_thickness = rng.uniform(0.05, 0.11)
    wall_thickness = rng.uniform(0.035, 0.05)
    liver_centre = rng.uniform((-0.42, -0.14, -0.1), (-0.32, -0.02, 0.2))
    liver_axes = rng.uniform((0.32, 0.28, 0.45), (0.40, 0.36, 0.60))
    liver_angle = rng.uniform(-0.35, 0.05)
    kidney_centre = rng.uniform((0.27, 0.20, -0.25), (0.33, 0.28, -0.05))
    kidney_axes = rng.uniform((0.075, 0.12, 0.25), (0.095, 0.15, 0.35))
    kidney_angle = rng.uniform(0.3, 0.6)
    spleen_centre = rng.uniform((0.42, 0.02, 0.0), (0.52, 0.14, 0.25))
    spleen_axes = rng.uniform((0.08, 0.16, 0.25), (0.12, 0.22, 0.35))
    spleen_angle = rng.uniform(-0.7, -0.4)
    spine_y = rng.uniform(0.24, 0.30)
    vertebra_radius = rng.uniform(0.09, 0.11)
    cortex_fraction = rng.uniform(0.70, 0.80)
    gas_count = rng.integers(0, _MAX_GAS_POCKETS + 1)
    gas_centres = rng.uniform((-0.05, -0.45, -0.3), (0.55, -0.10, 0.3), size=(_MAX_GAS_POCKETS, 3))
    gas_radii = rng.uniform(0.025, 0.05, size=_MAX_GAS_POCKETS)
    hu = {name: rng.uniform(low, high) for name, (low, high) in _CT_HU_RANGES.items()}
    has_lesion = rng.random() < lesion_probability
    lesion_axes = rng.uniform(0.04, 0.08, size=3) * lesion_size
    lesion_angle = rng.uniform(0.0, np.pi)
    lesion_pick = rng.random()
    mesentery = _smooth_noise(shape, rng, correlation=0.05)
    noise = rng.standard_normal(shape)

    # 2. Anatomy, painted from outside in; organs over the bowel, bone last.
    body = _axial_frame(coords, body_centre, body_angle, body_scale)
    body_radius = _ellipsoid_radius(body, (0.0, 0.0, 0.0), body_axes)
    # Shells at constant thickness: shrink the semi-axes rather than the normalised radius, so the
    # fat layer is not twice as thick at the flanks as in front.
    wall_axes = (body_axes[0] - fat_thickness, body_axes[1] - fat_thickness, inf)
    cavity_axes = (wall_axes[0] - wall_thickness, wall_axes[1] - wall_thickness, inf)
    tissue = np.full(shape, part["air"], dtype=np.uint8)
    tissue = _paint(tissue, body_radius < 1.0, part["fat"])
    tissue = _paint(tissue, _ellipsoid_radius(body, (0.0, 0.0, 0.0), wall_axes) < 1.0, part["muscle"])
    cavity = _ellipsoid_radius(body, (0.0, 0.0, 0.0), cavity_axes) < 1.0
    tissue = _paint(tissue, cavity, part["bowel"])
    # Visceral fat between the bowel loops: the high tail of a smooth random field.
    tissue = _paint(tissue, cavity & (mesentery > 0.8), part["fat"])
    for centre, size in zip(gas_centres[:gas_count], gas_radii[:gas_count]):
        pocket = _ellipsoid_radius(body, centre, (size, 0.8 * size, 2.0 * size)) < 1.0
        tissue = _paint(tissue, cavity & pocket, part["air"])
    for side in (-1.0, 1.0):
        paraspinal = _ellipsoid_radius(body, (side * 0.13, spine_y + 0.17, 0.0), (0.09, 0.09, inf))
        tissue = _paint(tissue, paraspinal < 1.0, part["muscle"])
    # Solid organs abut the abdominal wall but do not cross it.
    liver = _ellipsoid_radius(body, liver_centre, liver_axes, liver_angle)
    tissue = _paint(tissue, cavity & (liver < 1.0), part["liver"])
    spleen = _ellipsoid_radius(body, spleen_centre, spleen_axes, spleen_angle)
    tissue = _paint(tissue, cavity & (spleen < 1.0), part["spleen"])
    for side in (-1.0, 1.0):
        centre = (side * kidney_centre[0], kidney_centre[1], kidney_centre[2])
        kidney = _ellipsoid_radius(body, centre, kidney_axes, -side * kidney_angle)
        # Perirenal fat sets the kidney off from the bowel, whose HU it shares.
        tissue = _paint(tissue, cavity & (kidney < 1.4), part["fat"])
        tissue = _paint(tissue, cavity & (kidney < 1.0), part["kidney"])
    aorta = _ellipsoid_radius(body, (0.05, spine_y - 0.15, 0.0), (0.045, 0.045, inf))
    vena_cava = _ellipsoid_radius(body, (-0.08, spine_y - 0.14, 0.0), (0.05, 0.035, inf))
    tissue = _paint(tissue, (aorta < 1.0) | (vena_cava < 1.0), part["blood"])
    vertebra = _ellipsoid_radius(body, (0.0, spine_y, 0.0), (vertebra_radius, 0.9 * vertebra_radius, inf))
    arch = _ellipsoid_radius(body, (0.0, spine_y + 0.17, 0.0), (0.10, 0.06, inf))
    spinous = _ellipsoid_radius(body, (0.0, spine_y + 0.26, 0.0), (0.02, 0.07, inf))
    canal = _ellipsoid_radius(body, (0.0, spine_y + 0.15, 0.0), (0.04, 0.035, inf))
    tissue = _paint(tissue, (vertebra < 1.0) | (arch < 1.0) | (spinous < 1.0), part["cortical_bone"])
    tissue = _paint(tissue, vertebra < cortex_fraction, part["trabecular_bone"])
    tissue = _paint(tissue, canal < 1.0, part["spinal_canal"])

    # 3. Lesion, centred on a voxel deep in the liver so it is never empty when drawn.
    if has_lesion:
        in_liver = tissue == part["liver"]
        centre = _pick_voxel(in_liver & (liver < 0.7), in_liver, lesion_pick, body)
        if centre is not None:
            lesion = _ellipsoid_radius(body, centre, lesion_axes, lesion_angle) < 1.0
            tissue = _paint(tissue, lesion & in_liver, part["lesion"])

    # 4. Hounsfield units and labels through lookup tables, then quantum noise (Gaussian is the usual
    # approximation at these doses), clipped at the scanner floor.
    hu_lookup = np.array([hu[name] for name, _ in _CT_COMPARTMENTS])
    label_lookup = np.array([CT_LABELS[label] for _, label in _CT_COMPARTMENTS], dtype=np.uint8)
    image = np.maximum(hu_lookup[tissue] + noise_std_hu * noise, _CT_FLOOR_HU)
    label_map = label_lookup[tissue]
    return Phantom(
        image=image.astype(np.float32),
        labels=label_map,
        class_label=int(np.any(label_map == CT_LABELS["lesion"])),
        modality="ct",
    )


# ----------------------------------------------------------------------------- registry

_PHANTOM_GENERATORS: dict[str, Callable[..., Phantom]] = {
    "brain_mri": brain_mri_phantom,
    "body_ct": body_ct_phantom,
}


def generate_phantom(kind: str, shape: tuple[int, ...], seed: int, **kwargs: Any) -> Phantom:
    """Make one phantom of ``kind`` from ``np.random.default_rng(seed)``.

    Args:
        kind: one of :data:`PHANTOM_KINDS`.
        shape: (x, y) or (x, y, z) voxel counts, each >= 16.
        seed: seed of the generator; the same kind, shape, seed and options give identical arrays.
        **kwargs: keyword options of the kind's generator (:func:`brain_mri_phantom`,
            :func:`body_ct_phantom`).

    Returns:
        The phantom.

    Raises:
        MedsynthError: unknown kind or option, or a bad shape or option value.
    """
    if kind not in _PHANTOM_GENERATORS:
        raise MedsynthError(f"unknown phantom kind {kind!r}; allowed: {', '.join(PHANTOM_KINDS)}")
    generator = _PHANTOM_GENERATORS[kind]
    options = [p.name for p in inspect.signature(generator).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise MedsynthError(
            f"unknown option(s) {', '.join(unknown)} for phantom kind {kind!r}; allowed: {', '.join(options)}"
        )
    return generator(shape, np.random.default_rng(seed), **kwargs)
