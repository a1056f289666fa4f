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


def _tables(text: str) -> list[tuple[int, list[str], list[str]]]:
    """(header line number, the lines of its section before it, its rows) of every Markdown table."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---") and \
                (i == 0 or not lines[i - 1].startswith("|")):
            heading = max((j for j in range(i) if lines[j].startswith("#") and not lines[j].startswith("#  ")),
                          default=0)
            rows = [row for row in lines[i + 2:] if row.startswith("|")]
            end = next((k for k, row in enumerate(lines[i + 2:]) if not row.startswith("|")), len(rows))
            out.append((i + 1, lines[heading:i], rows[:end]))
    return out


def test_every_readme_table_of_figures_names_the_command_that_made_it():
    """A figure without its command cannot be reproduced: each table with measured figures (decimals) has a
    command (a `python experiments/...` or `bash experiments/...` line, in a code block or inline) in its
    section, above it."""
    missing = []
    for number, section, rows in _tables(README.read_text()):
        if not any(re.search(r"\d\.\d", row) for row in rows):
            continue  # a reference table (names, slots), no figures
        if not any(re.search(r"(python|bash) experiments/", line) for line in section):
            missing.append(number)
    assert not missing, f"README tables of figures with no command in their section (header lines): {missing}"


def test_the_estimator_table_says_how_each_estimator_batches():
    """README's estimator table names each registered estimator and how `batching=auto` runs its tasks: "stacked"
    exactly where the estimator declares `stacks` (forward: its exact mode stacks, its random mode vmaps)."""
    from metaopt.estimators.base import registered_estimators

    cells = {}
    for line in README.read_text().split("## Estimators\n", 1)[1].splitlines():
        match = re.match(r"\| `(\w+)` \|.*\| ([^|]+) \|$", line)
        if match:
            cells[match.group(1)] = match.group(2).strip()
    for cls in registered_estimators():
        expected = "stacked" if cls.stacks else "vmap"
        assert cls.name in cells, f"README's estimator table has no row for {cls.name!r}"
        assert cells[cls.name].split(" / ")[0] == expected, f"{cls.name}: README says {cells[cls.name]!r}"
