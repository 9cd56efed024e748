"""Compiled training on a GPU: medsynth with ``train.compile`` (modes default / reduce-overhead, channels-last off)
against the MONAI tutorial loop in fp32 and with fp16 autocast + GradScaler, same card, same process.
Needs CUDA; writes JSON to argv[1].

    python benchmarks/gpu_compiled.py compiled.json
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import LARGE, cuda_device  # noqa: E402
from train_throughput import medsynth_loop, phantom_batch, tutorial_loop  # noqa: E402

from medsynth.config import load_config  # noqa: E402

dev = cuda_device()
out = {}
for name, base, mode in (
    ("large", LARGE, "default"),
    ("large", LARGE, "reduce-overhead"),
    ("small", [], "reduce-overhead"),
):
    cfg = load_config("configs/quickstart.yaml", base)
    data = phantom_batch(cfg, 256)
    tutorial_loop(cfg, data, 3, dev)
    r = {"ref_fp32": tutorial_loop(cfg, data, 60, dev), "ref_amp": tutorial_loop(cfg, data, 60, dev, amp=True)}
    c = load_config(
        "configs/quickstart.yaml",
        base + ["train.channels_last=false", "train.compile=true", f"train.compile_mode={mode}"],
    )
    r["medsynth"], r["whole"] = medsynth_loop(c, data, 100, dev)
    out[f"{name}/{mode}"] = r
    print(name, mode, json.dumps(r), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
