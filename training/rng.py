"""Each rank's random generators as JSON, saved in every checkpoint so that a resume continues the same streams."""

from __future__ import annotations

import base64
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch


class RngWarning(UserWarning):
    """A saved generator state could not be restored here (e.g. a CUDA state on a machine without CUDA)."""


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng() -> dict[str, Any]:
    """This process's generators as JSON: python `random`, numpy's global one, torch CPU and current CUDA device.

    Only the current CUDA device: asking for all devices would create a CUDA context on every visible GPU
    in every rank.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "version": 1,
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_kind, base64.b64encode(np.ascontiguousarray(np_keys, dtype=np.uint32).tobytes()).decode(),
                  int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state(torch.cuda.current_device()))
    return state


def restore_rng(d: dict[str, Any]) -> None:
    if d.get("version") != 1:
        raise ValueError(f"RNG state version {d.get('version')!r} is not supported (this code reads 1)")
    py_version, py_internal, py_gauss = d["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = d["numpy"]
    keys = np.frombuffer(base64.b64decode(np_keys), dtype=np.uint32).copy()
    np.random.set_state((np_kind, keys, np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(_unb64(d["torch"]))
    if "cuda" in d:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(_unb64(d["cuda"]), torch.cuda.current_device())
        else:
            warnings.warn("checkpoint has a CUDA RNG state but CUDA is not available; not restored",
                          RngWarning, stacklevel=2)


def rng_file(folder: Path, rank: int) -> Path:
    """Where rank `rank` keeps its RNG state inside a checkpoint directory."""
    return folder / f"rng-rank{rank:05d}.json"
