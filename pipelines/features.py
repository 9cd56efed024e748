"""The feature network a pipeline measures fidelity and memorisation with, shared by evaluate and augment.

With ``evaluate.features.network: self_trained`` it is trained (seeded, so every stage that needs it
gets the same weights) on the real training images of the prepare stage; with ``file`` it is a MONAI
ResNet from a local weights file. Its identity (kind, objective, steps, seed, the digest of the images
it learned from, the digest of its weights) is recorded beside every number it produced: feature
metrics are comparable only between runs whose feature network has the same ``weights_sha256``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medsynth.config import Config
from medsynth.errors import MedsynthError

if TYPE_CHECKING:
    from medsynth.metrics.features import FeatureNetwork
    from pipelines.stage import StageContext

FILE_NAME = "feature_network.pt"


def preflight(config: Config) -> None:
    """A weights file named in the config must exist and hold the network's weights before any stage runs."""
    features = config.evaluate.features
    if features.network != "file":
        return
    if not Path(features.weights).is_file():
        raise MedsynthError(
            f"{features.weights}: feature network weights file not found "
            "(evaluate.features.weights; medsynth never downloads weights)"
        )
    from medsynth.metrics.features import feature_network_from_file

    feature_network_from_file(features.weights, spatial_dims=config.data.spatial_dims, depth=features.depth)


def feature_network(ctx: StageContext) -> FeatureNetwork:
    """The run's feature network: the evaluate stage's when it was made the same way, else made here.

    A self-trained network is saved as ``feature_network.pt`` in the stage's folder (and so becomes
    one of its outputs, loadable with ``medsynth.metrics.features.load_feature_network``).
    """
    from medsynth.io.atomic import file_digest
    from medsynth.metrics.features import feature_network_from_file, load_feature_network, save_feature_network
    from medsynth.training.feature_network import train_feature_network

    config, cfg = ctx.config, ctx.config.evaluate.features
    if cfg.network == "file":
        return feature_network_from_file(cfg.weights, spatial_dims=config.data.spatial_dims, depth=cfg.depth)
    cache = ctx.inputs["prepare"] / "cache"
    images_file = cache / "train_images.npy"
    wanted = {
        "kind": "self_trained",
        "steps": cfg.steps,
        "seed": config.seed,
        "width": cfg.width,
        "train_images_sha256": file_digest(images_file),
    }
    for folder in (ctx.work, Path(config.output_dir) / "evaluate"):
        candidate = folder / FILE_NAME
        if candidate.is_file():
            try:
                network = load_feature_network(candidate)
            except MedsynthError:
                continue
            if all(network.identity.get(k) == v for k, v in wanted.items()):
                if folder != ctx.work:
                    save_feature_network(network, ctx.work / FILE_NAME)
                return network
    images = np.load(images_file, allow_pickle=False)
    classes_file = cache / "train_classes.npy"
    classes = np.load(classes_file, allow_pickle=False) if classes_file.exists() else None
    network = train_feature_network(
        images,
        classes,
        spatial_dims=config.data.spatial_dims,
        steps=cfg.steps,
        seed=config.seed,
        width=cfg.width,
        device=ctx.dist.device,
    )
    network.identity["train_images_sha256"] = wanted["train_images_sha256"]  # the file's digest, as matched above
    save_feature_network(network, ctx.work / FILE_NAME)
    return network


def describe(network: FeatureNetwork) -> str:
    """The identity as one JSON line, for a param."""
    return json.dumps(network.identity, sort_keys=True, default=str)


def train_groups(cache: Path) -> list[str]:
    """The case (patient) of every training image, as ``training case <k>`` (k: the case's position in
    the training split): slices of one case are one group, and no name from the data reaches an output."""
    rows = json.loads((cache / "train_index.json").read_text())
    case_ids = [str(row["case_id"]) for row in rows]
    position = {case: k for k, case in enumerate(dict.fromkeys(case_ids))}
    return [f"training case {position[c]}" for c in case_ids]
