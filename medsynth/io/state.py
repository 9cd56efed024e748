"""Checkpoints (full training state) and model files (EMA weights + how to rebuild the network).

Both hold only tensors and plain Python values, are written atomically, and are read with
``torch.load(weights_only=True)``: nothing is ever unpickled.
"""

from __future__ import annotations

import io
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth.errors import MedsynthError
from medsynth.io.atomic import atomic_write

CHECKPOINT_FORMAT = "medsynth-checkpoint"
MODEL_FORMAT = "medsynth-model"
FORMAT_VERSION = 1


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a torn checkpoint.

    Serialised through a buffer because ``torch.save`` names the archive inside the file after the
    file it writes to; the random temporary name would make equal states differ byte for byte.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def torch_load_weights(path: str | Path, *, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; any failure is one :class:`MedsynthError` line.

    A file that holds pickled Python objects (classes, functions: anything a malicious pickle would
    use to run code) is refused by torch's weights-only unpickler; the message says so instead of
    repeating torch's advice on how to load it anyway. torch's warnings about the file are kept off
    the terminal: the error line says everything.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is a bad file for the user
        raise MedsynthError(f"{path}: not a readable {what} file ({_load_failure(exc)})") from None


def _load_failure(exc: BaseException) -> str:
    """Why a weights-only load failed, in a few words (torch's own text runs to a page)."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        detail = f"; it references {found.group(1)}" if found is not None else ""
        return (
            f"it holds pickled Python objects, not only tensors and plain values{detail}; "
            "refused: medsynth loads weights only and never unpickles code"
        )
    return text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__


def load_state(path: str | Path, *, expected_format: str, what: str | None = None) -> dict[str, Any]:
    """Load a medsynth checkpoint or model file safely.

    ``what`` names the kind of file in the errors (default: the word after ``medsynth-`` in the format).

    Raises:
        MedsynthError: missing file, not a torch file, a pickle that needs code execution, or a file
            that is not the expected medsynth format.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsynthError(f"{path}: {what + ' ' if what else ''}file not found")
    noun = what or expected_format.split("-")[1]
    state = torch_load_weights(path, what=f"medsynth {noun}")
    if not isinstance(state, dict) or state.get("format") != expected_format:
        raise MedsynthError(f"{path}: not a medsynth {noun} file (format tag '{expected_format}' missing)")
    if int(state.get("format_version", 0)) > FORMAT_VERSION:
        raise MedsynthError(f"{path}: written by a newer medsynth (format version {state['format_version']})")
    return state


def rng_states() -> dict[str, Any]:
    """Every global RNG state, as tensors and ints (``weights_only`` accepts both)."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # The legacy np.random.get_state() tuple holds an ndarray that weights_only rejects: store
        # its parts as a tensor and ints.
        "numpy": _numpy_global_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _numpy_global_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "kind": kind,
        "keys": torch.as_tensor(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
