"""Pipeline overhead: the share of a training stage spent in MLflow, and the time of a cached rerun.

1. ``medsynth run <config> --stages prepare,train`` in this process, with every public function of the
   ``mlflow`` module, ``mlflow.pytorch.log_model`` and every ``MlflowClient`` method timed (outermost
   call only, so nested MLflow calls are not counted twice). Printed: the train stage's wall time, the
   seconds inside MLflow during it, and their ratio (the target is at most 3 %).
2. The same command again in a fresh process (interpreter start-up included): every stage is
   unchanged, so it is skipped; printed: its wall time (the target is at most 10 s).

    python benchmarks/pipeline_overhead.py --config configs/quickstart.yaml --set train.max_steps=300

The run writes under a temporary folder (``output_dir`` and the MLflow store are redirected there).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class MlflowClock:
    """Seconds spent in MLflow calls (outermost only), by function name."""

    def __init__(self) -> None:
        self.depth = 0
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, owner, name: str, label: str) -> None:
        function = getattr(owner, name)

        @functools.wraps(function)
        def timed(*args, **kwargs):
            if self.depth:
                return function(*args, **kwargs)
            self.depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.depth -= 1
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(owner, name, timed)

    def install(self) -> None:
        import mlflow
        import mlflow.pytorch
        from mlflow.tracking import MlflowClient

        for name, value in vars(mlflow).items():
            if not name.startswith("_") and inspect.isfunction(value):
                self.wrap(mlflow, name, f"mlflow.{name}")
        self.wrap(mlflow.pytorch, "log_model", "mlflow.pytorch.log_model")
        for name, value in vars(MlflowClient).items():
            if not name.startswith("_") and inspect.isfunction(value):
                self.wrap(MlflowClient, name, f"MlflowClient.{name}")

    def total(self) -> float:
        return sum(self.seconds.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from medsynth.cli import main as medsynth

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*args.set, f"output_dir={tmp}/out", f"tracking.uri=sqlite:///{tmp}/mlflow.db"]
        command = ["run", args.config, *overrides, "--stages", "prepare,train"]
        # the store's schema is created once, before timing (an existing team store has it already)
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.search_experiments()

        clock = MlflowClock()
        clock.install()
        assert medsynth(["prepare", args.config, *overrides]) == 0
        before, start = clock.total(), time.perf_counter()
        assert medsynth(["train", args.config, *overrides]) == 0
        train_seconds, mlflow_seconds = time.perf_counter() - start, clock.total() - before

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        rerun = subprocess.run(
            [sys.executable, "-m", "medsynth", *command], capture_output=True, text=True, env=env, cwd=ROOT
        )
        rerun_seconds = time.perf_counter() - start
        assert rerun.returncode == 0, rerun.stderr[-2000:]

    top = sorted(clock.seconds.items(), key=lambda kv: -kv[1])[:8]
    result = {
        "config": args.config,
        "overrides": args.set,
        "train_stage_s": round(train_seconds, 2),
        "mlflow_s_during_train": round(mlflow_seconds, 3),
        "mlflow_share": round(mlflow_seconds / train_seconds, 4),
        "cached_rerun_s": round(rerun_seconds, 2),
        "cached_rerun_said": rerun.stdout.strip().splitlines()[-1:],
        "slowest_mlflow_calls": {k: [round(v, 3), clock.calls[k]] for k, v in top},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
