"""Networks and the model files that rebuild them.

- :mod:`~medsynth.models.unet` — the denoising network, MONAI ``DiffusionModelUNet`` built from the
  model config.
- :mod:`~medsynth.models.ema` — the exponential moving average of its weights, used for sampling.
- :mod:`~medsynth.models.autoencoder` — MONAI ``AutoencoderKL`` for latent diffusion: model file,
  encode/decode, latent scale factor, perceptual loss.
- :mod:`~medsynth.models.controlnet` — a MONAI ``ControlNet`` on a frozen diffusion model, for label
  map to image generation.
- :mod:`~medsynth.models.loading` — a trained model file (``model.pt``) back to network, diffusion
  process and intensity convention.
"""
