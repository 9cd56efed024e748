"""Closed-form diffusion networks for tests: for Gaussian data x0 ~ N(0, s^2) the optimal epsilon / v /
velocity predictor is known exactly, so samplers and the denoiser can be checked against formulas."""

from __future__ import annotations

import torch

from medsynth.config import DiffusionConfig
from medsynth.diffusion.schedulers import build_train_scheduler

# 0.3 keeps the data well inside [-1, 1], where the samplers clip their x0 estimate.
DATA_STD = 0.3
SHAPES = [(1, 16, 16), (1, 8, 8, 8)]


class ExactGaussianModel(torch.nn.Module):
    """The exact epsilon / v / velocity predictor for x0 ~ N(0, DATA_STD^2), per voxel."""

    def __init__(self, diffusion: DiffusionConfig, spatial_dims: int) -> None:
        super().__init__()
        self.diffusion = diffusion
        # Not a submodule: MONAI schedulers are nn.Modules that eval() need not visit.
        object.__setattr__(self, "scheduler", build_train_scheduler(diffusion, spatial_dims=spatial_dims))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        s2 = DATA_STD**2
        t = timesteps.to(torch.float64).view(-1, *[1] * (x.ndim - 1))
        x = x.to(torch.float64)
        if self.diffusion.scheduler == "rflow":
            # x_t = (1 - tau) x0 + tau n  ->  E[x0 - n | x_t]
            tau = t / self.scheduler.num_train_timesteps
            var = (1 - tau) ** 2 * s2 + tau**2
            return (((1 - tau) * s2 - tau) * x / var).float()
        abar = self.scheduler.alphas_cumprod.to(torch.float64)[timesteps.long()].view_as(t)
        var = abar * s2 + (1 - abar)
        eps = (1 - abar).sqrt() * x / var
        x0 = abar.sqrt() * s2 * x / var
        if self.diffusion.prediction_type == "v_prediction":
            return (abar.sqrt() * eps - (1 - abar).sqrt() * x0).float()
        return eps.float()
