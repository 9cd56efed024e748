"""denoise: held-out scans with simulated noise, denoised by the diffusion prior and the baselines.

For each noise level and each of the first ``denoise.num_images`` validation cases of the prepare
stage, the clean scan (in its units, as prepare wrote it) gets seeded noise: Rician (MR) with
sigma a fraction of the foreground 99th percentile, or low-dose CT simulated in the projection
domain at a dose fraction. Every configured method then denoises it with the same code path as
``medsynth denoise`` (:func:`medsynth.denoise.scan.denoise_scan`), given the estimated noise level
(``denoise.sigma: auto``), the simulated one (``oracle``) or a fixed value.

Outputs (``output_dir/denoise/``): ``level_<j>/<case>/noisy.nii.gz`` and ``<method>.nii.gz`` (and
``diffusion_uncertainty.nii.gz`` with posterior draws), and ``denoise.json`` listing every file with
the noise level simulated and the one each method used, its time, and the diffusion settings.
The evaluate stage scores them against the clean scans.

With ``denoise.datalist``, your own noisy scans (NIfTI or DICOM series) are denoised by every method
too, into ``scans/<name>/`` in their own format (see :func:`_denoise_datalist`).

Under ``torchrun`` the (level, case) pairs and the datalist's scans are split across the ranks (item
``k`` on rank ``k % world_size``) and gathered on rank 0 round by round; rank 0 alone writes, with the
names of a single-process run (docs/scale_out.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.config import Config, to_plain
from medsynth.data.prepare import safe_name
from medsynth.data.transforms import foreground_mask
from medsynth.denoise.classical import available_methods
from medsynth.denoise.files import ScanInput, denoise_input, provenance_record, read_datalist, read_scan, write_result
from medsynth.denoise.scan import Denoised, PriorSettings, denoise_scan
from medsynth.errors import MedsynthError
from medsynth.io.atomic import atomic_write_json, file_digest
from medsynth.io.nifti import write_nifti
from medsynth.io.volumes import read_nifti
from medsynth.models.loading import TrainedModel, load_trained_model
from medsynth.noise.models import gaussian_noise, low_dose_ct, low_dose_ct_image_domain, rician_noise
from medsynth.runtime import map_sharded
from pipelines.stage import StageContext


def simulate(
    clean: np.ndarray, noise: str, level: float, *, seed: int, spacing_mm: float, photons: float
) -> tuple[np.ndarray, float]:
    """The noisy scan and its noise std in the scan's units (for CT: measured from the simulated noise)."""
    if noise in ("rician", "gaussian"):
        mask = foreground_mask(clean)
        sigma = float(level * np.percentile(clean[mask] if mask.any() else clean, 99.0))
        noisy = rician_noise(clean, sigma, seed=seed) if noise == "rician" else gaussian_noise(clean, sigma, seed=seed)
        return noisy, sigma
    if noise == "low_dose_ct":
        noisy = low_dose_ct(clean, dose_fraction=level, seed=seed, spacing_mm=spacing_mm, photons=photons)
    else:
        noisy = low_dose_ct_image_domain(clean, dose_fraction=level, seed=seed)
    # The oracle noise level of a CT simulation: the std of what was added inside the body.
    body = clean > -500.0
    return noisy, float(np.std((noisy - clean)[body] if body.any() else noisy - clean))


def preflight(config: Config) -> None:
    """Checked before the pipeline starts: the datalist of your own scans (when given) reads cleanly."""
    if config.denoise.datalist:
        read_datalist(config.denoise.datalist, config.denoise.datalist_key)


def run(ctx: StageContext) -> dict[str, Any]:
    config, work, cfg = ctx.config, ctx.work, ctx.config.denoise
    prepare_dir = ctx.inputs["prepare"]
    missing = [m for m in cfg.methods if m not in ("diffusion", "self_supervised") and m not in available_methods()]
    if missing:
        raise MedsynthError(
            f"{ctx.config_path}: key 'denoise.methods': {', '.join(missing)} not installed "
            '(bm3d needs the optional extra: pip install "medsynth[bm3d]")'
        )
    modality = config.modality
    noise = config.denoise_noise
    levels = cfg.noise_levels(noise)
    cases = json.loads((prepare_dir / "datalist.json").read_text())["validation"][: cfg.num_images]
    datalist = read_datalist(cfg.datalist, cfg.datalist_key) if cfg.datalist else []  # checked before any work
    trained = (
        load_trained_model(ctx.inputs["train"] / "model.pt", ctx.dist.device) if "diffusion" in cfg.methods else None
    )
    settings = PriorSettings(
        mode=cfg.mode,
        steps=cfg.steps,
        samples=cfg.samples,
        seed=cfg.seed,
        overlap=cfg.overlap,
        sw_batch_size=cfg.sw_batch_size,
        ensemble=cfg.ensemble,
    )

    def denoise_case(k: int) -> dict[str, Any]:
        """Case ``k % len(cases)`` at level ``k // len(cases)``: simulated noise, then every method
        (nothing written)."""
        j, i = divmod(k, len(cases))
        case = cases[i]
        source = Path(case["image"]) if Path(case["image"]).is_absolute() else prepare_dir / case["image"]
        clean = read_nifti(source)
        spacing = float(np.sqrt((clean.affine[:3, 0] ** 2).sum()))
        noisy, true_sigma = simulate(
            clean.array, noise, levels[j], seed=cfg.seed + 1000 * j + i, spacing_mm=spacing, photons=cfg.photons
        )
        given = (
            {"auto": None, "oracle": true_sigma}.get(cfg.sigma, cfg.sigma)
            if isinstance(cfg.sigma, str)
            else float(cfg.sigma)
        )
        results = {}
        for method in cfg.methods:
            started = time.perf_counter()
            if method == "self_supervised":
                # a prior fitted on this noisy case alone (no clean scan enters), kept in fits/
                result = _self_supervised(ctx, noisy, clean.affine, given, work / "fits" / f"level_{j}_case_{i}")
                results[method] = (result, time.perf_counter() - started)
                continue
            result = denoise_scan(
                noisy,
                clean.affine,
                method=method,
                modality=modality,
                sigma=given,
                trained=trained,
                settings=settings,
                device=ctx.dist.device,
            )
            results[method] = (result, time.perf_counter() - started)
        return {"source": source, "affine": clean.affine, "noisy": noisy, "true_sigma": true_sigma, "results": results}

    # Under torchrun the (level, case) pairs are split across the ranks, one per rank per round; rank 0
    # gathers every round and alone writes, so the outputs are those of one process.
    entries: list[dict[str, Any]] = []
    seconds: dict[str, float] = {m: 0.0 for m in cfg.methods}
    for pairs in map_sharded(lambda part: [denoise_case(k) for k in part], len(levels) * len(cases), ctx.dist):
        for k, done in pairs:
            j, i = divmod(k, len(cases))
            entries.append(_write_case(work, cases[i], i, j, levels[j], noise, done, seconds))
            print(f"denoise: level {levels[j]} case {i + 1}/{len(cases)} done", flush=True)

    scans = _denoise_datalist(ctx, settings, datalist, trained) if datalist else []
    if not ctx.dist.is_main:
        return {}

    atomic_write_json(
        work / "denoise.json",
        {
            "modality": modality,
            "noise": noise,
            "levels": levels,
            "level_meaning": "dose fraction"
            if noise.startswith("low_dose_ct")
            else "sigma / foreground 99th percentile",
            "sigma": cfg.sigma,
            "methods": cfg.methods,
            "settings": to_plain(cfg),
            "model_file": str(trained.path) if trained else None,
            "entries": entries,
            "scans": scans,
        },
    )
    per_image = {f"denoise/seconds_per_image/{m}": s / max(1, len(entries)) for m, s in seconds.items()}
    ctx.tracker.log_metrics(per_image)
    return {"images": len(entries), "levels": levels, "noise": noise, "datalist_scans": len(scans)} | {
        k.rsplit("/", 1)[1] + "_s": round(v, 3) for k, v in per_image.items()
    }


def _self_supervised(ctx: StageContext, noisy: np.ndarray, affine: np.ndarray, sigma: float | None, fit_dir: Path):
    """``self_supervised`` on one noisy scan: the stage config's data/model/diffusion/train sections are the recipe."""
    from medsynth.self_supervised import self_supervised_denoise

    cfg = ctx.config.denoise
    result, _ = self_supervised_denoise(
        noisy,
        affine,
        modality=ctx.config.modality,
        config=ctx.config,
        work_dir=fit_dir,
        sigma=sigma,
        alpha=cfg.alpha,
        draws=cfg.draws,
        seed=cfg.seed,
        ensemble=cfg.ensemble,
        device=ctx.dist.device,
    )
    return result


def _write_case(
    work: Path,
    case: dict[str, Any],
    i: int,
    j: int,
    level: float,
    noise: str,
    done: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """Write one denoised (level, case) pair (rank 0) and return its ``denoise.json`` entry; adds each method's
    time to ``seconds``."""
    affine = done["affine"]
    folder = Path(f"level_{j}") / safe_name(case.get("case_id", f"case_{i:04d}"))
    write_nifti(work / folder / "noisy.nii.gz", done["noisy"], affine, description=f"medsynth {noise} {level}")
    entry = {
        "level_index": j,
        "level": level,
        "case_id": case.get("case_id"),
        "clean": str(done["source"]),
        "noisy": str(folder / "noisy.nii.gz"),
        "true_sigma": done["true_sigma"],
        "methods": {},
    }
    for method, (result, took) in done["results"].items():
        seconds[method] += took
        out = folder / f"{method}.nii.gz"
        write_nifti(work / out, result.image, affine, description=f"medsynth denoise {method}")
        record = {"file": str(out), "sigma": result.sigma, "seconds": took} | {
            k: v
            for k, v in result.record.items()
            if k in ("timestep", "matched_sigma_normalised", "network_evaluations", "warning")
        }
        if result.uncertainty is not None:
            record["uncertainty"] = str(folder / f"{method}_uncertainty.nii.gz")
            write_nifti(work / record["uncertainty"], result.uncertainty, affine, description="medsynth posterior std")
        entry["methods"][method] = record
    return entry


def _denoise_datalist(
    ctx: StageContext, settings: PriorSettings, scans: list[tuple[str, Path]], trained: TrainedModel | None
) -> list[dict[str, Any]]:
    """Every method on each scan of ``denoise.datalist`` (real noisy scans: no reference, so no scores).

    NIfTI scans give ``scans/<name>/<method>.nii.gz``, DICOM series ``scans/<name>/<method>/`` (a derived
    series); each with its provenance record (its ``output`` is the final path under ``output_dir/denoise``).
    The noise level is estimated per scan unless ``denoise.sigma`` is a number (``oracle`` has no meaning
    without a reference and acts as ``auto``). Under torchrun the scans are split across the ranks, one
    per rank per round, and rank 0 alone writes; the other ranks return an empty list.
    """
    cfg = ctx.config.denoise
    sigma = float(cfg.sigma) if not isinstance(cfg.sigma, str) else None
    checkpoint = ctx.inputs["train"] / "model.pt"
    model_digest = file_digest(checkpoint) if trained is not None else None
    final = Path(ctx.config.output_dir) / ctx.name

    def denoise_one(k: int) -> tuple[ScanInput, dict[str, Denoised]]:
        scan = read_scan(scans[k][1])
        results = {
            method: _self_supervised(ctx, scan.volume.array, scan.volume.affine, sigma, ctx.work / "fits" / f"scan_{k}")
            if method == "self_supervised"
            else denoise_input(
                scan,
                method=method,
                sigma=sigma,
                modality=ctx.config.modality,
                trained=trained if method == "diffusion" else None,
                settings=settings,
                device=str(ctx.dist.device),
                progress=False,
            )
            for method in cfg.methods
        }
        # Rank 0 writes from the source file's header (NIfTI) or slices (DICOM), not from its voxels: not sent.
        return replace(scan, volume=replace(scan.volume, array=np.empty(0, np.float32))), results

    records = []
    for pairs in map_sharded(lambda part: [denoise_one(k) for k in part], len(scans), ctx.dist):
        for k, (scan, results) in pairs:
            name, source = scans[k]
            outputs = {}
            for method, result in results.items():
                out = Path("scans") / name / (f"{method}.nii.gz" if source.is_file() else method)
                diffusion = method == "diffusion"
                provenance = provenance_record(
                    scan,
                    final / out,
                    result,
                    model_uri=None,
                    checkpoint=checkpoint if diffusion else None,
                    model_digest=model_digest if diffusion else None,
                )
                write_result(scan, result, ctx.work / out, provenance)
                outputs[method] = {
                    "output": str(out),
                    "sigma": result.record["sigma"],
                    "sigma_source": result.record["sigma_source"],
                }
            # the entry's position and digest, not its path: folders of real scans are often named after the patient
            records.append(
                {"name": name, "input": f"denoise.datalist entry {k}", "input_digest": scan.digest, "outputs": outputs}
            )
            print(f"denoise: datalist scan {k + 1}/{len(scans)} done", flush=True)
    return records
