"""Class conditioning and classifier-free guidance: against an exact class-conditional Gaussian model,
through every sampler, and through training (label dropout) and the pipeline."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from exact_models import DATA_STD, ExactClassGaussianModel

from medsynth.config import DiffusionConfig
from medsynth.diffusion.denoiser import guided
from medsynth.diffusion.sampling import generate
from medsynth.diffusion.schedulers import build_sampling_scheduler

MEANS = [-0.4, 0.4]
CPU = torch.device("cpu")


def draw(sampler: str, steps: int, classes: list[int], guidance: float, prediction: str = "v_prediction", model=None):
    diffusion = DiffusionConfig(prediction_type=prediction, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)
    model = model or ExactClassGaussianModel(diffusion, 2, MEANS)
    schedule = build_sampling_scheduler(diffusion, sampler=sampler, steps=steps, spatial_dims=2)
    return generate(
        model,
        schedule,
        sampler=sampler,
        image_shape=(1, 16, 16),
        seeds=list(range(len(classes))),
        batch_size=4,
        device=CPU,
        class_labels=classes,
        guidance_scale=guidance,
    )


@pytest.mark.parametrize(
    "sampler, steps", [("ddim", 100), ("ddpm", 200), ("heun", 60), ("dpmpp_2m", 60), ("euler", 200)]
)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_conditional_samples_follow_their_class(sampler, steps, prediction) -> None:
    classes = [0, 1] * 8
    out = draw(sampler, steps, classes, 1.0, prediction)
    for c, mean in enumerate(MEANS):
        chosen = out[torch.tensor(classes) == c]
        assert chosen.mean().item() == pytest.approx(mean, abs=0.03)
        # each solver's few-step under-dispersion (see test_sampling.py) stays within 10 %
        assert chosen.std().item() == pytest.approx(DATA_STD, rel=0.1)


def test_guidance_scale_zero_is_the_unconditional_model_and_one_evaluation_per_step() -> None:
    diffusion = DiffusionConfig(schedule="linear_beta", beta_start=1e-4, beta_end=0.02)
    model = ExactClassGaussianModel(diffusion, 2, MEANS, null_mean=0.1)
    out = draw("ddim", 50, [0, 1, 0, 1], 0.0, model=model)
    assert out.mean().item() == pytest.approx(0.1, abs=0.03)
    assert set(model.calls) == {4}  # no doubled batch when w is 0 or 1


def test_guidance_combines_the_two_predictions_linearly_in_one_doubled_batch() -> None:
    diffusion = DiffusionConfig(schedule="linear_beta", beta_start=1e-4, beta_end=0.02)
    model = ExactClassGaussianModel(diffusion, 2, MEANS)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 900])
    labels = torch.tensor([0, 1, 1])
    w = 3.0
    expected = model(x, t, class_labels=torch.full_like(labels, 2)) + w * (
        model(x, t, class_labels=labels) - model(x, t, class_labels=torch.full_like(labels, 2))
    )
    model.calls.clear()
    got = guided(model, class_labels=labels, null_class=2, guidance_scale=w)(x, t)
    assert torch.allclose(got, expected, atol=1e-6) and model.calls == [6]


def test_stronger_guidance_pushes_samples_away_from_the_unconditional_model_and_narrows_them() -> None:
    # With x0|c ~ N(mu_c, s^2) and null N(0, s^2), guidance w extrapolates the class mean (w * mu_c at the
    # end of the probability flow) and, for DDIM, keeps the spread; a deterministic, measurable trade.
    classes = [1] * 8
    plain, strong = draw("ddim", 100, classes, 1.0), draw("ddim", 100, classes, 2.0)
    assert plain.mean().item() == pytest.approx(MEANS[1], abs=0.03)
    assert strong.mean().item() > plain.mean().item() + 0.2


def test_class_labels_are_checked() -> None:
    diffusion = DiffusionConfig()
    model = ExactClassGaussianModel(diffusion, 2, MEANS)
    schedule = build_sampling_scheduler(diffusion, sampler="ddim", steps=5, spatial_dims=2)
    with pytest.raises(ValueError, match="needs class labels"):
        generate(model, schedule, sampler="ddim", image_shape=(1, 8, 8), seeds=[0], batch_size=1, device=CPU)
    with pytest.raises(ValueError, match="0..1"):
        generate(
            model,
            schedule,
            sampler="ddim",
            image_shape=(1, 8, 8),
            seeds=[0],
            batch_size=1,
            device=CPU,
            class_labels=[2],
        )
    with pytest.raises(ValueError, match="1 class labels for 2 samples"):
        generate(
            model,
            schedule,
            sampler="ddim",
            image_shape=(1, 8, 8),
            seeds=[0, 1],
            batch_size=1,
            device=CPU,
            class_labels=[1],
        )


def test_label_dropout_replaces_the_configured_share_with_the_null_class(monkeypatch) -> None:
    import trainers
    from conftest import TINY, deep_update

    from medsynth.config import Config
    from medsynth.training import trainer

    seen: list[torch.Tensor] = []
    original = trainer.partial

    def spy(fn, **kwargs):
        if "class_labels" in kwargs and torch.is_grad_enabled():
            seen.append(kwargs["class_labels"].clone())
        return original(fn, **kwargs)

    monkeypatch.setattr(trainer, "partial", spy)
    config = Config.model_validate(
        deep_update(
            TINY,
            {
                "model": {"num_classes": 2},
                "train": {"max_steps": 40, "batch_size": 8, "label_dropout": 0.25, "val_every": 100, "log_every": 100},
            },
        )
    )
    images = np.random.default_rng(0).uniform(-1, 1, (12, 1, 16, 16)).astype(np.float32)
    classes = np.array([0, 1] * 6)
    with tempfile.TemporaryDirectory() as tmp:
        trainers.diffusion(
            config, images[:10], images[10:], Path(tmp), train_classes=classes[:10], val_classes=classes[10:]
        )
    labels = torch.cat(
        [s for s in seen if len(s) == 8]
    )  # training batches (the validation loss uses the 2 held-out labels)
    assert len(labels) == 40 * 8
    assert (labels == 2).float().mean().item() == pytest.approx(0.25, abs=0.06)
    assert set(labels.tolist()) == {0, 1, 2}
