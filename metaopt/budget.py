"""Per-task budgets: how much memory and time one task's meta-gradient may take.

`Budget` is accepted by every estimator call. Human strings are parsed here:
"512MB", "1.5GiB", "30s", "2min". Decimal units are powers of 1000 (MB = 10^6
bytes), binary units powers of 1024 (MiB = 2^20 bytes).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Literal

import torch

from metaopt.memory import available_bytes

__all__ = ["Budget", "BudgetExceeded", "TimeBudgetExceeded", "parse_bytes", "parse_seconds", "machine_bounded"]

OnExceed = Literal["raise", "truncate", "skip"]

_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SECOND_UNITS = {
    "": 1.0, "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "ms": 1e-3, "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0, "d": 86400.0, "day": 86400.0, "days": 86400.0,
}
_QUANTITY = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*$")


class BudgetExceeded(RuntimeError):
    """A configuration cannot fit, or a task ran past, its budget."""


class TimeBudgetExceeded(BudgetExceeded):
    """Refused before any work: a configuration that fits the memory is predicted past the time budget, even one
    task alone (`metaopt.planning`)."""


def _parse(value: str | float | int, units: dict, what: str, examples: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a number or a string like {examples}, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = _QUANTITY.match(str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in units:
            raise ValueError(f"{what}: cannot parse {value!r}; write a number with a unit such as "
                             f"{examples} (units: {', '.join(u for u in units if u)})")
        number = float(match.group(1)) * units[unit]
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{what}: must be positive and finite, got {value!r} "
                         "(use null for no limit)")
    return number


def parse_bytes(value: str | int | float) -> int:
    """Bytes from a number or a string such as "512MB", "1.5GiB", "100k".

    Raises:
      ValueError: an unknown unit, a malformed string, or a value <= 0.
    """
    number = _parse(value, _BYTE_UNITS, "memory budget", "'512MB' or '2GiB'")
    if number < 1:
        raise ValueError(f"memory budget: {value!r} is less than one byte")
    return int(number)


def parse_seconds(value: str | int | float) -> float:
    """Seconds from a number or a string such as "30s", "500ms", "2min", "1.5h".

    Raises:
      ValueError: an unknown unit, a malformed string, or a value <= 0.
    """
    return _parse(value, _SECOND_UNITS, "time budget", "'30s' or '2min'")


@dataclass(frozen=True)
class Budget:
    """What one task's meta-gradient may cost.

    Args:
      memory: the peak bytes allowed above the level at its start while one meta-step runs (an
        int or a string like "512MB"); None: no limit. It bounds the whole meta-gradient call
        (every vmapped chunk in sequence, forward and backward, the accumulated gradients) plus
        the outer optimizer's step; the planner sizes chunks to fit (`metaopt.planning`) and the
        guard watches it (`metaopt.guard`). Measured as in `metaopt.memory`: device tensor bytes
        on CUDA, process peak RSS on CPU.
      time: seconds for one task (a number or a string like "30s"); a vmapped chunk shares one
        clock. None: no limit. The planner predicts a chunk's seconds (timed at a few inner steps,
        extrapolated to T) and fits chunks, or chooses an estimator, under `(1 - headroom) x time`;
        the guard watches it at run time.
      on_exceed: what happens to a task that runs past its budget: "raise" an error,
        "truncate" its unroll at that step boundary, or "skip" the task.
      headroom: the share of `memory` (and of `time`) the planner keeps free: it emits no plan predicted
        above `(1 - headroom) x memory` (the run-time guard still allows up to `memory`).
    """

    memory: int | None = None
    time: float | None = None
    on_exceed: OnExceed = "raise"
    headroom: float = 0.1

    def __post_init__(self) -> None:
        if self.memory is not None:
            object.__setattr__(self, "memory", parse_bytes(self.memory))
        if self.time is not None:
            object.__setattr__(self, "time", parse_seconds(self.time))
        if not 0 <= self.headroom < 1:
            raise ValueError(f"budget headroom must be in [0, 1), got {self.headroom!r}")
        if self.on_exceed not in ("raise", "truncate", "skip"):
            raise ValueError(f"budget on_exceed must be 'raise', 'truncate' or 'skip', got {self.on_exceed!r}")

    @property
    def unlimited(self) -> bool:
        return self.memory is None and self.time is None


def machine_bounded(budget: Budget, device: torch.device | str) -> tuple[Budget, int | None]:
    """`budget`, and where it sets no memory limit, the same with the bytes available on `device` now as its
    memory (`metaopt.memory.available_bytes`), with those bytes (None: `budget` unchanged, as it has a memory
    limit or the available memory is unknown). For planning only: what is run is still guarded by `budget`."""
    room = None if budget.memory is not None else available_bytes(device)
    return (budget, None) if room is None else (replace(budget, memory=room), room)
