"""The wheel carries the shipped recipes as package data."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_recipes_and_finds_them(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("streamify-*.whl")
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(unpacked)
    shipped = {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    assert {f"streamify/recipes/{n}" for n in shipped} <= names
    code = "from streamify.pipeline.recipe import shipped_recipes; print(sorted(shipped_recipes().items()))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(unpacked)},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert str(unpacked / "streamify" / "recipes") in out and "quickstart" in out
