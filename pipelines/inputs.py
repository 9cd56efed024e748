"""Stage helpers that several stages share: what a stage reads from the outputs of earlier stages.

Stages never import each other; what two of them need lives here.
"""

from __future__ import annotations

from medsynth.data.prepare import load_split
from pipelines.stage import StageContext


def sampling_inputs(ctx: StageContext, count: int):
    """For sample / augment with a trained ControlNet: the ControlNet, ``count`` label maps (cycled over the
    given files or the held-out cases), their sources, and the real images behind them (held-out
    cases; None for given files). ``(None, None, None, None)`` when the config trains no ControlNet."""
    import numpy as np

    from medsynth.models.controlnet import check_label_maps, load_controlnet
    from medsynth.synthesis import label_maps_for

    if "controlnet" not in ctx.inputs:
        return None, None, None, None
    controlnet = load_controlnet(ctx.inputs["controlnet"] / "controlnet.pt", ctx.dist.device)
    cache = ctx.inputs["prepare"] / "cache"
    given = ctx.config.controlnet.label_maps
    fallback = None if given else load_split(cache, "val")["labels"]
    maps, sources = label_maps_for(given, fallback, count)
    source = str(given) if given else f"{cache}/val_labels.npy"
    maps = check_label_maps(maps, controlnet.image_size, controlnet.num_labels, source).numpy()
    real = None
    if not given:
        val_images = np.load(cache / "val_images.npy", allow_pickle=False)
        real = val_images[[i % len(val_images) for i in range(count)]]
    return controlnet, maps, sources, real
