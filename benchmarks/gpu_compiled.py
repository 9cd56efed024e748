"""GPU follow-up: medsynth with ``train.compile`` (modes default / reduce-overhead, channels-last off)
against the MONAI tutorial loop in fp32 and with fp16 autocast + GradScaler, same card, same process.
Needs CUDA; writes JSON to argv[1].

    python benchmarks/gpu_compiled.py compiled.json
"""
import json, sys, torch
sys.path.insert(0, "benchmarks")
from train_throughput import medsynth_loop, phantom_batch, tutorial_loop
from medsynth.config import load_config
LARGE = ["data.image_size=[128,128]", "data.phantom.shape=[128,128]", "model.channels=[64,128,256]", "model.norm_num_groups=32"]
dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
out = {}
for name, base, mode in (("large", LARGE, "default"), ("large", LARGE, "reduce-overhead"), ("small", [], "reduce-overhead")):
    cfg = load_config("configs/quickstart.yaml", base)
    data = phantom_batch(cfg, 256)
    tutorial_loop(cfg, data, 3, dev)
    r = {"ref_fp32": tutorial_loop(cfg, data, 60, dev), "ref_amp": tutorial_loop(cfg, data, 60, dev, amp=True)}
    c = load_config("configs/quickstart.yaml", base + ["train.channels_last=false", "train.compile=true", f"train.compile_mode={mode}"])
    r["medsynth"], r["whole"] = medsynth_loop(c, data, 100, dev)
    out[f"{name}/{mode}"] = r
    print(name, mode, json.dumps(r), flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
