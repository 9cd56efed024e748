"""Per-voxel golden values of the samplers, 2D and 3D separately, through generate().

The network is the exact Gaussian predictor plus half a tiny seeded MONAI ``DiffusionModelUNet``: the
exact part keeps the estimates inside the clipping range, the UNet makes the output nonlinear and
spatially mixed, so a changed coefficient, noise draw, timestep, scaling or axis shows in the voxels.
The values were recorded before the samplers were rewritten over the shared denoiser and must not
move: rtol 1e-5 (plus 1e-6 absolute for values near 0), which covers thread-count rounding (~1e-7).
"""

from __future__ import annotations

import pytest
import torch
from exact_models import ExactGaussianModel
from monai.networks.nets import DiffusionModelUNet

from medsynth.config import DiffusionConfig
from medsynth.diffusion.sampling import generate
from medsynth.diffusion.schedulers import build_sampling_scheduler

SHAPES = {2: (1, 16, 16), 3: (1, 8, 8, 8)}


class PerturbedExactModel(torch.nn.Module):
    """The exact predictor plus ``0.5 *`` a tiny seeded UNet."""

    def __init__(self, diffusion: DiffusionConfig, spatial_dims: int) -> None:
        super().__init__()
        self.exact = ExactGaussianModel(diffusion, spatial_dims)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.unet = DiffusionModelUNet(
                spatial_dims=spatial_dims,
                in_channels=1,
                out_channels=1,
                channels=(8, 8),
                attention_levels=(False, False),
                num_res_blocks=1,
                norm_num_groups=8,
            )
        # MONAI zero-initialises the output convolution; give it small seeded weights
        with torch.no_grad():
            self.unet.out[-1].conv.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.exact(x, timesteps) + 0.5 * self.unet(x, timesteps=timesteps)


PROCESSES = {"ddpm-eps": ("ddpm", "epsilon"), "ddpm-v": ("ddpm", "v_prediction"), "rflow": ("rflow", "v_prediction")}
# (spatial dims, process, sampler): voxels [0, 37, 101, 255, n + 3, n + 200, 2n - 1] of the
# two samples (seeds 0, 1; n voxels each), 4 steps, 100 trained timesteps.
GOLDEN = {
    (2, "ddpm-eps", "ddim"): [-0.4466969, 0.0709839, -0.6916743, 0.1716033, -0.6801231, -0.1569892, 0.2267027],
    (2, "ddpm-eps", "euler"): [-0.3290041, 0.0681615, -0.5192965, 0.1365508, -0.5281137, -0.0774555, 0.1686787],
    (2, "ddpm-eps", "heun"): [-0.5435518, 0.0679662, -0.8253993, 0.1987566, -0.8060483, -0.2189213, 0.2718764],
    (2, "ddpm-eps", "dpmpp_2m"): [-0.4448301, 0.05968, -0.6758715, 0.1649384, -0.666562, -0.1670426, 0.2232427],
    (2, "ddpm-eps", "pc"): [-0.298764, 0.104021, 0.3068635, -0.5711393, -0.1864074, -0.3941412, 0.1391267],
    (2, "ddpm-v", "ddim"): [-0.4417842, 0.0663717, -0.681645, 0.1668781, -0.6654273, -0.1653254, 0.2233806],
    (2, "ddpm-v", "dpmpp_2m"): [-0.4452172, 0.0639861, -0.6816098, 0.1661342, -0.6683668, -0.1663901, 0.2229993],
    (2, "rflow", "rflow"): [-0.1769793, -0.0178397, -0.2365959, 0.0460153, -0.2160313, -0.1323955, 0.0922646],
    (2, "rflow", "heun"): [-0.9298651, 0.048476, -1.0, 0.3364968, -1.0, -0.4090025, 0.5005171],
    (3, "ddpm-eps", "ddim"): [-0.3592025, 0.0368424, -0.6549588, 0.1387324, -0.6055775, -0.3034929, -0.1575416],
    (3, "ddpm-eps", "euler"): [-0.2078772, 0.027442, -0.4562821, 0.1039489, -0.4254121, -0.2765916, -0.0745669],
    (3, "ddpm-eps", "heun"): [-0.4729872, 0.0572199, -0.7760373, 0.1942206, -0.7551463, -0.316821, -0.2252216],
    (3, "ddpm-eps", "dpmpp_2m"): [-0.3678431, 0.0503372, -0.61375, 0.1647153, -0.610578, -0.2700998, -0.1735745],
    (3, "ddpm-eps", "pc"): [-0.1797013, -0.2124868, -0.0379038, -0.1951554, -0.278841, -0.2387099, 0.0461936],
    (3, "ddpm-v", "ddim"): [-0.3715208, 0.0368529, -0.6543727, 0.1381866, -0.6049405, -0.2860043, -0.1668165],
    (3, "ddpm-v", "dpmpp_2m"): [-0.3694973, 0.0436447, -0.6353599, 0.1499859, -0.6110283, -0.280462, -0.1695463],
    (3, "rflow", "rflow"): [-0.229954, 0.0338982, -0.22784, 0.0874366, -0.2715297, 0.0122695, -0.1521011],
    (3, "rflow", "heun"): [-0.8069583, 0.1063493, -1.0, 0.3488816, -1.0, -0.4249143, -0.4562888],
}  # fmt: skip


@pytest.mark.parametrize("case", list(GOLDEN), ids=lambda c: f"{c[0]}d-{c[1]}-{c[2]}")
def test_sampler_voxels_match_their_golden(case) -> None:
    dims, name, sampler = case
    process, prediction = PROCESSES[name]
    diffusion = DiffusionConfig(
        scheduler=process,
        prediction_type=prediction,
        schedule="linear_beta",
        beta_start=1e-4,
        beta_end=0.02,
        num_train_timesteps=100,
    )
    schedule = build_sampling_scheduler(diffusion, sampler=sampler, steps=4, spatial_dims=dims)
    out = generate(
        PerturbedExactModel(diffusion, dims),
        schedule,
        sampler=sampler,
        image_shape=SHAPES[dims],
        seeds=[0, 1],
        batch_size=2,
        device=torch.device("cpu"),
    )
    flat, n = out.flatten(), out[0].numel()
    voxels = flat[[0, 37, 101, 255, n + 3, n + 200, 2 * n - 1]].double()
    torch.testing.assert_close(voxels, torch.tensor(GOLDEN[case], dtype=torch.float64), rtol=1e-5, atol=1e-6)
