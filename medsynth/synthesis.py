"""From a trained model to synthetic scans in real units: sample, invert the intensity convention, write."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medsynth.data.transforms import Intensity
from medsynth.diffusion.sampling import generate
from medsynth.diffusion.schedulers import build_sampling_scheduler
from medsynth.errors import MedsynthError
from medsynth.io.nifti import spacing_affine, write_nifti
from medsynth.models.loading import TrainedModel
from medsynth.runtime import DistContext, autocast_dtype, map_sharded, shard


def synthesise(
    trained: TrainedModel,
    *,
    sampler: str,
    steps: int,
    seeds: Sequence[int],
    batch_size: int,
    device: torch.device,
    eta: float = 0.0,
    desc: str = "sample",
    class_labels: Sequence[int] | None = None,
    guidance_scale: float = 1.0,
    decode_roi: list[int] | None = None,
    decode_overlap: float = 0.25,
    controlnet=None,
    label_maps: np.ndarray | None = None,
    conditioning_scale: float = 1.0,
    dist: DistContext | None = None,
) -> tuple[np.ndarray | None, float]:
    """Draw one sample per seed (of the given class, for class-conditional models, with classifier-free
    guidance ``guidance_scale``); returns normalised images ``(N, C, *spatial)`` and the seconds taken.

    A latent model samples latents and decodes them with its autoencoder, one sample at a time, with a
    sliding window of ``decode_roi`` latent voxels when given (bounded memory for large volumes).
    With a ``controlnet`` (:class:`~medsynth.models.controlnet.TrainedControlNet`) sample ``i`` is
    generated from ``label_maps[i]`` (``(N, 1, *image_size)``).

    Under ``torchrun`` (``dist`` with several ranks) sample ``i`` is drawn by rank ``i % world_size``,
    ``batch_size`` samples per rank per round, and rank 0 gathers each round
    (:func:`~medsynth.runtime.map_sharded`): rank 0 gets all ``N`` images, the other ranks
    ``None``. Sample ``i`` depends only on ``seeds[i]`` (its own noise generator), so the images do
    not depend on the number of processes beyond floating-point noise. The seconds are the wall time
    on this rank."""
    if not trained.diffusion.can_sample:
        raise MedsynthError(
            f"{trained.path}: a denoising prior (trained on timesteps below {trained.diffusion.max_train_timestep} "
            "only) cannot sample from pure noise; use it with medsynth denoise"
        )
    if trained.num_classes is None and (class_labels is not None or guidance_scale != 1.0):
        raise MedsynthError(
            f"{trained.path}: classes / guidance_scale need a class-conditional model (trained with model.num_classes)"
        )
    if trained.num_classes is not None and class_labels is None:
        raise MedsynthError(f"{trained.path}: a class-conditional model needs the class of every sample")
    try:
        scheduler = build_sampling_scheduler(
            trained.diffusion,
            sampler=sampler,
            steps=steps,
            spatial_dims=trained.spatial_dims,
            clip=not trained.is_latent,
        )
    except ValueError as exc:
        raise MedsynthError(f"{trained.path}: {exc}") from None
    trained.network.to(device)
    channels = trained.network.in_channels
    if controlnet is not None:
        if label_maps is None or len(label_maps) != len(seeds):
            raise MedsynthError(f"{trained.path}: sampling with a ControlNet needs one label map per sample")
        controlnet.network.to(device)
    dist = dist or DistContext(0, 1, 0, torch.device(device))
    image_shape = (channels, *trained.image_size)

    def draw(part: list[int], bar: tqdm) -> list[np.ndarray]:
        """This rank's samples ``part`` (at most one batch): generate, decode latents, clamp."""
        done_before = bar.n

        def progress(done: int, total: int) -> None:
            bar.n = done_before + done
            bar.refresh()

        labels = None if class_labels is None else [class_labels[i] for i in part]
        batch_wrapper = None
        if controlnet is not None:
            from medsynth.models.controlnet import controlnet_wrapper

            batch_wrapper = controlnet_wrapper(controlnet, label_maps[part], conditioning_scale=conditioning_scale)
        images = generate(
            trained.network,
            scheduler,
            sampler=sampler,
            image_shape=image_shape,
            seeds=[seeds[i] for i in part],
            batch_size=batch_size,
            device=device,
            eta=eta,
            autocast_dtype=autocast_dtype("auto", device),
            callback=progress,
            class_labels=labels,
            guidance_scale=guidance_scale,
            network_wrapper=batch_wrapper,
        )
        if trained.autoencoder is not None:
            from medsynth.models.autoencoder import decode

            images = torch.cat(
                [
                    decode(trained.autoencoder, z[None], roi_size=decode_roi, overlap=decode_overlap, device=device)
                    for z in tqdm(
                        images,
                        desc=f"{desc}: decode",
                        unit="image",
                        dynamic_ncols=True,
                        disable=None if dist.is_main else True,
                    )
                ]
            )
        return list(images.clamp(-1.0, 1.0).numpy())

    steps_per_round = len(scheduler.timesteps)
    rounds = math.ceil(len(shard(len(seeds), dist.rank, dist.world_size)) / batch_size)
    gathered: list[np.ndarray] = []
    started = time.perf_counter()
    # disable=None: bars on a terminal, silence in logs and CI; rank 0 alone shows one.
    with tqdm(
        total=rounds * steps_per_round,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        disable=None if dist.is_main else True,
    ) as bar:
        for pairs in map_sharded(lambda part: draw(part, bar), len(seeds), dist, chunk=batch_size):
            gathered.extend(image for _, image in pairs)
    seconds = time.perf_counter() - started
    return (np.stack(gathered) if dist.is_main else None), seconds


def sample_classes(class_label: int | list[int] | None, count: int, num_classes: int | None) -> list[int] | None:
    """The class of each of ``count`` samples: one class, a list cycled, or (null) every class in turn;
    ``None`` for an unconditional model."""
    if num_classes is None:
        return None
    cycle = (
        list(range(num_classes))
        if class_label is None
        else class_label
        if isinstance(class_label, list)
        else [class_label]
    )
    bad = [c for c in cycle if not 0 <= c < num_classes]
    if bad:
        raise MedsynthError(f"class labels {bad} are outside the model's classes 0..{num_classes - 1}")
    return [int(cycle[i % len(cycle)]) for i in range(count)]


def label_maps_for(path: str | Path | None, fallback: np.ndarray | None, count: int) -> tuple[np.ndarray, list[str]]:
    """``count`` label maps ``(count, 1, *spatial)`` to generate from, cycled: the NIfTI files at ``path``
    (a file or a folder of ``*.nii``/``*.nii.gz``, in the model's voxel order as the label files that
    ``sample`` writes), else ``fallback`` (the held-out cases' maps). Returns the maps and their sources.

    Raises:
        MedsynthError: no label maps, an unreadable file (named).
    """
    from medsynth.io.volumes import read_nifti

    if path is not None:
        path = Path(path)
        if not path.exists():
            raise MedsynthError(f"{path}: controlnet.label_maps not found")
        files = sorted(p for p in path.iterdir() if p.name.endswith((".nii", ".nii.gz"))) if path.is_dir() else [path]
        if not files:
            raise MedsynthError(f"{path}: no NIfTI label maps (.nii / .nii.gz) in the folder")
        maps = [read_nifti(f).array for f in files]
        shapes = {m.shape for m in maps}
        if len(shapes) > 1:
            raise MedsynthError(f"{path}: label maps of different shapes {sorted(shapes)}")
        stack, sources = np.stack(maps)[:, None], [str(f) for f in files]
    elif fallback is not None and len(fallback):
        stack, sources = np.asarray(fallback), [f"held-out label map {i}" for i in range(len(fallback))]
    else:
        raise MedsynthError(
            "no label maps to generate from: the prepared data has none and controlnet.label_maps is not set"
        )
    order = [i % len(stack) for i in range(count)]
    return stack[order], [sources[i] for i in order]


def to_units(images: np.ndarray, intensity: dict) -> np.ndarray:
    """Normalised [-1, 1] images back to the training data's units (HU for CT)."""
    return np.asarray(
        Intensity(intensity["modality"], float(intensity["low"]), float(intensity["high"])).inverse(images),
        dtype=np.float32,
    )


def write_scan(
    path: str | Path, image_units: np.ndarray, spacing: Sequence[float], *, modality: str, description: str
) -> Path:
    """One synthetic scan (spatial axes only) as NIfTI: CT as int16 HU, MR as float32."""
    data = np.rint(image_units).astype(np.int16) if modality == "ct" else image_units.astype(np.float32)
    return write_nifti(path, data, spacing_affine(list(spacing), image_units.shape), description=description)
