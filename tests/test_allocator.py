"""The allocator choice: applied in a fresh process (it changes the process for good)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from metaopt.allocator import set_allocator

PROBE = """
import ctypes, ctypes.util, sys
from metaopt.allocator import set_allocator
changed = set_allocator(sys.argv[1])
import torch
x = torch.ones(64 * 2**20 // 4)   # 64 MB: mmap'd by default glibc, from the heap when kept
del x
print(changed)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_is_applied_and_system_changes_nothing():
    for mode, expected in (("system", "False"), ("keep", "True")):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == expected


def test_unknown_mode_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="allocator='fast': use system .* or keep"):
        set_allocator("fast")
