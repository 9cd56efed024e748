"""Classifier-free guidance: how often samples show the requested class, and how diverse they stay,
against the guidance scale.

Needs a trained class-conditional run (``medsynth run configs/cfg2d.yaml``). The checking classifier is
the evaluate stage's (trained on the run's real training images, same seed and steps); its accuracy
on the held-out real images is printed as the ceiling. Every scale draws the same seeds, half of the
samples per class.

    python benchmarks/guidance.py --run runs/cfg2d --scales 0 1 2 4 --num-samples 64

Diversity is the mean pairwise MS-SSIM within each class's samples (lower = more diverse), beside the
same on the held-out real images of that class.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from medsynth.config import load_config
from medsynth.metrics.fidelity import pairwise_ms_ssim
from medsynth.models.loading import load_trained_model
from medsynth.synthesis import sample_classes, synthesise
from medsynth.training.classifier import train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--sampler", default=None, help="default: the run's sample.sampler")
    parser.add_argument("--steps", type=int, default=None, help="default: the run's sample.steps")
    parser.add_argument("--seed", type=int, default=5000)
    parser.add_argument("--out")
    args = parser.parse_args()
    config = load_config(args.run / "train" / "config.yaml")
    sampler, steps = args.sampler or config.sample.sampler, args.steps or config.sample.steps
    trained = load_trained_model(args.run / "train" / "model.pt")
    if trained.num_classes is None:
        raise SystemExit(f"{args.run}: not a class-conditional model")
    cache = args.run / "prepare" / "cache"
    load = lambda name: np.load(cache / name, allow_pickle=False)  # noqa: E731
    classifier = train_classifier(
        load("train_images.npy"),
        load("train_classes.npy"),
        spatial_dims=trained.spatial_dims,
        num_classes=trained.num_classes,
        steps=config.evaluate.classifier_steps,
        seed=config.seed,
    )
    val_images, val_classes = load("val_images.npy"), load("val_classes.npy")
    ceiling = classifier.accuracy(val_images[val_classes >= 0], val_classes[val_classes >= 0])
    real_diversity = {
        c: pairwise_ms_ssim(torch.from_numpy(val_images[val_classes == c]), spatial_dims=trained.spatial_dims)
        for c in range(trained.num_classes)
        if (val_classes == c).sum() >= 2
    }
    classes = sample_classes(None, args.num_samples, trained.num_classes)
    seeds = [args.seed + i for i in range(args.num_samples)]
    rows = []
    for scale in args.scales:
        images, seconds = synthesise(
            trained,
            sampler=sampler,
            steps=steps,
            seeds=seeds,
            batch_size=32,
            device=torch.device("cpu"),
            class_labels=classes,
            guidance_scale=scale,
            desc=f"w={scale}",
        )
        predicted = classifier.predict(images)
        row = {
            "guidance_scale": scale,
            "agreement": float(np.mean(predicted == np.asarray(classes))),
            "seconds": seconds,
        }
        for c in range(trained.num_classes):
            chosen = np.asarray(classes) == c
            row[f"agreement/{c}"] = float(np.mean(predicted[chosen] == c))
            row[f"diversity/{c}"] = pairwise_ms_ssim(
                torch.from_numpy(images[chosen]), spatial_dims=trained.spatial_dims
            )
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    print(
        f"\n{args.run}: {sampler} {steps} steps, {args.num_samples} samples (classes in turn); "
        f"classifier held-out real accuracy {ceiling:.3f}; "
        f"real within-class MS-SSIM " + ", ".join(f"class {c}: {v:.3f}" for c, v in real_diversity.items())
    )
    header = [
        "guidance_scale",
        "agreement",
        *[f"agreement/{c}" for c in range(trained.num_classes)],
        *[f"diversity/{c}" for c in range(trained.num_classes)],
        "seconds",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{row[h]:.3f}" if h != "seconds" else f"{row[h]:.1f}" for h in header) + " |")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "ceiling": ceiling,
                    "real_diversity": real_diversity,
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
