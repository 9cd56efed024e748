"""Do the feature metrics see what matters? FID, precision/recall and feature MMD of held-out real
phantoms against known degradations of them, with the feature network medsynth trains itself.

The feature network is trained with the evaluate stage's defaults on ``--train`` brain-MRI phantoms;
``--test`` other phantoms are split in two halves: one half is the reference, the other is compared as
it is (the floor: two samples of the same distribution) and degraded (noise, blur, contrast).

    python benchmarks/feature_metrics.py --train 128 --test 128 --size 32

2D by default; ``--dims 3`` scores volumes 2.5D (three planes, each plane's FID printed).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy import ndimage

from medsynth.data.phantoms import generate_phantom
from medsynth.metrics.features import PLANES, feature_fidelity
from medsynth.training.feature_network import train_feature_network


def phantoms(n: int, shape: tuple[int, ...], first_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Brain phantoms scaled to [-1, 1] by their foreground 99.5th percentile (as prepare does), and classes."""
    images, classes = [], []
    for seed in range(first_seed, first_seed + n):
        phantom = generate_phantom("brain_mri", shape, seed=seed)
        high = np.percentile(phantom.image[phantom.image > 0.1 * np.percentile(phantom.image, 99)], 99.5)
        images.append(np.clip(2 * phantom.image / high - 1, -1, 1))
        classes.append(phantom.class_label)
    return np.stack(images)[:, None].astype(np.float32), np.asarray(classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=128)
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.size,) * args.dims
    train, classes = phantoms(args.train, shape, 0)
    test, _ = phantoms(args.test, shape, 100000)
    started = time.perf_counter()
    network = train_feature_network(train, classes, spatial_dims=args.dims, steps=args.steps, seed=0)
    print(
        f"feature network: {network.identity['objective']}, {args.steps} steps, "
        f"trained in {time.perf_counter() - started:.0f} s"
    )
    half = len(test) // 2
    reference, other = test[:half], test[half:]
    rng = np.random.default_rng(1)
    spatial_sigma = lambda s: (0, 0) + (s,) * args.dims  # noqa: E731
    cases = {
        "real vs real (other half)": other,
        "noise std 0.05": other + rng.normal(0, 0.05, other.shape),
        "noise std 0.1": other + rng.normal(0, 0.1, other.shape),
        "Gaussian blur 0.7 px": ndimage.gaussian_filter(other, sigma=spatial_sigma(0.7)),
        "Gaussian blur 1 px": ndimage.gaussian_filter(other, sigma=spatial_sigma(1.0)),
        "intensities x 0.9": other * 0.9,
    }
    rows = []
    print(
        f"{'fake set':28s} {'FID':>9s} {'precision':>9s} {'recall':>7s} {'MMD':>9s}"
        + ("  FID per plane" if args.dims == 3 else "")
    )
    for name, fake in cases.items():
        scores = feature_fidelity(reference, np.asarray(fake, dtype=np.float32), network, spatial_dims=args.dims)
        rows.append({"case": name} | scores)
        planes = "  " + " ".join(f"{p} {scores[f'fid/{p}']:.2f}" for p in PLANES) if args.dims == 3 else ""
        print(
            f"{name:28s} {scores['fid']:9.3f} {scores['precision']:9.2f} {scores['recall']:7.2f} "
            f"{scores['mmd']:9.3f}{planes}"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "identity": network.identity, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
