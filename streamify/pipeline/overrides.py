"""``key=value`` dot-path overrides and ``~key`` deletions applied to a recipe mapping.

Paths walk mappings by key and lists by index. Inside ``stages``, an entry is
``{stage-name: params}`` and stage names contain dots, so ``stages.0.dtype``
reaches the params of stage 0 directly. Values are parsed as YAML scalars
(``5`` is a number, ``true`` a bool, ``[a, b]`` a list).
"""

from __future__ import annotations

from typing import Any

import yaml

from streamify.errors import UsageError


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """Return ``recipe`` with every override applied in order (the input is not modified)."""
    import copy

    result = copy.deepcopy(recipe)
    for item in overrides:
        if item.startswith("~"):
            _delete(result, item[1:], item)
        elif "=" in item:
            path, _, text = item.partition("=")
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise UsageError(f"override '{item}': value is not valid YAML ({exc})", "quote the value") from exc
            _set(result, path, value, item)
        else:
            raise UsageError(f"override '{item}' is neither key=value nor ~key", "e.g. output=/tmp/out or ~gates")
    return result


def _split(path: str, item: str) -> list[str]:
    keys = path.strip().split(".")
    if not all(keys):
        raise UsageError(f"override '{item}': empty key in path '{path}'", "use dot paths like stages.0.dtype")
    return keys


def _child(node: Any, key: str, item: str, create: bool) -> Any:
    if isinstance(node, list):
        index = _index(node, key, item)
        return node[index]
    if isinstance(node, dict):
        if key not in node:
            if not create:
                raise UsageError(
                    f"override '{item}': no key '{key}' (keys: {', '.join(map(str, node))})", "check the path"
                )
            node[key] = {}
        return node[key]
    raise UsageError(f"override '{item}': '{key}' is below a value that is not a mapping or list", "check the path")


def _index(node: list, key: str, item: str) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise UsageError(f"override '{item}': '{key}' is not an index of a list of {len(node)}", "check the path")
    return int(key)


def _stage_params(node: Any, key: str) -> Any:
    """Inside a stage entry ``{name: params}``, a key other than the name addresses the params."""
    if isinstance(node, dict) and len(node) == 1:
        (name,) = node
        if "." in str(name) and key != name:
            if node[name] is None:
                node[name] = {}
            return node[name]
    return node


def _walk(root: dict, keys: list[str], item: str, create: bool) -> Any:
    node: Any = root
    for depth, key in enumerate(keys):
        if depth >= 2 and keys[0] == "stages":
            node = _stage_params(node, key)
        if depth == len(keys) - 1:
            return node
        node = _child(node, key, item, create)
    return node


def _set(root: dict, path: str, value: Any, item: str) -> None:
    keys = _split(path, item)
    parent = _walk(root, keys, item, create=True)
    last = keys[-1]
    if isinstance(parent, list):
        parent[_index(parent, last, item)] = value
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise UsageError(f"override '{item}': cannot set '{last}' inside a plain value", "check the path")


def _delete(root: dict, path: str, item: str) -> None:
    keys = _split(path, item)
    parent = _walk(root, keys, item, create=False)
    last = keys[-1]
    if isinstance(parent, list):
        del parent[_index(parent, last, item)]
    elif isinstance(parent, dict) and last in parent:
        del parent[last]
    else:
        raise UsageError(f"override '{item}': nothing to delete at '{path}'", "check the path")
