"""medsynth: MONAI-based diffusion models to synthesise and denoise medical scans."""

from __future__ import annotations

__version__ = "0.1.0"

from medsynth.errors import MedsynthError

__all__ = ["MedsynthError", "__version__"]
