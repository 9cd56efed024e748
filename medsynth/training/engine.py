"""The one training loop of medsynth: every trainer (diffusion, autoencoder + discriminator, ControlNet, the
small evaluation networks) runs through :func:`fit` and supplies only what differs: its networks (as
:class:`Optimised` groups), one :meth:`Trainer.step`, its validation and its final model file.

What the loop owns, once for every trainer:

- **exact resume**: the batch indices and the step's generator are pure functions of ``(seed, step)``
  (:func:`batch_indices`, :func:`step_generator`); a checkpoint holds every other piece of state (networks,
  EMA, optimisers, LR schedules, global RNG states, step, history) and the *result view* of the run's config
  (the keys that change results, :func:`medsynth.config.result_view`). A checkpoint whose view differs is
  refused with one line naming the keys that differ; a resumed run ends with the same weights as an
  uninterrupted one (on CPU; GPU kernels are not bitwise deterministic);
- fused AdamW, gradient clipping, linear warm-up + cosine LR decay, EMA (:class:`Optimised`);
- the loss window without per-step device syncs on CUDA (the window is checked for a non-finite loss before
  it is logged or checkpointed; on CPU every step is checked, which costs nothing);
- log / validation / checkpoint cadence, the checkpoint of the last completed step on Ctrl-C;
- progress: a tqdm bar on a terminal, plain lines (step, loss, images/s, ETA) at least every
  :data:`PROGRESS_INTERVAL_S` seconds when the output is a log file (batch jobs).

No MLflow here: metrics leave through the ``log_metrics`` callback of :class:`RunSettings`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medsynth.config import differing_keys, digest
from medsynth.errors import MedsynthError
from medsynth.io.state import FORMAT_VERSION, load_state, rng_states, save_state, set_rng_states
from medsynth.models.ema import EMA
from medsynth.runtime import DistContext

MetricsCallback = Callable[[dict[str, float], int], None] | None
PROGRESS_INTERVAL_S = 30.0  # plain progress lines when stdout is not a terminal: at least twice a minute
CPU = DistContext(0, 1, 0, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# Helpers: pure functions of (seed, step)
# ---------------------------------------------------------------------------------------------


def batch_indices(step: int, batch: int, count: int, seed: int) -> np.ndarray:
    """Indices of global batch ``step``: a stream of per-epoch permutations seeded by ``(seed, epoch)``."""
    start = step * batch
    out: list[int] = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), count)
        order = np.random.default_rng([seed, epoch]).permutation(count)
        out.extend(order[offset : offset + batch - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator for one step's noise, timesteps, crops and augmentations: a pure function of (seed, step)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def lr_factor(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Linear warm-up, then cosine decay to ``floor`` (as a fraction of the peak LR)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def default_warmup(warmup_steps: int | None, max_steps: int) -> int:
    """``warmup_steps``, or (null) a tenth of the run, at most 50 steps: the short warm-up of MONAI's tutorials."""
    return min(50, max_steps // 10) if warmup_steps is None else warmup_steps


def adamw(params: Iterable[nn.Parameter], *, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA): one kernel for all parameters instead of a loop,
    measured about 4x faster per optimiser step on a 2-core CPU (docs/benchmarks.md)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def run_identity(view: dict[str, Any]) -> str:
    """The digest of a run's result view: what a checkpoint must match to be resumed."""
    return digest(view)


# ---------------------------------------------------------------------------------------------
# What a trainer declares
# ---------------------------------------------------------------------------------------------


class Optimised:
    """One trained network: its fused AdamW, LR schedule (warm-up + cosine decay), gradient clipping and
    optional EMA. The loop updates it with ``losses[loss]`` on the steps from ``start`` on.

    Args:
        name: its name in checkpoints (``model``, ``discriminator``, ...).
        module: the network whose parameters are trained (not its DDP wrapper).
        lr: peak learning rate; ``lr_key`` names its config key in the divergence message.
        total: steps of the LR schedule (counted from ``start``).
        warmup: linear warm-up steps; ``floor``: the cosine decay's end as a fraction of ``lr``.
        grad_clip: max gradient norm, or None.
        ema_decay: keep an EMA of the weights with this decay (None: no EMA); ``ema_warmup`` as :class:`EMA`.
        loss: the key of the step's losses that this network minimises.
        start: the first step at which it is updated (a discriminator that starts late).
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        *,
        lr: float,
        total: int,
        lr_key: str,
        weight_decay: float = 0.0,
        warmup: int = 0,
        floor: float = 0.0,
        grad_clip: float | None = None,
        ema_decay: float | None = None,
        ema_warmup: bool = True,
        loss: str = "loss",
        start: int = 0,
        scale: float = 1.0,
    ) -> None:
        self.name, self.module, self.loss, self.start, self.lr_key = name, module, loss, start, lr_key
        self.grad_clip, self.scale = grad_clip, scale
        # EMA first: its shadow is a copy of the initial weights, before any training-only change
        self.ema = EMA(module, decay=ema_decay, warmup=ema_warmup) if ema_decay is not None else None
        self.optimizer = adamw(module.parameters(), lr=lr, weight_decay=weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup=warmup, total=total, floor=floor)
        )

    def active(self, step: int) -> bool:
        return step >= self.start

    def update(self, loss: torch.Tensor) -> None:
        """One optimiser step on ``scale * loss``: backward, clip, AdamW, LR schedule, EMA."""
        self.optimizer.zero_grad(set_to_none=True)
        (loss if self.scale == 1.0 else self.scale * loss).backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update(self.module)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


@dataclass(frozen=True)
class Cadence:
    """How long a run is and how often it reports: the trainer's own section supplies these."""

    max_steps: int
    batch_size: int
    log_every: int = 10
    val_every: int | None = None  # None: validate at the end only
    checkpoint_every: int | None = None  # None: no periodic checkpoint (the final one is still written)
    resume: bool = False


@dataclass(frozen=True)
class RunSettings:
    """Where and how a run happens; none of it changes the trained weights but ``seed``.

    Args:
        seed: seeds the initial weights, the batches and every step's random draws.
        work_dir: ``checkpoints/last.pt`` is kept here (rank 0); None: no checkpoint (short in-memory runs).
        dist: the process group (single process: rank 0 of 1).
        log_metrics: called with ``({name: value}, step)`` on rank 0 at every log step.
        step_callback: called after every completed (and, when due, checkpointed) step.
        progress: the label of the progress bar / lines; None: no progress at all.
        stream: where plain progress lines go when it is not a terminal (default: stdout).
    """

    seed: int = 0
    work_dir: Path | None = None
    dist: DistContext = CPU
    log_metrics: MetricsCallback = None
    step_callback: Callable[[int], None] | None = None
    progress: str | None = "train"
    stream: TextIO | None = None

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.work_dir is None else self.work_dir / "checkpoints" / "last.pt"


class Trainer:
    """What one kind of training supplies to :func:`fit`. Subclasses set the attributes in ``__init__``.

    Attributes:
        checkpoint_format: the format tag of its checkpoints.
        view: its result view (the config keys that change its result, plus data shape and seed).
        groups: its trained networks, in update order.
        dataset_size: the number of training items the batches index.
        metric_prefix: the prefix of the logged metric names (``train/loss``).
    """

    checkpoint_format: str = "medsynth-checkpoint"
    metric_prefix: str = "train"
    view: dict[str, Any]
    items_per_index: int = 1  # training items per batch index (several random crops per scan)
    groups: list[Optimised]
    dataset_size: int

    def step(self, step: int, index: np.ndarray, shard: slice, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Forward pass of global batch ``step`` (``index``: all of its items; this rank trains ``shard`` of them).

        Returns the losses by name (each :class:`Optimised` reads its own); every entry is logged as a
        windowed mean ``<prefix>/<name>``.
        """
        raise NotImplementedError

    def train_mode(self) -> None:
        for group in self.groups:
            group.module.train()

    def validate(self, step: int) -> dict[str, float]:
        """Metrics of the current weights at a validation step (rank 0; default: none)."""
        return {}

    def validation_names(self) -> tuple[str, ...]:
        """The names :meth:`validate` returns, reported as NaN on ranks > 0."""
        return ()

    def extra_state(self) -> dict[str, Any]:
        """More checkpointed state beyond the groups (default: none)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class FitResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar when stdout is a terminal; otherwise plain lines at least every ``interval`` seconds.

    Args:
        label: what is trained (the lines start with it).
        total: steps of the run; ``initial``: the step it starts at (a resumed run).
        enabled: False on ranks > 0 and for silent runs.
        stream: where plain lines go (default: stdout); ``clock``: a time source (tests).
    """

    def __init__(
        self,
        label: str,
        total: int,
        initial: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.initial, self.interval, self.clock = label, total, initial, interval, clock
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=label, unit="step", dynamic_ncols=True)
        self.started = self.last = clock()
        self.loss: float | None = None
        self.images_per_s: float | None = None

    def update(self, done: int, *, loss: float | None = None, images_per_s: float | None = None) -> None:
        if loss is not None:
            self.loss = loss
        if images_per_s is not None:
            self.images_per_s = images_per_s
        if not self.enabled:
            return
        if self.bar is not None:
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}")
            self.bar.update(done - self.bar.n)
            return
        now = self.clock()
        if now - self.last >= self.interval or done == self.total or done == self.initial + 1:
            self.last = now
            self.stream.write(self.line(done, now) + "\n")
            self.stream.flush()

    def line(self, done: int, now: float) -> str:
        rate = (done - self.initial) / max(now - self.started, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        parts = [f"{self.label}: step {done}/{self.total}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        if self.images_per_s is not None:
            parts.append(f"{self.images_per_s:.1f} images/s")
        parts.append(f"ETA {_duration(eta)}")
        return ", ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _refusal(path: Path, old: dict[str, Any] | None, new: dict[str, Any]) -> MedsynthError:
    keys = differing_keys(old or {}, new) if isinstance(old, dict) else []
    what = f"other values of {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}" if keys else "another config"
    return MedsynthError(
        f"{path}: was trained with {what}, which change the result; cannot resume "
        "(rerun with --force to start over, or set the old values)"
    )


def resume_state(path: Path, trainer: Trainer) -> dict[str, Any]:
    """The checkpoint at ``path`` if it belongs to this run (same result view), else a one-line refusal."""
    state = load_state(path, expected_format=trainer.checkpoint_format)
    if state.get("identity") != run_identity(trainer.view):
        raise _refusal(path, state.get("view"), trainer.view)
    return state


def fit(trainer: Trainer, cadence: Cadence, run: RunSettings) -> FitResult:
    """Train ``trainer`` for ``cadence.max_steps`` global steps of ``cadence.batch_size`` items.

    Every rank draws the whole global batch's indices and generator and the trainer keeps this rank's
    share, so N processes train what one process would (up to summation order).

    Raises:
        MedsynthError: a checkpoint of another run on resume, or a diverged (non-finite) loss.
    """
    ctx, device = run.dist, run.dist.device
    if cadence.batch_size % ctx.world_size:
        raise MedsynthError(f"the batch size {cadence.batch_size} is not divisible by the {ctx.world_size} processes")
    path = run.checkpoint_path
    identity = run_identity(trainer.view)

    # 1. resume
    start, history, resumed_from = 0, [], None
    window: dict[str, list[torch.Tensor]] = {}  # the losses since the last log step, by name
    if cadence.resume and path is not None and path.is_file():
        state = resume_state(path, trainer)
        for group in trainer.groups:
            group.load_state_dict(state["groups"][group.name])
        trainer.load_extra_state(state.get("extra", {}))
        set_rng_states(state["rng"])
        start, history, resumed_from = int(state["step"]), list(state["history"]), int(state["step"])
        if ctx.is_main and run.progress is not None:
            print(f"{run.progress}: resuming from {path} at step {start}", flush=True)
        # the open loss window too, so that the next log step reports what an uninterrupted run would
        window = {name: list(values.to(device).unbind()) for name, values in state.get("window", {}).items()}
        # A kill between the checkpoint and the report of its step would lose that report: send it again
        # (a continued MLflow run drops the steps it holds already, so nothing is logged twice).
        if history and history[-1]["step"] == start and ctx.is_main and run.log_metrics is not None:
            run.log_metrics({k: v for k, v in history[-1].items() if k != "step"}, start)

    def checkpoint(step: int) -> None:
        if not ctx.is_main or path is None:
            return
        save_state(
            path,
            {
                "format": trainer.checkpoint_format,
                "format_version": FORMAT_VERSION,
                "identity": identity,
                "view": trainer.view,
                "step": step,
                "groups": {group.name: group.state_dict() for group in trainer.groups},
                "extra": trainer.extra_state(),
                "rng": rng_states(),
                "data_order": {
                    "seed": run.seed,
                    "next_position": step * cadence.batch_size,
                    "dataset_size": trainer.dataset_size,
                },
                "history": history,
                "window": {name: torch.stack(values).cpu() for name, values in window.items() if values},
            },
        )

    # 2. loop
    prefix = trainer.metric_prefix
    window_images, window_start = 0, time.perf_counter()
    progress = Progress(
        run.progress or "",
        cadence.max_steps,
        start,
        enabled=ctx.is_main and run.progress is not None,
        stream=run.stream,
    )
    shard = slice(ctx.rank, None, ctx.world_size)
    completed, updating = start, False
    try:
        for step in range(start, cadence.max_steps):
            trainer.train_mode()
            index = batch_indices(step, cadence.batch_size, trainer.dataset_size, run.seed)
            generator = step_generator(run.seed, step, device)
            # 1. the trainer's forward pass: its losses
            losses = trainer.step(step, index, shard, generator)
            # On CPU the check costs nothing; on a GPU reading a loss each step would stall the queue of
            # kernels, so there the window is checked before it is logged or checkpointed.
            if device.type == "cpu":
                for name, value in losses.items():
                    if not torch.isfinite(value):
                        raise _diverged(trainer, name, step, float(value))
            # 2. update every network due at this step, in order
            updating = True
            for group in trainer.groups:
                if group.active(step):
                    group.update(losses[group.loss])
            completed, updating = step + 1, False

            done = completed
            for name, value in losses.items():
                window.setdefault(name, []).append(value.detach().float())
            window_images += len(index) * trainer.items_per_index  # the global batch: every rank trains its share
            logging_due = done % cadence.log_every == 0 or done == cadence.max_steps
            checkpoint_due = done == cadence.max_steps or (
                cadence.checkpoint_every is not None and done % cadence.checkpoint_every == 0
            )
            if logging_due or checkpoint_due:
                means = {name: float(torch.stack(values).mean()) for name, values in window.items()}
                for name, value in means.items():
                    if not math.isfinite(value):
                        raise _diverged(trainer, name, done, value, before=True)
            record = None
            if logging_due:
                elapsed = time.perf_counter() - window_start
                record = {f"{prefix}/{name}": value for name, value in means.items()}
                record[f"{prefix}/lr"] = trainer.groups[0].lr
                record[f"{prefix}/images_per_s"] = window_images / max(elapsed, 1e-9)
                validation_due = done == cadence.max_steps or (
                    cadence.val_every is not None and done % cadence.val_every == 0
                )
                if validation_due:
                    record.update(
                        trainer.validate(done)
                        if ctx.is_main
                        else dict.fromkeys(trainer.validation_names(), float("nan"))
                    )
                history.append({"step": done, **record})
                window, window_images, window_start = {}, 0, time.perf_counter()
            # the checkpoint before the metrics leave: a step reported to the tracker is never run twice
            # after a kill when every log step is a checkpoint step
            if checkpoint_due:
                checkpoint(done)
            if record is not None:
                if ctx.is_main and run.log_metrics is not None:
                    run.log_metrics(record, done)
                progress.update(done, loss=means.get("loss"), images_per_s=record[f"{prefix}/images_per_s"])
            else:
                progress.update(done)
            if run.step_callback is not None:
                run.step_callback(done)
    except KeyboardInterrupt:
        # Keep the work: when the interrupt fell between steps, checkpoint the last completed one so that
        # a resumed run continues there; mid-update the state is torn, so the periodic one stands.
        if not updating and completed > start:
            checkpoint(completed)
        raise
    finally:
        progress.close()
    return FitResult(steps=cadence.max_steps, history=history, resumed_from=resumed_from)


def _diverged(trainer: Trainer, name: str, step: int, value: float, *, before: bool = False) -> MedsynthError:
    group = next((g for g in trainer.groups if g.loss == name), trainer.groups[0])
    when = f"before step {step}" if before else f"at step {step}"
    what = "loss" if name == "loss" else f"{name} loss"
    return MedsynthError(f"training diverged {when} ({what} {value}); lower {group.lr_key}")
