"""Feature-based fidelity of a synthetic set, with a feature network that needs no download.

FID-style metrics compare two image sets in the feature space of a network. The usual Inception-v3
features are a download and know nothing of scans, so medsynth either trains a small network itself
on the real training images (:func:`medsynth.training.feature_network.train_feature_network`, with the
self-supervised objective whose pieces are here) or reads a user-supplied local MONAI ResNet /
MedicalNet state dict (:func:`feature_network_from_file`).

Images are float arrays or tensors ``(N, C, *spatial)`` in ``[-1, 1]``, ``spatial_dims`` 2 or 3. A 2D
network serves 3D volumes as "2.5D": slices along the three orthogonal planes of :data:`PLANES`, each
plane scored on its own and the headline value the mean over planes.

Sections: planes and slices -> networks -> :class:`FeatureNetwork` -> the self-supervised objective
(rotations, degradations, their losses) -> the network file -> set metrics on feature vectors
(:func:`fid`, :func:`precision_recall`, :func:`kernel_mmd`) -> :func:`feature_fidelity`.

Usage (``train_feature_network`` from :mod:`medsynth.training.feature_network`)::

    network = train_feature_network(real_train, classes, spatial_dims=2, seed=0)
    save_feature_network(network, "features.pt")
    scores = feature_fidelity(real_test, synthetic, network, spatial_dims=2)  # {"fid", "precision", "recall", "mmd"}

Inputs that cannot be compared raise a plain :class:`ValueError` (as in :mod:`medsynth.metrics.fidelity`);
files the user can fix raise :class:`~medsynth.errors.MedsynthError`.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import FIDMetric
from monai.networks.blocks import Convolution
from monai.networks.nets.resnet import ResNetFeatures
from torch import nn

from medsynth.errors import MedsynthError
from medsynth.io.atomic import file_digest
from medsynth.io.state import load_state, save_state
from medsynth.models.autoencoder import _load_local_weights, _zscore

# Arrays are in RAS voxel order (X, Y, Z): an axial slice is one index along Z (array axis 2), a
# coronal one along Y (axis 1), a sagittal one along X (axis 0).
PLANES = ("axial", "coronal", "sagittal")
PLANE_AXES = {"axial": 2, "coronal": 1, "sagittal": 0}
FEATURE_NETWORK_FORMAT = "medsynth-feature-network"
# Self-supervised task: which of the four rotations by k * 90 degrees was applied (Gidaris et al. 2018).
ROTATIONS = 4
# Second self-supervised task: which degradation, of random strength, was applied.
DEGRADATIONS = ("none", "gaussian_noise", "gaussian_blur")
NOISE_STD_RANGE = (0.02, 0.2)  # in the [-1, 1] intensity units
BLUR_SIGMA_RANGE = (0.5, 1.5)  # in pixels
# Rows of a distance or kernel matrix computed at once, to bound memory on large sets.
_ROWS_PER_BLOCK = 1024


# --- planes and slices ------------------------------------------------------------------------------


def central_range(size: int) -> tuple[int, int]:
    """``[lo, hi)``: the central half of an axis of ``size`` voxels (all of it when it is tiny).

    Slices near the edges of a scan are mostly air; both training and scoring use the central half.
    """
    return size // 4, size - size // 4


def central_slices(size: int, count: int) -> np.ndarray:
    """At most ``count`` distinct, evenly spaced slice indices (bin centres) in the central half."""
    lo, hi = central_range(size)
    if count >= hi - lo:
        return np.arange(lo, hi)
    return lo + np.floor((np.arange(count) + 0.5) * (hi - lo) / count).astype(np.int64)


def plane_slices(volumes: torch.Tensor, plane: str, slices_per_plane: int) -> torch.Tensor:
    """2D slices ``(N * S, C, h, w)`` of volumes ``(N, C, X, Y, Z)`` along ``plane``, image-major.

    The slice keeps the two other axes in order: axial (X, Y), coronal (X, Z), sagittal (Y, Z).
    """
    axis = 2 + PLANE_AXES[plane]
    index = torch.as_tensor(central_slices(volumes.shape[axis], slices_per_plane))
    picked = volumes.index_select(axis, index).movedim(axis, 1)  # (N, S, C, h, w)
    return picked.reshape(-1, *picked.shape[2:])


# --- networks ---------------------------------------------------------------------------------------


class SelfSupervisedFeatures(nn.Module):
    """A 2D trunk of MONAI convolution blocks (as :func:`medsynth.metrics.classifier.build_classifier`)
    with a global average pool; ``forward`` returns the pooled features ``(B, 4 * width)``.

    The heads (rotation, degradation, optional class) are used in training only. The blocks have no
    normalisation layer: instance norm (the classifier's choice) rescales every image to zero mean and
    unit variance per channel and so hides a wrong brightness or contrast from the metric (measured:
    intensities times 0.9 left the FID unchanged), and batch norm would tie a sample's features to its
    batch. The average pool (not the classifier's max pool) summarises the whole image, as FID's
    Inception pool does: a set metric should see texture and anatomy everywhere, not only the strongest
    local finding.
    """

    def __init__(self, in_channels: int, width: int = 16, num_classes: int = 0) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int) -> Convolution:
            return Convolution(2, i, o, strides=stride, kernel_size=3, act="PRELU", norm=None)

        self.trunk = nn.Sequential(
            block(in_channels, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 4 * width, 2),
            block(4 * width, 4 * width, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.rotation_head = nn.Linear(4 * width, ROTATIONS)
        self.degradation_head = nn.Linear(4 * width, len(DEGRADATIONS))
        self.class_head = nn.Linear(4 * width, num_classes) if num_classes >= 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


class PooledResNetFeatures(nn.Module):
    """A frozen MONAI ResNet (MedicalNet layout); features = global average pool of its last block.

    Every image channel is z-scored and embedded on its own (the ResNet takes one channel, as in
    :func:`medsynth.models.autoencoder.perceptual_loss`); the channel features are concatenated.
    """

    def __init__(self, spatial_dims: int, depth: int) -> None:
        super().__init__()
        self.resnet = ResNetFeatures(f"resnet{depth}", pretrained=False, spatial_dims=spatial_dims, in_channels=1)
        self.resnet.eval().requires_grad_(False)
        self.feature_dim = [m for m in self.resnet.layer4.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))][
            -1
        ].num_features

    def train(self, mode: bool = True) -> PooledResNetFeatures:
        """Always in eval mode: its batch-norm statistics are part of the pretrained weights."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        last = self.resnet(_zscore(x.reshape(-1, 1, *x.shape[2:])))[-1]
        return last.mean(dim=tuple(range(2, last.ndim))).reshape(n, -1)


def state_sha256(network: nn.Module) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes, in key order (deterministic)."""
    sha = hashlib.sha256()
    for name, value in network.state_dict().items():
        value = value.detach().cpu().contiguous()
        sha.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        sha.update(value.numpy().tobytes())
    return sha.hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """sha256 over an array's dtype, shape and bytes (what a network was trained on, or a run's data)."""
    sha = hashlib.sha256(f"{array.dtype}:{array.shape};".encode())
    sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


def image_tensor(name: str, images: np.ndarray | torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """``images`` as a float32 CPU tensor; ValueError unless finite ``(N, C, *spatial)``."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    x = (
        images.detach().cpu().float()
        if isinstance(images, torch.Tensor)
        else torch.as_tensor(np.asarray(images, dtype=np.float32))
    )
    if x.ndim != spatial_dims + 2:
        axes = ", ".join("XYZ"[:spatial_dims])
        raise ValueError(
            f"{name} must have shape (N, C, {axes}) for spatial_dims={spatial_dims}, got shape {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


# --- the feature network ----------------------------------------------------------------------------


@dataclass
class FeatureNetwork:
    """A feature network and what it is.

    Attributes:
        network: the module mapping images ``(B, C, *spatial)`` to features ``(B, D)``: a 2D
            :class:`SelfSupervisedFeatures` ("self_trained"), or a :class:`PooledResNetFeatures` of
            spatial_dims 2 or 3 ("file").
        identity: JSON-able record of the network (kind, objective, seed, digests, feature_dim, ...).
    """

    network: nn.Module
    identity: dict

    @torch.no_grad()
    def plane_features(
        self,
        images: np.ndarray | torch.Tensor,
        *,
        spatial_dims: int,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        slices_per_plane: int = 8,
    ) -> dict[str, np.ndarray]:
        """Feature samples for set metrics, float64.

        2D images: ``{"2d": (N, D)}``. Volumes and a 2D network (2.5D): ``{"axial": (N * S, D),
        "coronal": ..., "sagittal": ...}``, each slice one sample, ``S = min(slices_per_plane, slices
        in the central half)`` evenly spaced slices. Volumes and a 3D network: ``{"3d": (N, D)}``.
        """
        x = image_tensor("images", images, spatial_dims)
        if slices_per_plane < 1:
            raise ValueError(f"slices_per_plane must be >= 1, got {slices_per_plane}")
        channels = self.identity.get("in_channels")
        if channels is not None and x.shape[1] != channels:
            raise ValueError(f"the feature network takes {channels} channel(s), images have {x.shape[1]}")
        network_dims = int(self.identity["network_spatial_dims"])
        self.network.to(device).eval()

        def run(batch: torch.Tensor) -> torch.Tensor:
            return torch.cat(
                [
                    self.network(batch[i : i + batch_size].to(device)).double().cpu()
                    for i in range(0, len(batch), batch_size)
                ]
            )

        if network_dims == spatial_dims:
            return {f"{spatial_dims}d": run(x).numpy()}
        if network_dims == 2 and spatial_dims == 3:
            # Slice a few volumes at a time: all slices of a large set at once would not fit in memory.
            step = max(1, batch_size // slices_per_plane)
            return {
                plane: torch.cat(
                    [run(plane_slices(x[i : i + step], plane, slices_per_plane)) for i in range(0, len(x), step)]
                ).numpy()
                for plane in PLANES
            }
        raise ValueError(f"a {network_dims}D feature network cannot embed {spatial_dims}D images")

    def embed(
        self,
        images: np.ndarray | torch.Tensor,
        *,
        spatial_dims: int,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        slices_per_plane: int = 8,
    ) -> np.ndarray:
        """One feature vector per image, ``(N, D)`` float64.

        Volumes and a 2D network (2.5D): per plane the mean feature over its slices (see
        :meth:`plane_features`), the planes concatenated in :data:`PLANES` order: ``(N, 3 * D)``.
        """
        features = self.plane_features(
            images, spatial_dims=spatial_dims, batch_size=batch_size, device=device, slices_per_plane=slices_per_plane
        )
        n = len(images)
        return np.concatenate([f.reshape(n, -1, f.shape[1]).mean(axis=1) for f in features.values()], axis=1)


# --- the self-supervised objective ------------------------------------------------------------------
# The pure pieces of the feature network's training objective (the loop is
# medsynth.training.feature_network). Every random draw comes from the generator passed in, on its device,
# and the images are on that device too.


def random_slices(volumes: torch.Tensor, index: torch.Tensor, plane: str, generator: torch.Generator) -> torch.Tensor:
    """One random central-half slice along ``plane`` of each volume ``volumes[index]``: ``(B, C, h, w)``."""
    axis = PLANE_AXES[plane]
    lo, hi = central_range(volumes.shape[2 + axis])
    where = torch.randint(lo, hi, (len(index),), generator=generator, device=generator.device)
    picked = volumes[index].movedim(2 + axis, 1)  # (B, S, C, h, w): the other two axes keep their order
    return picked[torch.arange(len(index), device=picked.device), where]


def random_square_crops(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random square crop (side = the shorter side) of each image, so that 90-degree rotations keep its shape."""
    h, w = batch.shape[-2:]
    side = min(h, w)
    if h == w:
        return batch
    top = torch.randint(0, h - side + 1, (len(batch),), generator=generator, device=generator.device)
    left = torch.randint(0, w - side + 1, (len(batch),), generator=generator, device=generator.device)
    return torch.stack([b[:, t : t + side, s : s + side] for b, t, s in zip(batch, top.tolist(), left.tolist())])


def gaussian_blur(batch: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each image ``(B, C, h, w)`` with its own ``sigma`` (pixels), edges replicated."""
    b, c, h, w = batch.shape
    radius = int(np.ceil(3 * float(sigmas.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=batch.dtype, device=batch.device)
    kernels = torch.exp(-0.5 * (offsets[None] / sigmas[:, None].to(batch.dtype)) ** 2)
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B * C, k)
    x = nn.functional.pad(batch.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    x = nn.functional.conv2d(x, kernels[:, None, :, None], groups=b * c)
    x = nn.functional.conv2d(x, kernels[:, None, None, :], groups=b * c)
    return x.reshape(b, c, h, w)


def random_degradations(batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image left alone, noised or blurred (:data:`DEGRADATIONS`, of random strength); returns the
    images and the kinds."""
    kinds = torch.randint(0, len(DEGRADATIONS), (len(batch),), generator=generator, device=batch.device)
    strength = torch.rand(len(batch), generator=generator, device=batch.device)
    noise = torch.randn(batch.shape, generator=generator, device=batch.device)
    std = NOISE_STD_RANGE[0] + strength * (NOISE_STD_RANGE[1] - NOISE_STD_RANGE[0])
    sigma = BLUR_SIGMA_RANGE[0] + strength * (BLUR_SIGMA_RANGE[1] - BLUR_SIGMA_RANGE[0])
    shape = (-1, *[1] * (batch.ndim - 1))
    noised = batch + std.view(shape) * noise
    blurred = gaussian_blur(batch, sigma)
    out = torch.where((kinds == 1).view(shape), noised, torch.where((kinds == 2).view(shape), blurred, batch))
    return out, kinds


def random_rotations(batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each square image rotated by k * 90 degrees, k drawn at random (Gidaris et al. 2018); returns the
    images and k."""
    turns = torch.randint(0, ROTATIONS, (len(batch),), generator=generator, device=batch.device)
    return torch.stack([torch.rot90(b, k, dims=(1, 2)) for b, k in zip(batch, turns.tolist())]), turns


def pretext_batch(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs of the two self-supervised tasks from 2D images ``(B, C, h, w)``: a random square crop,
    then a random degradation, then a random rotation. Returns the images, the rotations (k) and the
    degradation kinds (indices into :data:`DEGRADATIONS`)."""
    batch = random_square_crops(images, generator)
    batch, degraded = random_degradations(batch, generator)
    batch, turns = random_rotations(batch, generator)
    return batch, turns, degraded


def pretext_losses(
    network: SelfSupervisedFeatures,
    batch: torch.Tensor,
    turns: torch.Tensor,
    degraded: torch.Tensor,
    classes: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The cross-entropies of the rotation head and the degradation head, and of the class head over the
    labelled images (``classes >= 0``) when the network has one and the batch holds any."""
    features = network(batch)
    losses = {
        "rotation": nn.functional.cross_entropy(network.rotation_head(features), turns),
        "degradation": nn.functional.cross_entropy(network.degradation_head(features), degraded),
    }
    labelled = classes >= 0
    if network.class_head is not None and labelled.any():
        losses["class"] = nn.functional.cross_entropy(network.class_head(features[labelled]), classes[labelled])
    return losses


# --- the network file -------------------------------------------------------------------------------


def feature_network_from_file(weights_path: str | Path, *, spatial_dims: int, depth: int = 10) -> FeatureNetwork:
    """A frozen MONAI ResNet (``resnet{depth}``, MedicalNet layout) from a local state dict file.

    The file is read by :func:`medsynth.models.autoencoder._load_local_weights` (``weights_only=True``;
    bare or ``{"state_dict": ...}``, a ``module.`` prefix removed). A 2D network scores volumes 2.5D.

    Raises:
        MedsynthError: the file is missing, unreadable or does not fit the ResNet (the message names it).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    path = Path(weights_path)
    if not path.is_file():
        raise MedsynthError(f"{path}: feature network weights file not found (medsynth never downloads weights)")
    network = PooledResNetFeatures(spatial_dims, depth)
    _load_local_weights(
        network.resnet, path, keys=("evaluate.features.weights", "evaluate.features.depth"), what="feature ResNet"
    )
    identity = {
        "kind": "file",
        "objective": "pretrained",
        "path": str(path),
        "file_sha256": file_digest(path),
        "resnet_depth": depth,
        "network_spatial_dims": spatial_dims,
        "weights_sha256": state_sha256(network),
        "feature_dim": network.feature_dim,
    }
    return FeatureNetwork(network, identity)


def save_feature_network(fn: FeatureNetwork, path: str | Path) -> Path:
    """Write the state dict and identity atomically; :func:`load_feature_network` reads it with
    ``weights_only=True``."""
    blob = {
        "format": FEATURE_NETWORK_FORMAT,
        "identity": fn.identity,
        "state_dict": {k: v.detach().cpu().clone() for k, v in fn.network.state_dict().items()},
    }
    return save_state(path, blob)


def load_feature_network(path: str | Path) -> FeatureNetwork:
    """Read a file written by :func:`save_feature_network` (``weights_only=True``: nothing in it is executed).

    Raises:
        MedsynthError: the file is missing, unreadable, not a feature network file or its weights do
            not match its recorded digest.
    """
    path = Path(path)
    blob = load_state(path, expected_format=FEATURE_NETWORK_FORMAT, what="feature network")
    if (
        not isinstance(blob.get("identity"), dict)
        or not isinstance(blob.get("state_dict"), dict)
        or not all(isinstance(v, torch.Tensor) for v in blob["state_dict"].values())
    ):
        raise MedsynthError(
            f"{path}: not a medsynth feature network file "
            f"(expected format {FEATURE_NETWORK_FORMAT!r} with identity and state_dict)"
        )
    identity: dict[str, Any] = blob["identity"]
    try:
        if identity["kind"] == "self_trained":
            network: nn.Module = SelfSupervisedFeatures(
                int(identity["in_channels"]), int(identity["width"]), int(identity["num_classes"])
            )
        elif identity["kind"] == "file":
            network = PooledResNetFeatures(int(identity["network_spatial_dims"]), int(identity["resnet_depth"]))
        else:
            raise MedsynthError(
                f"{path}: unknown feature network kind {identity['kind']!r}; allowed: self_trained, file"
            )
        network.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise MedsynthError(
            f"{path}: feature network file does not fit its recorded identity ({str(exc).splitlines()[0][:160]})"
        ) from None
    network.eval().requires_grad_(False)
    if state_sha256(network) != identity.get("weights_sha256"):
        raise MedsynthError(
            f"{path}: feature network weights do not match their recorded weights_sha256 (file altered or corrupt)"
        )
    return FeatureNetwork(network, identity)


# --- set metrics on feature vectors -----------------------------------------------------------------


def _check_features(real: np.ndarray, fake: np.ndarray, *, minimum: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets as float64 tensors; ValueError unless finite ``(N, D)`` with the same D and >= ``minimum`` rows."""
    out = []
    for name, array in (("real", real), ("fake", fake)):
        x = torch.as_tensor(np.asarray(array, dtype=np.float64))
        if x.ndim != 2:
            raise ValueError(f"{name} features must have shape (N, D), got {tuple(x.shape)}")
        if len(x) < minimum:
            raise ValueError(f"{name} features need at least {minimum} samples, got {len(x)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} features contain NaN or infinite values")
        out.append(x)
    if out[0].shape[1] != out[1].shape[1]:
        raise ValueError(f"real and fake feature dimensions differ: {out[0].shape[1]} vs {out[1].shape[1]}")
    return out[0], out[1]


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, eq. 6), via
    MONAI's :class:`~monai.metrics.FIDMetric`, in float64.

    ``||mu_r - mu_f||² + tr(S_r + S_f - 2 (S_r S_f)^½)``. With fewer samples than feature dimensions the
    covariances are rank-deficient but the distance is still defined (the square root of a product of
    positive semi-definite matrices exists); it is then strongly biased upwards, so compare only values
    computed from the same numbers of samples.
    """
    x, y = _check_features(real, fake)
    with warnings.catch_warnings():
        # MONAI 1.6 passes scipy's deprecated ``disp`` argument to sqrtm; the result is unaffected.
        warnings.filterwarnings("ignore", message=".*disp.*", category=DeprecationWarning)
        value = float(FIDMetric()(y, x))
    # The trace terms cancel to a tiny negative for (nearly) identical sets; a distance is >= 0.
    return max(value, 0.0)


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every sample to its k-th nearest neighbour in its own set (itself excluded)."""
    return torch.cat(
        [
            torch.cdist(x[i : i + _ROWS_PER_BLOCK], x).kthvalue(k + 1, dim=1).values
            for i in range(0, len(x), _ROWS_PER_BLOCK)
        ]
    )


def _inside_manifold(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``query`` within the k-NN ball of at least one ``support`` sample."""
    inside = [
        (torch.cdist(query[i : i + _ROWS_PER_BLOCK], support) <= radii).any(dim=1)
        for i in range(0, len(query), _ROWS_PER_BLOCK)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1-2).

    Each set's manifold is the union of balls around its samples with radius the distance to the k-th
    nearest neighbour. Precision: fraction of fake samples inside the real manifold (are the fakes
    realistic?); recall: fraction of real samples inside the fake manifold (is the real variety covered?).
    Written here because MONAI has no such metric.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x, y = _check_features(real, fake, minimum=k + 1)
    precision = _inside_manifold(y, x, _knn_radii(x, k))
    recall = _inside_manifold(x, y, _knn_radii(y, k))
    return precision, recall


def _kernel_sums(a: torch.Tensor, b: torch.Tensor, d: int) -> tuple[float, float]:
    """Sum of all entries, and of the diagonal, of the KID kernel matrix ``(a b^T / d + 1)^3``."""
    total, diagonal = 0.0, 0.0
    for i in range(0, len(a), _ROWS_PER_BLOCK):
        block = (a[i : i + _ROWS_PER_BLOCK] @ b.T / d + 1.0) ** 3
        total += float(block.sum())
        diagonal += float(torch.diagonal(block, offset=i).sum())
    return total, diagonal


def kernel_mmd(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased MMD² with the polynomial kernel ``k(x, y) = (x·y / d + 1)³`` of the Kernel Inception
    Distance (Bińkowski et al. 2018, sec. 3; Gretton et al. 2012, eq. 3), on the full sets.

    Written here because MONAI's :class:`~monai.metrics.MMDMetric` has only the linear kernel, which
    compares the set means alone; the cubic kernel also compares second and third moments. Being
    unbiased it is ≈ 0 (and may be slightly negative) for two sets from one distribution.
    """
    x, y = _check_features(real, fake)
    m, n, d = len(x), len(y), x.shape[1]
    xx, xx_diag = _kernel_sums(x, x, d)
    yy, yy_diag = _kernel_sums(y, y, d)
    xy, _ = _kernel_sums(x, y, d)
    return (xx - xx_diag) / (m * (m - 1)) + (yy - yy_diag) / (n * (n - 1)) - 2.0 * xy / (m * n)


# --- all of it --------------------------------------------------------------------------------------


def feature_fidelity(
    real_images: np.ndarray | torch.Tensor,
    fake_images: np.ndarray | torch.Tensor,
    network: FeatureNetwork,
    *,
    spatial_dims: int,
    k: int = 3,
    device: torch.device | str = "cpu",
    slices_per_plane: int = 8,
) -> dict[str, float]:
    """FID, improved precision / recall and kernel MMD of ``fake_images`` against ``real_images``.

    Returns ``{"fid", "precision", "recall", "mmd"}``; volumes scored 2.5D also give each plane's value
    (``"fid/axial"``, ``"precision/coronal"``, ...), and the headline keys are then the means over the
    three planes. Each slice is one sample of its plane.

    Raises:
        ValueError: non-finite images, different shapes (except N), fewer than two images per set, or
            fewer than ``k + 1`` feature samples per set.
    """
    real = image_tensor("real_images", real_images, spatial_dims)
    fake = image_tensor("fake_images", fake_images, spatial_dims)
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(
            f"real and fake image shapes differ: (C, *spatial) {tuple(real.shape[1:])} vs {tuple(fake.shape[1:])}"
        )
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"feature fidelity needs at least 2 images per set, got {len(real)} real and {len(fake)} fake")
    options = {"spatial_dims": spatial_dims, "device": device, "slices_per_plane": slices_per_plane}
    real_features = network.plane_features(real, **options)
    fake_features = network.plane_features(fake, **options)
    per_part = {}
    for part in real_features:
        precision, recall = precision_recall(real_features[part], fake_features[part], k=k)
        per_part[part] = {
            "fid": fid(real_features[part], fake_features[part]),
            "precision": precision,
            "recall": recall,
            "mmd": kernel_mmd(real_features[part], fake_features[part]),
        }
    if len(per_part) == 1:
        return next(iter(per_part.values()))
    scores = {
        name: float(np.mean([per_part[plane][name] for plane in PLANES]))
        for name in ("fid", "precision", "recall", "mmd")
    }
    scores.update(
        {f"{name}/{plane}": per_part[plane][name] for plane in PLANES for name in ("fid", "precision", "recall", "mmd")}
    )
    return scores
