"""``builtin:pydoc``: docstrings of the Python standard library, built at run time.

Every module, class and function docstring of the stdlib sources that this
Python ships, in a fixed order. Nothing is stored in the repository. The split
is by module: a module belongs to the held-out split when the sha256 of its name
ends in a byte below 26 (about 10% of modules), so calibration/training text and
evaluation text never come from the same module.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

_SKIP_PARTS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "turtledemo",
    "__pycache__",
}


def _is_heldout(module: str) -> bool:
    return hashlib.sha256(module.encode()).digest()[-1] < 26


def _module_files(root: Path) -> list[tuple[str, Path]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_PARTS.intersection(rel.parts):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        if module.split(".")[0] in sys.stdlib_module_names:
            found.append((module, path))
    return found


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
    docs = (ast.get_docstring(n, clean=True) for n in nodes)
    return [d for d in docs if d and len(d) >= 40]


@lru_cache(maxsize=2)
def pydoc_texts(split: str) -> tuple[str, ...]:
    """Docstring texts of one split (``train`` or ``heldout``): one text per module, in module order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for module, path in _module_files(root):
        if _is_heldout(module) == (split == "heldout"):
            docs = _docstrings(path)
            if docs:
                texts.append("\n\n".join(docs))
    return tuple(texts)
