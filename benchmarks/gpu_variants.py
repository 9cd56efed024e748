"""Eager training variants on a GPU: medsynth's training step with channels-last on/off and bf16 autocast
(``train.precision=auto``) or fp32, against the fp32 MONAI tutorial loop, on the quickstart network
(32x32, batch 32) and a larger one (128x128, channels 64-128-256). Needs CUDA; writes JSON to argv[1].

    python benchmarks/gpu_variants.py variants.json
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
for name, base in (("large", LARGE), ("small", [])):
    cfg = load_config("configs/quickstart.yaml", base)
    data = phantom_batch(cfg, 256)
    tutorial_loop(cfg, data, 3, dev)
    out[name] = {"ref_fp32": tutorial_loop(cfg, data, 60, dev)}
    for cl in ("true", "false"):
        for prec in ("auto", "fp32"):
            c = load_config("configs/quickstart.yaml", base + [f"train.channels_last={cl}", f"train.precision={prec}"])
            out[name][f"cl={cl},prec={prec}"] = medsynth_loop(c, data, 60, dev)[0]
    out[name]["ref_fp32_again"] = tutorial_loop(cfg, data, 60, dev)
    print(json.dumps(out[name]), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
