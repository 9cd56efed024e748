"""Exponential moving average of model weights, used for sampling."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A shadow copy of a model whose weights follow ``decay * shadow + (1 - decay) * weights``.

    With ``warmup`` the decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that the
    shadow follows the model closely early on instead of averaging in the random initialisation
    (the warm-up used by TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``).

    Args:
        model: the model being trained (unwrapped, not DDP).
        decay: the final decay.
        warmup: ramp the decay up from 0.
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.999, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        shadow = dict(self.shadow.named_parameters())
        names = [name for name, _ in model.named_parameters()]
        # one multi-tensor kernel instead of one per parameter (the same arithmetic as lerp_)
        torch._foreach_lerp_([shadow[n] for n in names], [p.detach() for _, p in model.named_parameters()], 1.0 - decay)
        shadow_buffers = dict(self.shadow.named_buffers())
        for name, buffer in model.named_buffers():
            shadow_buffers[name].copy_(buffer)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"shadow": self.shadow.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state["shadow"])
        self.num_updates = int(state["num_updates"])
