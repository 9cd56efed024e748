"""Tests for medsynth.metrics.features and medsynth.training.feature_network: set metrics on known
Gaussians, the self-trained feature network on phantoms (degradation, determinism, 2.5D), the network
file and user ResNet weights."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from monai.networks.nets.resnet import ResNetFeatures
from scipy import ndimage

from medsynth.data.phantoms import generate_phantom
from medsynth.errors import MedsynthError
from medsynth.metrics.features import (
    PLANES,
    FeatureNetwork,
    feature_fidelity,
    feature_network_from_file,
    fid,
    kernel_mmd,
    load_feature_network,
    plane_slices,
    precision_recall,
    save_feature_network,
)
from medsynth.training.feature_network import train_feature_network

torch.set_num_threads(1)

METRICS = ("fid", "precision", "recall", "mmd")
# A small, quick network for tests: width 8 (32 features), batch 16.
TINY = {"width": 8, "batch_size": 16}


def brain_images(n: int, shape: tuple[int, ...], *, first_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` brain MRI phantoms (n, 1, *shape) scaled to [-1, 1] by their foreground 99.5th percentile, and
    their classes."""
    images, classes = [], []
    for seed in range(first_seed, first_seed + n):
        phantom = generate_phantom("brain_mri", shape, seed=seed)
        high = np.percentile(phantom.image[phantom.image > 0.1 * np.percentile(phantom.image, 99)], 99.5)
        images.append(np.clip(2 * phantom.image / high - 1, -1, 1))
        classes.append(phantom.class_label)
    return np.stack(images)[:, None].astype(np.float32), np.array(classes)


def smooth_volumes(n: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Random smooth volumes (n, 1, *shape) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    volumes = ndimage.gaussian_filter(rng.normal(size=(n, 1, *shape)), sigma=(0, 0, 2, 2, 2))
    return np.tanh(volumes / volumes.std()).astype(np.float32)


# --- set metrics on known Gaussians -----------------------------------------------------------------


def direct_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def direct_kid_mmd(a: np.ndarray, b: np.ndarray) -> float:
    d = a.shape[1]
    kernel = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    kaa, kbb, kab = kernel(a, a), kernel(b, b), kernel(a, b)
    m, n = len(a), len(b)
    return float(
        (kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1)) - 2 * kab.mean()
    )


def direct_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019 eq. 1-2 as loops."""

    def inside(query: np.ndarray, support: np.ndarray) -> float:
        radii = [sorted(np.linalg.norm(support - s, axis=1))[k] for s in support]  # [0] is the sample itself
        return float(np.mean([any(np.linalg.norm(q - s) <= r for s, r in zip(support, radii)) for q in query]))

    return inside(fake, real), inside(real, fake)


def test_fid_equals_a_direct_sqrtm_computation() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.5
    assert fid(a, b) == pytest.approx(direct_fid(a, b), rel=1e-8)
    # Fewer samples than dimensions: rank-deficient covariances, still a finite distance.
    few_a, few_b = rng.normal(size=(5, 12)), rng.normal(size=(6, 12)) + 1.0
    assert np.isfinite(fid(few_a, few_b)) and fid(few_a, few_b) > 0


def test_same_distribution_scores_as_identical() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(1000, 4)), rng.normal(size=(1000, 4))
    assert fid(a, b) < 0.05
    precision, recall = precision_recall(a, b)
    assert precision > 0.9 and recall > 0.9
    assert abs(kernel_mmd(a, b)) < 0.02
    assert fid(a, a) == pytest.approx(0.0, abs=1e-9)


def test_shifted_mean_gives_the_closed_form_fid_and_lower_precision() -> None:
    rng = np.random.default_rng(2)
    real, same = rng.normal(size=(1000, 4)), rng.normal(size=(1000, 4))
    shift = np.array([3.0, 0.0, 0.0, 0.0])
    # Equal covariances (the same samples, shifted): the Frechet distance is ||mu_r - mu_f||^2 = 9.
    assert fid(real, real + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    fake = rng.normal(size=(1000, 4)) + shift
    assert fid(real, fake) == pytest.approx(float(shift @ shift), abs=0.8)  # about 3 sampling standard deviations
    assert precision_recall(real, fake)[0] < precision_recall(real, same)[0] - 0.15
    assert kernel_mmd(real, fake) > 1.0 > abs(kernel_mmd(real, same))


def test_one_mode_of_two_has_high_precision_low_recall() -> None:
    rng = np.random.default_rng(3)
    mode = np.array([6.0, 0.0, 0.0])
    real = np.concatenate([rng.normal(size=(400, 3)) + mode, rng.normal(size=(400, 3)) - mode])
    fake = rng.normal(size=(400, 3)) + mode
    precision, recall = precision_recall(real, fake)
    assert precision > 0.9
    assert recall < 0.6


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_equal_a_direct_computation(k: int) -> None:
    rng = np.random.default_rng(6)
    real, fake = rng.normal(size=(30, 3)), rng.normal(size=(25, 3)) * 1.3 + 0.4
    assert precision_recall(real, fake, k=k) == direct_precision_recall(real, fake, k)
    # 1D by hand, k = 1: real radii 1, 1, 1, 8; fake radii 1, 1, 3.5, 15.
    assert precision_recall(np.array([[0.0], [1.0], [2.0], [10.0]]), np.array([[0.5], [1.5], [5.0], [20.0]]), k=1) == (
        0.75,
        1.0,
    )


def test_kernel_mmd_equals_a_direct_computation() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(30, 5)) * 1.5 + 0.3
    assert kernel_mmd(a, b) == pytest.approx(direct_kid_mmd(a, b), rel=1e-10)


@pytest.mark.parametrize("metric", [fid, kernel_mmd, precision_recall])
def test_set_metrics_reject_bad_features(metric) -> None:
    good = np.random.default_rng(5).normal(size=(10, 3))
    with pytest.raises(ValueError, match="NaN"):
        metric(good, np.where(np.eye(10, 3) > 0, np.nan, good))
    with pytest.raises(ValueError, match="dimensions differ"):
        metric(good, good[:, :2])
    with pytest.raises(ValueError, match="at least"):
        metric(good, good[:1])


# --- the self-trained network on phantoms -----------------------------------------------------------


@pytest.fixture(scope="module")
def brains() -> dict[str, np.ndarray]:
    train, classes = brain_images(48, (32, 32))
    test, _ = brain_images(48, (32, 32), first_seed=1000)
    return {"train": train, "classes": classes, "test": test}


@pytest.fixture(scope="module")
def brain_network(brains: dict[str, np.ndarray]) -> FeatureNetwork:
    return train_feature_network(brains["train"], None, spatial_dims=2, steps=150, seed=0, **TINY)


def test_features_see_noise_and_blur(brains: dict[str, np.ndarray], brain_network: FeatureNetwork) -> None:
    half_a, half_b = brains["test"][:24], brains["test"][24:]
    noised = half_a + np.random.default_rng(0).normal(0, 0.1, half_a.shape).astype(np.float32)
    blurred = ndimage.uniform_filter(half_a, size=(1, 1, 3, 3))  # a box blur: not the training task's Gaussian
    same = feature_fidelity(half_b, half_a, brain_network, spatial_dims=2)
    assert set(same) == set(METRICS)
    for degraded in (noised, blurred):
        scores = feature_fidelity(half_b, degraded, brain_network, spatial_dims=2)
        assert scores["fid"] > 5 * same["fid"]
        assert scores["mmd"] > same["mmd"] + 0.1
    # A blur this strong leaves the real manifold altogether.
    assert feature_fidelity(half_b, blurred, brain_network, spatial_dims=2)["precision"] < same["precision"] - 0.5


def test_identity_records_the_training(brains: dict[str, np.ndarray], brain_network: FeatureNetwork) -> None:
    identity = brain_network.identity
    assert identity["kind"] == "self_trained" and identity["objective"] == "rotation+degradation"
    assert (identity["steps"], identity["seed"], identity["width"], identity["feature_dim"]) == (150, 0, 8, 32)
    assert len(identity["train_images_sha256"]) == 64 and len(identity["weights_sha256"]) == 64
    assert brain_network.embed(brains["test"], spatial_dims=2).shape == (48, 32)
    assert brain_network.embed(brains["test"], spatial_dims=2).dtype == np.float64


def test_class_labels_add_a_class_head(brains: dict[str, np.ndarray]) -> None:
    labelled = train_feature_network(brains["train"][:16], brains["classes"][:16], spatial_dims=2, steps=2, **TINY)
    assert labelled.identity["objective"] == "rotation+degradation+class" and labelled.identity["num_classes"] == 2
    unlabelled = train_feature_network(brains["train"][:16], np.full(16, -1), spatial_dims=2, steps=2, **TINY)
    assert unlabelled.identity["objective"] == "rotation+degradation" and unlabelled.network.class_head is None


def test_training_is_deterministic(brains: dict[str, np.ndarray]) -> None:
    images, classes = brains["train"][:16], brains["classes"][:16]
    first, again = (train_feature_network(images, classes, spatial_dims=2, steps=15, seed=3, **TINY) for _ in range(2))
    other = train_feature_network(images, classes, spatial_dims=2, steps=15, seed=4, **TINY)
    for name, value in first.network.state_dict().items():
        assert torch.equal(value, again.network.state_dict()[name]), name
    assert first.identity == again.identity
    assert first.identity["weights_sha256"] != other.identity["weights_sha256"]
    assert not torch.equal(
        first.network.state_dict()["trunk.0.conv.weight"], other.network.state_dict()["trunk.0.conv.weight"]
    )
    real, fake = brains["test"][:8], brains["test"][8:16]
    assert feature_fidelity(real, fake, first, spatial_dims=2) == feature_fidelity(real, fake, again, spatial_dims=2)


def test_feature_fidelity_rejects_bad_images(brain_network: FeatureNetwork, brains: dict[str, np.ndarray]) -> None:
    images = brains["test"][:4]
    with pytest.raises(ValueError, match="shapes differ"):
        feature_fidelity(images, images[:, :, :16], brain_network, spatial_dims=2)
    with pytest.raises(ValueError, match="NaN"):
        feature_fidelity(images, np.full_like(images, np.nan), brain_network, spatial_dims=2)
    with pytest.raises(ValueError, match="at least 2 images"):
        feature_fidelity(images, images[:1], brain_network, spatial_dims=2)
    with pytest.raises(ValueError, match="shape"):
        feature_fidelity(images[:, 0], images[:, 0], brain_network, spatial_dims=2)


# --- 3D: 2.5D on three planes ------------------------------------------------------------------------


def test_planes_slice_the_documented_axes() -> None:
    volumes = torch.as_tensor(smooth_volumes(2, (16, 20, 12), seed=0))
    # Central half of Z (12 voxels) is 3..8; two evenly spaced slices there are z = 4 and 7.
    axial = plane_slices(volumes, "axial", 2)
    assert axial.shape == (4, 1, 16, 20)
    assert torch.equal(axial[1], volumes[0, :, :, :, 7]) and torch.equal(axial[2], volumes[1, :, :, :, 4])
    assert plane_slices(volumes, "coronal", 2).shape == (4, 1, 16, 12)
    assert torch.equal(plane_slices(volumes, "sagittal", 100)[0], volumes[0, :, 4])  # all 8 central X slices: 4..11


def test_volumes_are_scored_on_three_planes() -> None:
    volumes = smooth_volumes(6, (16, 20, 12), seed=1)
    network = train_feature_network(volumes, None, spatial_dims=3, steps=6, seed=0, **TINY)
    assert network.identity["spatial_dims"] == 3 and network.identity["network_spatial_dims"] == 2
    features = network.plane_features(volumes, spatial_dims=3, slices_per_plane=4)
    assert list(features) == list(PLANES)
    assert all(f.shape == (6 * 4, 32) for f in features.values())
    embedded = network.embed(volumes, spatial_dims=3, slices_per_plane=4)
    assert embedded.shape == (6, 3 * 32)
    np.testing.assert_allclose(embedded[:, :32], features["axial"].reshape(6, 4, 32).mean(1))
    scores = feature_fidelity(volumes[:3], volumes[3:], network, spatial_dims=3, k=2, slices_per_plane=4)
    assert set(scores) == set(METRICS) | {f"{m}/{p}" for m in METRICS for p in PLANES}
    for metric in METRICS:
        assert scores[metric] == pytest.approx(np.mean([scores[f"{metric}/{p}"] for p in PLANES]))


# --- the network file -------------------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_features(
    tmp_path, brains: dict[str, np.ndarray], brain_network: FeatureNetwork
) -> None:
    path = save_feature_network(brain_network, tmp_path / "features.pt")
    loaded = load_feature_network(path)
    assert loaded.identity == brain_network.identity
    images = brains["test"][:8]
    assert np.array_equal(loaded.embed(images, spatial_dims=2), brain_network.embed(images, spatial_dims=2))
    assert list(tmp_path.iterdir()) == [path]  # the atomic write left no temporary file


class _Payload:
    """Pickles to a call that creates a file: loading must not run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_rejects_missing_garbage_and_pickled_objects(tmp_path) -> None:
    with pytest.raises(MedsynthError, match="missing.pt: feature network file not found"):
        load_feature_network(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(MedsynthError, match="garbage.pt"):
        load_feature_network(garbage)
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "medsynth-feature-network", "identity": {}, "state_dict": _Payload(str(marker))}, evil)
    with pytest.raises(MedsynthError, match="evil.pt"):
        load_feature_network(evil)
    assert not marker.exists()
    bare = tmp_path / "bare.pt"
    torch.save({"weight": torch.zeros(2)}, bare)
    with pytest.raises(MedsynthError, match="bare.pt: not a medsynth feature network file"):
        load_feature_network(bare)


def test_load_rejects_altered_weights(tmp_path, brain_network: FeatureNetwork) -> None:
    path = save_feature_network(brain_network, tmp_path / "features.pt")
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["trunk.0.conv.weight"] += 1.0
    torch.save(blob, path)
    with pytest.raises(MedsynthError, match="weights_sha256"):
        load_feature_network(path)


# --- user-supplied ResNet weights -------------------------------------------------------------------


@pytest.mark.parametrize("resnet_dims", [2, 3])
def test_resnet_weights_from_a_local_file(tmp_path, resnet_dims: int) -> None:
    torch.manual_seed(0)
    weights = tmp_path / f"resnet10_{resnet_dims}d.pth"
    state = ResNetFeatures("resnet10", pretrained=False, spatial_dims=resnet_dims, in_channels=1).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, weights)  # MedicalNet's layout
    network = feature_network_from_file(weights, spatial_dims=resnet_dims)
    assert network.identity["kind"] == "file" and network.identity["resnet_depth"] == 10
    assert network.identity["path"] == str(weights) and len(network.identity["file_sha256"]) == 64
    assert network.identity["feature_dim"] == 512
    volumes = smooth_volumes(3, (16, 20, 12), seed=2)
    if resnet_dims == 2:
        images = volumes[..., 6]
        assert network.embed(images, spatial_dims=2).shape == (3, 512)
        features = network.plane_features(volumes, spatial_dims=3, slices_per_plane=2)
        assert list(features) == list(PLANES) and features["axial"].shape == (6, 512)
        assert network.embed(volumes, spatial_dims=3, slices_per_plane=2).shape == (3, 3 * 512)
    else:
        assert list(network.plane_features(volumes, spatial_dims=3)) == ["3d"]
        assert network.embed(volumes, spatial_dims=3).shape == (3, 512)
        with pytest.raises(ValueError, match="3D feature network cannot embed 2D"):
            network.embed(volumes[..., 6], spatial_dims=2)
    loaded = load_feature_network(save_feature_network(network, tmp_path / "features.pt"))
    assert np.array_equal(
        loaded.embed(volumes, spatial_dims=3, slices_per_plane=2),
        network.embed(volumes, spatial_dims=3, slices_per_plane=2),
    )


def test_resnet_weights_missing_or_wrong(tmp_path) -> None:
    with pytest.raises(MedsynthError, match="nowhere.pth: feature network weights file not found"):
        feature_network_from_file(tmp_path / "nowhere.pth", spatial_dims=2)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(MedsynthError, match="wrong.pth"):
        feature_network_from_file(wrong, spatial_dims=3)
