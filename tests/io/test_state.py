"""Tests for medsynth.io.state: the global RNG states round-trip (in memory and through a checkpoint
read with ``weights_only``), and a pickle that carries code is refused with one line."""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.errors import MedsynthError
from medsynth.io.state import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    load_state,
    rng_states,
    save_state,
    set_rng_states,
    torch_load_weights,
)

# --- helpers -------------------------------------------------------------------------------------

# One draw from each global generator; the normal draws use (and refill) the Gaussian caches that
# Python's random.gauss and numpy's legacy standard_normal keep in their states.
DRAWS = {
    "torch": lambda: torch.rand(8).tolist() + torch.randn(3).tolist(),
    "python": lambda: [random.random() for _ in range(8)] + [random.gauss(0.0, 1.0)],
    "numpy": lambda: np.random.rand(8).tolist() + [float(np.random.standard_normal())],
}
if torch.cuda.is_available():
    DRAWS["cuda"] = lambda: torch.rand(8, device="cuda").tolist()


def draws() -> dict[str, list[float]]:
    return {name: draw() for name, draw in DRAWS.items()}


@pytest.fixture
def states() -> dict:
    """The RNG states captured mid-stream: seeded, advanced, with a Gaussian value cached in each cache."""
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    draws()
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1  # caches are filled
    return rng_states()


# --- round trips -----------------------------------------------------------------------------------


def test_restored_states_repeat_the_draws(states: dict) -> None:
    first = draws()
    set_rng_states(states)
    again = draws()
    assert again == first
    # Without a restore the generators go on to new values: a set_rng_states that did nothing (for any
    # one generator) would fail the equality above.
    later = draws()
    assert all(later[name] != first[name] for name in DRAWS)


@pytest.mark.parametrize("name", DRAWS)
def test_each_generator_is_restored(states: dict, name: str) -> None:
    first = DRAWS[name]()
    draws()  # move every generator on
    set_rng_states(states)
    assert DRAWS[name]() == first


def test_states_survive_a_checkpoint_read_with_weights_only(states: dict, tmp_path: Path) -> None:
    first = draws()
    path = save_state(
        tmp_path / "checkpoint.pt", {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "rng": states}
    )
    draws()  # move every generator on
    loaded = load_state(path, expected_format=CHECKPOINT_FORMAT)  # torch.load(weights_only=True)
    set_rng_states(loaded["rng"])
    assert draws() == first


def test_states_are_only_tensors_and_plain_values(states: dict) -> None:
    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (torch.Tensor, str, int, float))

    assert plain(states)


# --- pickles with code are refused ----------------------------------------------------------------------


class RunsCode:
    """Unpickling this object runs ``code`` (what a malicious checkpoint does)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def write_pickle_with_code(path: Path, marker: Path, *, container: str) -> Path:
    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "payload": RunsCode(f"open({str(marker)!r}, 'w')"),
    }
    if container == "torch":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    return path


@pytest.mark.parametrize("container", ["torch", "plain_pickle"])
@pytest.mark.parametrize("loader", ["load_state", "torch_load_weights"])
def test_pickle_with_code_is_refused_in_one_line(container: str, loader: str, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = write_pickle_with_code(tmp_path / "evil.pt", marker, container=container)
    with pytest.raises(MedsynthError) as caught:
        if loader == "load_state":
            load_state(path, expected_format=CHECKPOINT_FORMAT)
        else:
            torch_load_weights(path, what="medsynth checkpoint")
    message = str(caught.value)
    assert not marker.exists()  # nothing was unpickled
    assert "\n" not in message and len(message) < 400, message
    assert message.startswith(f"{path}: not a readable medsynth checkpoint file")
    assert "pickled Python objects" in message and "refused" in message
    assert re.search(r"it references (builtins\.)?exec\b", message), message  # the global it would have called
