"""Training throughput: medsynth's training step against a plain MONAI tutorial-style loop, plus the
achieved FLOP/s of the step as a share of the machine's measured matmul peak.

Same network (``DiffusionModelUNet`` from the config), same batch size, same images, same process;
runs alternate (reference, medsynth, reference, medsynth, ...) and the ratio of the median
steady-state images/s is printed, because absolute numbers on shared machines are noisy.

    python benchmarks/train_throughput.py --config configs/quickstart.yaml --steps 40 --repeats 3
    python benchmarks/train_throughput.py --device cuda --set train.compile=true --set train.compile_mode=max-autotune

The reference is the loop of MONAI's DDPM tutorials: a ``CacheDataset`` behind a shuffling
``DataLoader``, each batch copied to the device, ``DDPMScheduler`` + ``DiffusionInferer``, MSE on the
noise, AdamW with torch's default implementation, fp32 ("plain"); on CUDA also the tutorials' fp16
autocast + ``GradScaler`` ("amp"). medsynth's step does more (gradient clipping, an EMA update, an LR
schedule, seeded per-step noise) and uses its own settings: fused AdamW, the training set resident
on the device, bf16 autocast and channels-last on CUDA, ``torch.compile`` when configured.

FLOPs of one training step (forward + backward) are counted with ``torch.utils.flop_counter``; the
peak is the best of a few large square matmuls in the step's precision on the same machine.
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
from monai.data import CacheDataset, DataLoader
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler
from torch.utils.flop_counter import FlopCounterMode

from medsynth.config import load_config
from medsynth.data.phantoms import generate_phantom
from medsynth.models.unet import build_unet
from medsynth.runtime import setup
from medsynth.training.engine import RunSettings
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tutorial_loop(
    config, data: np.ndarray, steps: int, device: torch.device, *, amp: bool = False, warmup: int = 3
) -> float:
    """MONAI tutorial style. Returns steady-state images/s (after ``warmup`` steps)."""
    torch.manual_seed(0)
    model = build_unet(config.model, spatial_dims=config.data.spatial_dims).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    inferer = DiffusionInferer(scheduler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    dataset = CacheDataset([{"image": image} for image in data], transform=None, progress=False)
    loader = DataLoader(dataset, batch_size=config.train.batch_size, shuffle=True, drop_last=True, num_workers=0)
    model.train()
    done, start = 0, None
    while done < steps + warmup:
        for batch in loader:
            if done == warmup:
                sync(device)
                start = time.perf_counter()
            x = batch["image"].to(device)
            noise = torch.randn_like(x)
            t = torch.randint(0, 1000, (len(x),), device=device).long()
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                prediction = inferer(inputs=x, diffusion_model=model, noise=noise, timesteps=t)
                loss = F.mse_loss(prediction.float(), noise.float())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            done += 1
            if done == steps + warmup:
                break
    sync(device)
    return steps * config.train.batch_size / (time.perf_counter() - start)


def medsynth_loop(config, data: np.ndarray, steps: int, device: torch.device, windows: int = 4) -> tuple[float, float]:
    """medsynth's own trainer: (steady-state images/s: median over its logging windows after the
    first, which holds warm-up and compilation; images/s over the whole call)."""
    config = config.model_copy(deep=True)
    config.train.max_steps = steps
    config.train.log_every = max(1, steps // windows)
    config.train.val_every = config.train.checkpoint_every = steps
    config.train.val_images = 4
    ctx = setup(device.type)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = RunSettings(seed=config.seed, work_dir=Path(tmp), dist=ctx, progress=None)
        result = train_diffusion(config.model, config.diffusion, config.train, data, data[:4], run)
        total = time.perf_counter() - start
    rates = [record["train/images_per_s"] for record in result.history[1:]] or [result.history[0]["train/images_per_s"]]
    return statistics.median(rates), steps * config.train.batch_size / total


def step_flops(config, device: torch.device) -> int:
    """FLOPs of one training step (forward + backward) of the network at the config's batch size."""
    model = build_unet(config.model, spatial_dims=config.data.spatial_dims).to(device)
    x = torch.randn(config.train.batch_size, 1, *config.data.image_size, device=device)
    t = torch.randint(0, 1000, (len(x),), device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, t).square().mean().backward()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """The best FLOP/s of ``size``-square matmuls in ``dtype`` (the machine's practical peak)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(device)
        best = max(best, 3 * 2 * size**3 / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. train.batch_size=64"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    device = torch.device(args.device)
    if device.type == "cpu":
        setup("cpu")  # the thread count medsynth uses, for both loops
    data = phantom_batch(config, 256)
    tutorial_loop(config, data, 3, device)  # warm-up (allocator, kernels)
    reference, amp_reference, ours, ours_total = [], [], [], []
    for _ in range(args.repeats):
        reference.append(tutorial_loop(config, data, args.steps, device))
        if device.type == "cuda":
            amp_reference.append(tutorial_loop(config, data, args.steps, device, amp=True))
        steady, total = medsynth_loop(config, data, args.steps, device)
        ours.append(steady)
        ours_total.append(total)

    flops = step_flops(config, device)
    precision = (
        torch.bfloat16 if device.type == "cuda" and config.train.precision in ("auto", "bf16") else torch.float32
    )
    peak = matmul_peak(device, precision, 8192 if device.type == "cuda" else 2048)
    achieved = flops / config.train.batch_size * statistics.median(ours)
    result = {
        "config": args.config,
        "overrides": args.set,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps": args.steps,
        "repeats": args.repeats,
        "batch_size": config.train.batch_size,
        "image_size": config.data.image_size,
        "channels": config.model.channels,
        "threads": torch.get_num_threads(),
        "compile": config.train.compile,
        "compile_mode": config.train.compile_mode if config.train.compile else None,
        "reference_images_per_s": [round(v, 1) for v in reference],
        "medsynth_images_per_s": [round(v, 1) for v in ours],
        "medsynth_images_per_s_whole_call": [round(v, 1) for v in ours_total],
        "ratio_medsynth_over_reference": round(statistics.median(ours) / statistics.median(reference), 3),
        "gflop_per_step": round(flops / 1e9, 2),
        "achieved_tflop_s": round(achieved / 1e12, 4),
        "matmul_peak_tflop_s": round(peak / 1e12, 4),
        "peak_dtype": str(precision).removeprefix("torch."),
        "share_of_matmul_peak": round(achieved / peak, 3),
    }
    if amp_reference:
        result["reference_amp_images_per_s"] = [round(v, 1) for v in amp_reference]
        result["ratio_medsynth_over_reference_amp"] = round(
            statistics.median(ours) / statistics.median(amp_reference), 3
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
