"""Compare two pipeline output folders file by file: are the trained weights, the samples and the synthetic
cases bit-identical, and which evaluation numbers differ? For checking that a change of the code keeps
results (e.g. two clones at different commits, each having run ``medsynth run configs/quickstart.yaml``).

    python benchmarks/compare_runs.py --a /path/to/before/runs/quickstart --b runs/quickstart
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="output folder of the reference run")
    parser.add_argument("--b", type=Path, required=True, help="output folder of the run to compare")
    args = parser.parse_args()
    a, b = args.a, args.b
    wa = torch.load(a / "train" / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(b / "train" / "model.pt", weights_only=True)["state_dict"]
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"train/model.pt weights: {'bit-identical' if worst == 0 else f'max abs difference {worst:.3g}'}")
    for rel in ("sample/samples.npy", "augment/synthetic_images.npy"):
        if (a / rel).is_file() and (b / rel).is_file():
            x, y = np.load(a / rel), np.load(b / rel)
            same = x.shape == y.shape and np.array_equal(x, y)
            print(f"{rel}: {'bit-identical' if same else 'different'}")
    ma = numbers(json.loads((a / "evaluate" / "metrics.json").read_text()))
    mb = numbers(json.loads((b / "evaluate" / "metrics.json").read_text()))
    common = sorted(set(ma) & set(mb))
    differing = [k for k in common if ma[k] != mb[k]]
    print(f"evaluate/metrics.json: {len(common) - len(differing)} of {len(common)} numbers identical")
    for key in differing:
        print(f"  {key}: {ma[key]:.4g} -> {mb[key]:.4g}")


if __name__ == "__main__":
    main()
