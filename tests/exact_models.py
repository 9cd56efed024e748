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


class ExactClassGaussianModel(torch.nn.Module):
    """A class-conditional exact predictor: x0 | c ~ N(means[c], DATA_STD^2) per voxel; the last class
    (the 'no class' token of classifier-free guidance) is N(null_mean, DATA_STD^2). Takes
    ``class_labels`` like MONAI's ``DiffusionModelUNet`` with ``num_class_embeds``."""

    def __init__(
        self, diffusion: DiffusionConfig, spatial_dims: int, means: list[float], null_mean: float = 0.0
    ) -> None:
        super().__init__()
        self.diffusion = diffusion
        self.means = torch.tensor([*means, null_mean], dtype=torch.float64)
        self.num_class_embeds = len(means) + 1
        self.calls: list[int] = []  # batch size of every call
        object.__setattr__(self, "scheduler", build_train_scheduler(diffusion, spatial_dims=spatial_dims))

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if class_labels is None:
            raise ValueError("class_labels should be provided when num_class_embeds > 0")
        self.calls.append(len(x))
        s2 = DATA_STD**2
        shape = (-1, *[1] * (x.ndim - 1))
        t = timesteps.to(torch.float64).view(shape)
        mu = self.means[class_labels.long()].view(shape)
        x = x.to(torch.float64)
        abar = self.scheduler.alphas_cumprod.to(torch.float64)[timesteps.long()].view_as(t)
        var = abar * s2 + (1 - abar)
        x0 = mu + abar.sqrt() * s2 * (x - abar.sqrt() * mu) / var
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        if self.diffusion.prediction_type == "v_prediction":
            return (abar.sqrt() * eps - (1 - abar).sqrt() * x0).float()
        return eps.float()
