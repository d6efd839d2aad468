"""README.md shows what the code prints: its quick commands are run and their output compared.

Commands that take minutes (a real conversion, an eval) are not re-run here;
the ones that read no weights are, exactly as the README shows them, at the
README's terminal width. Lines that depend on the machine (the install path,
free memory, whether the stage cache holds an entry) are normalised.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
CHECKED = (
    "streamify inspect builtin:smollm2-135m",
    "streamify inspect /does/not/exist",
    "streamify recipe list",
    "streamify recipe validate recipes/quickstart.yaml",
    "streamify run quickstart output=/tmp/qs --dry-run",
)
_MACHINE = (
    (re.compile(r"^│ path .*$"), "│ path (install path)"),
    (re.compile(r"available [\d.]+ GiB"), "available N GiB"),
    (re.compile(r"of [\d.]+ GiB available"), "of N GiB available"),
    (re.compile(r"cache: (hit|miss)"), "cache: hit or miss"),
)


def readme_commands() -> dict[str, list[str]]:
    """Each ``$ streamify ...`` line of the README's code blocks and the lines shown after it."""
    found: dict[str, list[str]] = {}
    current = None
    in_block = False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block, current = not in_block, None
        elif in_block and line.startswith("$ "):
            current = line[2:]
            found[current] = []
        elif in_block and current is not None:
            found[current].append(line)
    return found


def _normal(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        for pattern, replacement in _MACHINE:
            line = pattern.sub(replacement, line)
        out.append(line.rstrip())
    while out and not out[-1]:
        out.pop()
    return out


@pytest.mark.parametrize("command", CHECKED)
def test_readme_output_is_what_the_code_prints(command, cli, monkeypatch):
    shown = readme_commands()
    line = next((c for c in shown if c.startswith(command)), None)
    assert line is not None, f"README no longer shows `{command}`"
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.chdir(README.parent)
    args = shlex.split(line.split(";")[0])[1:]
    result = cli(*args)
    printed = (result.stdout + result.stderr).splitlines()
    if 'echo "exit=$?"' in line:
        printed.append(f"exit={result.exit_code}")
    assert _normal(printed) == _normal(shown[line])
