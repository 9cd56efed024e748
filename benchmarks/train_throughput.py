"""Training throughput: medsynth's training step against a plain MONAI tutorial-style loop.

Same network (``DiffusionModelUNet`` from the config), same batch size, same data, same process;
runs alternate (reference, medsynth, reference, medsynth, ...) and the ratio of the median
images/s is printed, because absolute numbers on shared machines are noisy.

    python benchmarks/train_throughput.py --config configs/quickstart.yaml --steps 40 --repeats 3

medsynth's step does more than the tutorial loop (Min-SNR weighting, gradient clipping, EMA update,
LR schedule, per-step seeded noise, channels_last when configured); the ratio shows what that
costs or saves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler

from medsynth.config import load_config
from medsynth.data.phantoms import generate_phantom
from medsynth.models.unet import build_unet
from medsynth.training.distributed import setup
from medsynth.training.trainer import train_diffusion


def phantom_batch(config, count: int) -> np.ndarray:
    """Normalised phantom images of the config's size (the data both loops train on)."""
    images = []
    for i in range(count):
        p = generate_phantom(config.data.phantom.kind, tuple(config.data.image_size), i)
        scale = np.percentile(p.image[p.image > 0.1 * p.image.max()], 99.5) if config.modality == "mr" else 1000.0
        image = 2 * p.image / scale - 1 if config.modality == "mr" else p.image / 1000.0
        images.append(np.clip(image, -1, 1)[None].astype(np.float32))
    return np.stack(images)


def tutorial_loop(config, data: np.ndarray, steps: int) -> float:
    """MONAI tutorial style: DDPMScheduler, DiffusionInferer, MSE on the noise, AdamW. Returns images/s."""
    torch.manual_seed(0)
    model = build_unet(config.model, spatial_dims=config.data.spatial_dims)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    inferer = DiffusionInferer(scheduler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    images = torch.from_numpy(data)
    batch = config.train.batch_size
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        x = images[(np.arange(batch) + step * batch) % len(images)]
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (batch,)).long()
        prediction = inferer(inputs=x, diffusion_model=model, noise=noise, timesteps=t)
        loss = F.mse_loss(prediction.float(), noise.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def medsynth_loop(config, data: np.ndarray, steps: int) -> float:
    """medsynth's own trainer for ``steps`` steps (no validation or checkpoint in between)."""
    config = config.model_copy(deep=True)
    config.train.max_steps = steps
    config.train.log_every = config.train.val_every = config.train.checkpoint_every = steps
    config.train.val_images = 4
    ctx = setup("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train_diffusion(config, data, data[:4], Path(tmp), ctx)
        seconds = time.perf_counter() - start
    return steps * config.train.batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config)
    data = phantom_batch(config, 128)
    tutorial_loop(config, data, 3)  # warm-up (allocator, kernels)
    reference, ours = [], []
    for _ in range(args.repeats):
        reference.append(tutorial_loop(config, data, args.steps))
        ours.append(medsynth_loop(config, data, args.steps))
    result = {
        "config": args.config, "steps": args.steps, "repeats": args.repeats, "batch_size": config.train.batch_size,
        "image_size": config.data.image_size, "channels": config.model.channels, "threads": torch.get_num_threads(),
        "reference_images_per_s": [round(v, 1) for v in reference], "medsynth_images_per_s": [round(v, 1) for v in ours],
        "ratio_medsynth_over_reference": round(statistics.median(ours) / statistics.median(reference), 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
