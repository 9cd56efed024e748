"""Networks: the denoising U-Net and its EMA."""
