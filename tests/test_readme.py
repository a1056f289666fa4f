"""README's plain-Python example runs as written (with fewer steps), so it cannot rot."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_plain_python_example_runs(capsys):
    text = README.read_text()
    section = text.split("## The library in plain Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "range(1000)" in code and "n_tasks=600" in code
    code = code.replace("range(1000)", "range(3)").replace("n_tasks=600", "n_tasks=20")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        exec(compile(code, str(README), "exec"), {})
    finally:
        torch.set_default_dtype(previous)
    assert "meta_test_loss" in capsys.readouterr().out
