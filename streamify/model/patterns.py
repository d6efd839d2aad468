"""Module patterns, as recipes and ``--targets``/``--ignore`` write them.

A pattern is a module name (``model.layers.0.mlp.up_proj``) or its last
dot-separated parts (``up_proj``, ``mlp.up_proj``, as peft matches them), a
class name (``Linear``, ``LlamaMLP``), or ``re:`` and a regular expression
matched against the whole module name (``re:.*\\.mlp\\..*``). A pattern that matches
no module is an error: it is nearly always a typo, and silently doing less
than asked is worse than stopping.
"""

from __future__ import annotations

import re

from torch import nn

from streamify.errors import UsageError


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern) or type(module).__name__ == pattern


def _check_regex(pattern: str, where: str) -> None:
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise UsageError(f"{where}: pattern '{pattern}' is not a valid regular expression ({exc})") from exc


def match_patterns(model: nn.Module, patterns: list[str], where: str) -> dict[str, list[str]]:
    """Module names each pattern matches; a :class:`UsageError` (exit 2) for one that matches nothing."""
    named = [(name, module) for name, module in model.named_modules() if name]
    found = {}
    for pattern in patterns:
        _check_regex(pattern, where)
        names = [name for name, module in named if _matches(pattern, name, module)]
        if not names:
            classes = sorted({type(m).__name__ for _, m in named})
            raise UsageError(
                f"{where}: pattern '{pattern}' matches no module of {type(model).__name__}",
                f"use a module name or its last parts (e.g. {named[-1][0]}), a class name "
                f"({', '.join(classes[:8])}, ...) or re:REGEX over module names",
            )
        found[pattern] = names
    return found


def default_linear_targets(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` except the output head: the usual target set of LoRA and weight quantization."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head]


def select_modules(
    model: nn.Module, targets: list[str] | None, ignore: list[str], where: str, kind: type = nn.Linear
) -> list[str]:
    """Names of the ``kind`` modules matched by ``targets`` and by none of ``ignore``.

    ``targets`` None means every linear layer but the output head. A pattern
    that matches a container (``LlamaMLP``, ``re:.*self_attn``) selects the
    ``kind`` modules inside it.
    """
    modules = dict(model.named_modules())
    if targets is None:
        chosen = set(default_linear_targets(model))
    else:
        chosen = {n for names in match_patterns(model, targets, where).values() for n in names}
    dropped = {n for names in match_patterns(model, ignore, where).values() for n in names}

    def inside(name: str, roots: set[str]) -> bool:
        return any(name == root or name.startswith(root + ".") for root in roots)

    selected = [
        name
        for name, module in modules.items()
        if isinstance(module, kind) and inside(name, chosen) and not inside(name, dropped)
    ]
    if not selected:
        raise UsageError(
            f"{where}: the target and ignore patterns leave no {kind.__name__} module",
            "loosen the ignore patterns or widen the targets",
        )
    return selected
