"""Step time of the 3D memory/speed knobs, measured as ratios in one process.

Every variant gets its own copy of the same 3D UNet (same initial weights) and optimiser; the
variants' training steps are interleaved round-robin on the same batches, so machine noise hits all
of them alike, and the median step time of each is divided by the plain run's. Variants: plain,
``train.gradient_checkpointing``, ``model.use_flash_attention`` (self-attention at the deepest
level in every variant), ``train.channels_last``. Peak memory needs a process per variant:
``benchmarks/memory.py``.

    python benchmarks/knobs.py --size 32 --batch 2 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet

from medsynth.models.unet import enable_gradient_checkpointing

VARIANTS = ("plain", "gradient_checkpointing", "flash_attention", "channels_last")


def build(variant: str, channels: list[int]) -> DiffusionModelUNet:
    torch.manual_seed(0)
    net = DiffusionModelUNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=tuple(channels),
        attention_levels=(False,) * (len(channels) - 1) + (True,),
        num_res_blocks=1,
        norm_num_groups=16,
        num_head_channels=min(32, channels[-1]),
        use_flash_attention=variant == "flash_attention",
    )
    if variant == "gradient_checkpointing":
        enable_gradient_checkpointing(net)
    if variant == "channels_last":
        net = net.to(memory_format=torch.channels_last_3d)
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per variant (after one warm-up step each)")
    parser.add_argument("--channels", type=int, nargs="*", default=[32, 64, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from monai.networks.schedulers import DDPMScheduler

    inferer = DiffusionInferer(DDPMScheduler(num_train_timesteps=1000))
    models = {v: build(v, args.channels) for v in args.variants}
    optimisers = {v: torch.optim.AdamW(m.parameters(), lr=1e-4) for v, m in models.items()}
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {v: [] for v in models}
    for round_index in range(args.rounds + 1):
        x0 = torch.rand((args.batch, 1, *[args.size] * 3), generator=generator) * 2 - 1
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (args.batch,), generator=generator)
        for variant, model in models.items():
            x = x0.contiguous(memory_format=torch.channels_last_3d) if variant == "channels_last" else x0
            started = time.perf_counter()
            loss = torch.nn.functional.mse_loss(
                inferer(inputs=x, diffusion_model=model, noise=noise, timesteps=t), noise
            )
            optimisers[variant].zero_grad(set_to_none=True)
            loss.backward()
            optimisers[variant].step()
            if round_index:  # the first round warms up allocators and kernels
                times[variant].append(time.perf_counter() - started)
    medians = {v: statistics.median(ts) for v, ts in times.items()}
    plain = medians.get("plain")
    print(
        f"\n3D UNet {args.channels} (attention at the deepest level), {args.size}^3, batch {args.batch}, "
        f"{args.rounds} interleaved steps, "
        f"{args.threads} threads"
    )
    print("| variant | median s/step | time vs plain |")
    print("|---|---|---|")
    for variant, median in medians.items():
        print(f"| {variant} | {median:.3f} | {'' if plain is None else f'{median / plain:.2f}'} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "median_s": medians, "times": times}, handle, indent=1)


if __name__ == "__main__":
    main()
