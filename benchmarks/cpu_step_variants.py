"""CPU training-step variants, as ratios in one process: what could make the step faster on a CPU.

Every variant gets its own copy of the config's ``DiffusionModelUNet`` (same initial weights) and
optimiser; their steps (forward, MSE, backward, AdamW) are interleaved round by round on the same
batches, so machine noise hits all alike; the median step time of each is divided by the plain
step's. Variants: ``plain`` (eager fp32, AdamW default implementation), ``fused_adamw``,
``channels_last``, ``no_onednn`` (``torch.backends.mkldnn`` off during its steps), ``compile``
(``torch.compile``, default mode; its compilation time is printed separately). Also printed: the
optimiser step alone, default vs foreach vs fused.

    python benchmarks/cpu_step_variants.py --config configs/quickstart.yaml --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from medsynth.config import load_config
from medsynth.models.unet import build_unet

VARIANTS = ("plain", "fused_adamw", "channels_last", "no_onednn", "compile")


def optimiser_step_ms(model: torch.nn.Module, repeats: int = 30) -> dict[str, float]:
    """Milliseconds per AdamW step over the model's parameters, per implementation."""
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    out = {}
    for name, kwargs in (("default", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, **kwargs)
        optimizer.step()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        out[name] = 1000 * statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    torch.manual_seed(0)
    base = build_unet(config.model, spatial_dims=config.data.spatial_dims)
    batch, size = config.train.batch_size, config.data.image_size

    models, optimisers, steps, compile_s = {}, {}, {}, None
    for variant in args.variants:
        model = copy.deepcopy(base)
        if variant == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        models[variant] = model
        optimisers[variant] = torch.optim.AdamW(
            model.parameters(), lr=1e-4, fused=True if variant == "fused_adamw" else None
        )
        steps[variant] = torch.compile(model, dynamic=False) if variant == "compile" else model

    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for round_index in range(args.rounds + 1):
        x = torch.rand((batch, 1, *size), generator=generator) * 2 - 1
        noise = torch.randn(x.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        for variant in args.variants:
            inputs = (
                (x + noise).contiguous(memory_format=torch.channels_last) if variant == "channels_last" else x + noise
            )
            start = time.perf_counter()
            with torch.backends.mkldnn.flags(enabled=variant != "no_onednn"):
                loss = F.mse_loss(steps[variant](inputs, t), noise)
                optimisers[variant].zero_grad(set_to_none=True)
                loss.backward()
                optimisers[variant].step()
            seconds = time.perf_counter() - start
            if round_index == 0:  # warm-up (and, for compile, the compilation)
                compile_s = seconds if variant == "compile" else compile_s
                continue
            times[variant].append(seconds)
    plain = statistics.median(times["plain"]) if "plain" in times else None
    result = {
        "config": args.config,
        "threads": args.threads,
        "rounds": args.rounds,
        "batch_size": batch,
        "image_size": size,
        "step_s": {v: round(statistics.median(ts), 4) for v, ts in times.items()},
        "ratio_images_per_s_vs_plain": {v: round(plain / statistics.median(ts), 3) for v, ts in times.items()}
        if plain
        else None,
        "compile_first_step_s": None if compile_s is None else round(compile_s, 1),
        "adamw_step_ms": {k: round(v, 2) for k, v in optimiser_step_ms(copy.deepcopy(base)).items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
