"""The GPU numbers in one short run: training throughput against the MONAI tutorial loop, the step's
share of the measured matmul peak, sampling time per sampler, denoising time per slice and per volume,
and 3D training peak memory. Every part is timed in this process on the same card; a part that fails
records its error and the others still run. Results go to stdout and, as JSON, to ``--out``.

    python benchmarks/gpu.py --out gpu.json            # on a machine with a CUDA GPU
    python benchmarks/gpu.py --device cpu --quick      # the same code path, tiny, on a CPU (a check)
    python benchmarks/gpu.py --device cpu --parts sampling denoise --sample-count 32 --train-steps 50 --volume-depth 32

Sampling and denoising time do not depend on the weights, so the model is a short GPU training of the
quickstart network (its quality numbers per sampler are the CPU table in docs/benchmarks.md); the 3D
memory variants are those of ``benchmarks/memory.py``, measured with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import matmul_peak, medsynth_loop, phantom_batch, step_flops, sync, tutorial_loop  # noqa: E402

from medsynth.config import load_config  # noqa: E402
from medsynth.runtime import setup  # noqa: E402

LARGE = [
    "data.image_size=[128,128]",
    "data.phantom.shape=[128,128]",
    "model.channels=[64,128,256]",
    "model.norm_num_groups=32",
]


def cuda_device() -> torch.device:
    """The GPU, with TF32 allowed for fp32 matmuls and convolutions (every arm of a comparison alike)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda")


def throughput(settings: list[str], steps: int, repeats: int, device: torch.device, images: int) -> dict:
    config = load_config("configs/quickstart.yaml", settings)
    data = phantom_batch(config, images)
    tutorial_loop(config, data, 3, device)
    reference, amp, ours, whole = [], [], [], []
    for _ in range(repeats):
        reference.append(tutorial_loop(config, data, steps, device))
        if device.type == "cuda":
            amp.append(tutorial_loop(config, data, steps, device, amp=True))
        steady, total = medsynth_loop(config, data, steps, device)
        ours.append(steady)
        whole.append(total)
    flops = step_flops(config, device)
    result = {
        "settings": settings,
        "steps": steps,
        "reference_fp32": reference,
        "reference_fp16_amp": amp,
        "medsynth": ours,
        "medsynth_whole_call": whole,
        "ratio_vs_fp32": statistics.median(ours) / statistics.median(reference),
        "gflop_per_image": flops / config.train.batch_size / 1e9,
        "achieved_tflop_s": flops / config.train.batch_size * statistics.median(ours) / 1e12,
    }
    if amp:
        result["ratio_vs_fp16_amp"] = statistics.median(ours) / statistics.median(amp)
    return result


def sampling(device: torch.device, train_steps: int, count: int, budgets: list[tuple[str, int]]) -> dict:
    from medsynth.models.loading import load_trained_model
    from medsynth.synthesis import synthesise
    from medsynth.training.engine import RunSettings
    from medsynth.training.trainer import train_diffusion

    config = load_config("configs/quickstart.yaml", [f"train.max_steps={train_steps}", "train.checkpoint_every=100000"])
    data = phantom_batch(config, 256)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunSettings(seed=config.seed, work_dir=Path(tmp), dist=setup(device.type), progress=None)
        result = train_diffusion(config.model, config.diffusion, config.train, data, data[:16], run)
        trained = load_trained_model(result.model_path, device)
    out = {"model": "quickstart network, 32x32", "train_steps": train_steps, "samples": count, "seconds": {}}
    synthesise(trained, sampler="ddim", steps=2, seeds=list(range(8)), batch_size=8, device=device)  # warm-up
    for sampler, steps in budgets:
        sync(device)
        start = time.perf_counter()
        synthesise(trained, sampler=sampler, steps=steps, seeds=list(range(count)), batch_size=count, device=device)
        sync(device)
        out["seconds"][f"{sampler}{steps}"] = time.perf_counter() - start
    return out, trained


def denoising(trained, device: torch.device, size: int, depth: int) -> dict:
    from medsynth.data.phantoms import generate_phantom
    from medsynth.denoise.scan import PriorSettings, denoise_scan

    phantom = generate_phantom("brain_mri", (size, size, depth), 0)
    volume = phantom.image.astype(np.float32)
    rng = np.random.default_rng(0)
    sigma = 0.05 * float(np.percentile(volume, 99))
    noisy = np.abs(volume + rng.normal(0, sigma, volume.shape) + 1j * rng.normal(0, sigma, volume.shape)).astype(
        np.float32
    )
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    out = {"size": [size, size, depth], "seconds": {}}
    for mode, steps in (("tweedie", 1), ("ddim", 10)):
        settings = PriorSettings(mode=mode, steps=steps, overlap=0.25)
        one = noisy[:, :, depth // 2]
        denoise_scan(
            one,
            affine[[0, 1, 3]][:, [0, 1, 3]],
            method="diffusion",
            modality="mr",
            sigma=sigma,
            trained=trained,
            settings=settings,
            device=device,
        )
        sync(device)
        start = time.perf_counter()
        denoise_scan(
            one,
            affine[[0, 1, 3]][:, [0, 1, 3]],
            method="diffusion",
            modality="mr",
            sigma=sigma,
            trained=trained,
            settings=settings,
            device=device,
        )
        sync(device)
        out["seconds"][f"slice_{mode}"] = time.perf_counter() - start
        start = time.perf_counter()
        denoise_scan(
            noisy,
            affine,
            method="diffusion",
            modality="mr",
            sigma=sigma,
            trained=trained,
            settings=settings,
            device=device,
        )
        sync(device)
        out["seconds"][f"volume_{mode}"] = time.perf_counter() - start
    return out


def memory_3d(device: torch.device, size: int, batch: int, steps: int) -> dict:
    from knobs import build
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    inferer = DiffusionInferer(DDPMScheduler(num_train_timesteps=1000))
    out = {"size": size, "batch": batch, "channels": [32, 64, 64], "variants": {}}
    for variant in ("plain", "gradient_checkpointing", "flash_attention", "channels_last"):
        model = build(variant, [32, 64, 64]).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x0 = torch.rand((batch, 1, size, size, size), device=device) * 2 - 1
        if variant == "channels_last":
            x0 = x0.contiguous(memory_format=torch.channels_last_3d)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps + 1):
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                noise = torch.randn_like(x0)
                t = torch.randint(0, 1000, (batch,), device=device)
                loss = torch.nn.functional.mse_loss(
                    inferer(inputs=x0, diffusion_model=model, noise=noise, timesteps=t).float(), noise
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync(device)
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        out["variants"][variant] = {"peak_gib": peak, "step_s": statistics.median(times[1:])}
        del model, optimizer
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script, not the card")
    parser.add_argument(
        "--parts",
        nargs="*",
        default=["peak", "train", "large", "large_compiled", "train_compiled", "sampling", "denoise", "memory3d"],
    )
    parser.add_argument(
        "--train-steps", type=int, default=300, help="training steps of the model sampling and denoising use"
    )
    parser.add_argument("--sample-count", type=int, default=256, help="samples per sampler (one batch)")
    parser.add_argument("--volume-depth", type=int, default=64, help="slices of the 256x256 volume denoised")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    quick = args.quick
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "quick": quick,
    }

    def part(name, fn):
        if name not in args.parts:
            return None
        start = time.perf_counter()
        try:
            value = fn()
            results[name] = value[0] if isinstance(value, tuple) else value
        except Exception as exc:  # keep the other numbers when one part fails
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
            value = None
        results.setdefault("part_seconds", {})[name] = time.perf_counter() - start
        print(json.dumps({name: results[name]}, default=float), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2, default=float))
        return value

    steps, repeats, images = (4, 1, 16) if quick else (60, 2, 256)
    if device.type == "cuda":
        device = cuda_device()
    part(
        "peak",
        lambda: {
            "bf16_tflop_s": matmul_peak(device, torch.bfloat16, 256 if quick else 8192) / 1e12,
            "fp32_tflop_s": matmul_peak(device, torch.float32, 256 if quick else 8192) / 1e12,
        },
    )
    tiny = ["train.batch_size=4"] if quick else []
    part("train", lambda: throughput(tiny, steps, repeats, device, images))
    large = [*tiny, "model.channels=[32,64,64]"] if quick else LARGE
    part("large", lambda: throughput(large, steps, repeats, device, images))
    # compiled: one repeat of 100 steps (the first logging window holds the compilation)
    part(
        "large_compiled", lambda: throughput([*large, "train.compile=true"], steps if quick else 100, 1, device, images)
    )
    part(
        "train_compiled",
        lambda: throughput(
            [*tiny, "train.compile=true", "train.compile_mode=reduce-overhead"],
            steps if quick else 100,
            1,
            device,
            images,
        ),
    )
    budgets = [("ddpm", 100), ("ddim", 50), ("dpmpp_2m", 20), ("euler", 20), ("heun", 10), ("pc", 10)]
    made = part(
        "sampling",
        lambda: sampling(
            device,
            5 if quick else args.train_steps,
            4 if quick else args.sample_count,
            budgets[:2] if quick else budgets,
        ),
    )
    if made is not None:
        part("denoise", lambda: denoising(made[1], device, 32 if quick else 256, 16 if quick else args.volume_depth))
    part("memory3d", lambda: memory_3d(device, 16 if quick else 64, 1 if quick else 2, 1 if quick else 4))
    print(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
