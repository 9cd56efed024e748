"""Training: the loop, checkpoints, distributed setup."""
