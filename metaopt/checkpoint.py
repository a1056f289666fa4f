"""Atomic checkpoints: a crash mid-write never leaves a truncated file behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_atomic", "load_checkpoint", "CorruptCheckpoint"]


class CorruptCheckpoint(RuntimeError):
    """A checkpoint file exists but cannot be read."""


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` through a temporary file in the same folder and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by `save_atomic`.

    Raises:
      CorruptCheckpoint: the file is not a readable checkpoint (the message names it).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a damaged file
        raise CorruptCheckpoint(f"cannot read checkpoint {os.fspath(path)!r}: {e}") from e
