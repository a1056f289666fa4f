"""Shared fixtures: float64 by default, seeded generators, tiny non-degenerate problems."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
# Under pytest-xdist each worker gets one thread: two workers on two cores, not four threads fighting.
torch.set_num_threads(1 if "PYTEST_XDIST_WORKER" in os.environ else min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def float64():
    """Exactness checks run in float64; the previous default is restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
