"""How much the feature metrics of one run move with the seed of the self-trained feature network: FID,
precision and recall of the run's samples against its held-out images, with feature networks of several
seeds (the pipeline uses ``seed``). Same samples, same real images, only the instrument changes.

    python benchmarks/feature_seed_spread.py --run runs/quickstart --seeds 0 1 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from medsynth.config import load_config
from medsynth.metrics.features import central_slices, feature_fidelity
from medsynth.training.feature_network import train_feature_network


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="output folder of a pipeline run (prepare + sample)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.run / "evaluate" / "config.yaml")
    features, dims = config.evaluate.features, config.data.spatial_dims
    cache = args.run / "prepare" / "cache"
    train = np.load(cache / "train_images.npy")
    classes = np.load(cache / "train_classes.npy") if (cache / "train_classes.npy").is_file() else None
    real = np.load(cache / "val_images.npy")[: config.evaluate.num_real]
    fake = np.load(args.run / "sample" / "samples.npy")
    print("| feature network seed | FID | precision | recall |\n|---|---|---|---|")
    for seed in args.seeds:
        network = train_feature_network(
            train, classes, spatial_dims=dims, steps=features.steps, seed=seed, width=features.width
        )
        # k-NN manifolds need k + 1 samples a side: a smaller k for small sets, as the evaluate stage does
        slices = 1
        if dims == 3 and int(network.identity.get("network_spatial_dims", 3)) == 2:
            slices = min(len(central_slices(size, features.slices_per_plane)) for size in real.shape[2:])
        k = max(1, min(features.k, min(len(real), len(fake)) * slices - 1))
        values = feature_fidelity(
            real, fake, network, spatial_dims=dims, k=k, slices_per_plane=features.slices_per_plane
        )
        print(f"| {seed} | {values['fid']:.2f} | {values['precision']:.2f} | {values['recall']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
