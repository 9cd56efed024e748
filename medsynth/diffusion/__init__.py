"""Diffusion maths: MONAI schedulers from the config, training objectives, and the reverse process.

:mod:`~medsynth.diffusion.denoiser` reads a trained network once as a denoiser over sigma;
:mod:`~medsynth.diffusion.score` holds the samplers that are sigma lists over it and
:mod:`~medsynth.diffusion.sampling` the MONAI-scheduler ones and ``generate``;
:mod:`~medsynth.diffusion.registry` lists every sampler once (torch-free).
"""
