"""Training: the one training loop (:mod:`~medsynth.training.engine`: resume, cadence, optimisation, EMA,
progress) and the trainers that run on it, each supplying its networks, one step and its model file:
diffusion (:mod:`~medsynth.training.trainer`), the latent autoencoder (:mod:`~medsynth.training.autoencoder`),
the ControlNet (:mod:`~medsynth.training.controlnet`) and the small evaluation networks (feature network,
classifier, utility models)."""
