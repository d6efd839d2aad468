"""Stage subcommands, made from each stage's pydantic ``Params``: one source of options, defaults and help.

``streamify GROUP ACTION MODEL -o OUT [options]`` exists for every registered
stage ``GROUP.ACTION``. Each field of the stage's ``Params`` becomes an option
named after it (``group_size`` -> ``--group-size``; a nested model's fields get
its name as a prefix: ``heal.steps`` -> ``--heal-steps``), with the field's
description and default as help. A field may name its option itself where that
adds something (``Field(..., json_schema_extra={"cli": "--sym/--asym"})``).
Options left out are left out of the recipe too, so the stage's defaults apply.
Common options (``--data``, ``--device``, ...) follow; a stage field shadows a
common option of the same name (``convert dtype --dtype`` is the target dtype).

The commands are made when asked for, so listing them imports nothing heavy.
"""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from typer.core import TyperGroup

from streamify.cli.options import (
    DataOpt,
    DeviceOpt,
    DryRunOpt,
    DtypeOpt,
    EvalOpt,
    FormatOpt,
    ModelArg,
    NoCacheOpt,
    OutOpt,
    OverwriteOpt,
    PickleOpt,
    SaveRecipeOpt,
    SeedOpt,
    TrustOpt,
)
from streamify.cli.output import Format, command
from streamify.cli.render import render_run
from streamify.pipeline.registry import Stage, get_stage, stage_names

_KW = inspect.Parameter.KEYWORD_ONLY
# Options every stage command has: (identifier, annotation, default, recipe key or None for CLI-only ones)
COMMON: tuple[tuple[str, Any, Any, str | None], ...] = (
    ("data", DataOpt, None, "data"),
    ("dtype", DtypeOpt, None, "dtype"),
    ("device", DeviceOpt, None, "device"),
    ("seed", SeedOpt, None, "seed"),
    ("trust_remote_code", TrustOpt, False, "trust_remote_code"),
    ("allow_pickle", PickleOpt, False, "allow_pickle"),
    ("evaluate", EvalOpt, True, None),
    ("overwrite", OverwriteOpt, False, None),
    ("dry_run", DryRunOpt, False, None),
    ("no_cache", NoCacheOpt, False, None),
    ("save_recipe", SaveRecipeOpt, None, None),
    ("fmt", FormatOpt, Format.human, None),
)


class StageField(typing.NamedTuple):
    """One option of a stage command: where its value goes in the params, and how it is read."""

    path: tuple[str, ...]
    ident: str
    flag: str
    kind: Literal["bool", "int", "float", "str", "strs", "ints"]


def stage_fields(params: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[StageField, FieldInfo]]:
    """The options of a ``Params`` model, nested models flattened."""
    found = []
    for name, info in params.model_fields.items():
        path = (*prefix, name)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            found += stage_fields(info.annotation, path)
            continue
        kind = _kind(info.annotation)
        custom = (info.json_schema_extra or {}).get("cli") if isinstance(info.json_schema_extra, dict) else None
        flag = custom or "--" + "-".join(path).replace("_", "-")
        if kind == "bool" and "/" not in flag:
            flag = f"{flag}/--no-{flag.removeprefix('--')}"
        found.append((StageField(path, "p__" + "__".join(path), flag, kind), info))
    return found


def _kind(annotation) -> str:
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        options = [annotation]
    if options == [bool]:
        return "bool"
    if len(options) == 1 and options[0] in (int, float):
        return options[0].__name__
    if len(options) == 1 and typing.get_origin(options[0]) is list:
        return {(int,): "ints", (float,): "floats"}.get(typing.get_args(options[0]), "strs")
    return "str"  # strings, choices (Literal), and unions such as int | "auto" read as text, checked by pydantic


_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "strs": list[str], "ints": str, "floats": str}
_LISTS = {"ints": (int, "integers, e.g. 12,13,14"), "floats": (float, "numbers, e.g. 1000,750,500,250")}


def _default_text(info: FieldInfo) -> str:
    if info.default is not PydanticUndefined:
        return "none" if info.default is None else str(info.default)
    return str(info.default_factory()) if info.default_factory else "required"


def _parameter(field: StageField, info: FieldInfo) -> inspect.Parameter:
    help_text = f"{info.description or ''} (default: {_default_text(info)})".strip()
    if field.kind in _LISTS:
        help_text += " (comma-separated)"
    if field.kind == "strs":
        help_text += " (repeatable)"
    option = typer.Option(*field.flag.split(" "), help=help_text, show_default=False)
    return inspect.Parameter(field.ident, _KW, default=None, annotation=Annotated[_TYPES[field.kind] | None, option])


def _value(field: StageField, raw):
    if field.kind not in _LISTS:
        return raw
    number, example = _LISTS[field.kind]
    try:
        return [number(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"'{raw}' is not a comma-separated list of {example}", param_hint=field.flag) from None


def stage_command(stage: Stage):
    """The ``streamify GROUP ACTION`` function of ``stage``, its signature made from the stage's ``Params``."""
    fields = stage_fields(stage.params)
    taken = {field.flag.split("/")[0] for field, _ in fields}
    common = [c for c in COMMON if "--" + c[0].replace("_", "-") not in taken]
    parameters = [
        inspect.Parameter("model", _KW, annotation=ModelArg),
        inspect.Parameter("output", _KW, annotation=OutOpt),
        *(_parameter(field, info) for field, info in fields),
        *(inspect.Parameter(ident, _KW, default=default, annotation=kind) for ident, kind, default, _ in common),
    ]

    def command(**given) -> None:
        params: dict = {}
        for field, _ in fields:
            raw = given[field.ident]
            if raw is None or (field.kind == "strs" and not raw):
                continue
            target = params
            for key in field.path[:-1]:
                target = target.setdefault(key, {})
            target[field.path[-1]] = _value(field, raw)
        top = {"model": given["model"], "output": str(given["output"])}
        top.update({key: given[ident] for ident, _, _, key in common if key and given[ident] not in (None, False)})
        run_one_stage(
            stage.name,
            params,
            top,
            evaluate=given.get("evaluate", True),
            overwrite=given.get("overwrite", False),
            dry_run=given.get("dry_run", False),
            use_cache=not given.get("no_cache", False),
            save_recipe=given.get("save_recipe"),
            fmt=given.get("fmt", Format.human),
        )

    command.__signature__ = inspect.Signature(parameters)
    command.__doc__ = stage.summary[0].upper() + stage.summary[1:] + "."
    command.__name__ = stage.name.replace(".", "_")
    return command


def run_one_stage(
    stage: str,
    params: dict,
    top: dict,
    *,
    evaluate: bool,
    overwrite: bool,
    dry_run: bool,
    use_cache: bool,
    save_recipe: Path | None,
    fmt: Format,
) -> None:
    """What every stage subcommand does: build a one-stage recipe, optionally save it, run it."""
    from streamify.pipeline.recipe import validate_recipe
    from streamify.pipeline.runner import run_recipe

    with command(fmt) as out:
        data = {**top, "stages": [{stage: params}], "eval": {} if evaluate else None}
        recipe = validate_recipe(data, f"streamify {stage.replace('.', ' ')}", flags=True)
        if save_recipe is not None:
            save_recipe.write_text(recipe.to_yaml())
            out.log(f"wrote the equivalent recipe to {save_recipe}")
        out.run(
            lambda: run_recipe(recipe, overwrite=overwrite, dry_run=dry_run, use_cache=use_cache, progress=out),
            render_run,
        )


class StageGroup(TyperGroup):
    """A command group that also offers the registered stages of its name (``quantize`` -> ``quantize.int4``)."""

    def _stages(self) -> dict[str, str]:
        prefix = f"{self.name}."
        return {name.removeprefix(prefix).replace("_", "-"): name for name in stage_names() if name.startswith(prefix)}

    def list_commands(self, ctx) -> list[str]:
        """The group's own commands and its stages."""
        return sorted({*super().list_commands(ctx), *self._stages()})

    def get_command(self, ctx, cmd_name: str):
        """A hand-written command of the group, or the stage command made from the stage's params."""
        found = super().get_command(ctx, cmd_name)
        stage = self._stages().get(cmd_name)
        if found is not None or stage is None:
            return found
        holder = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        holder.command(cmd_name)(stage_command(get_stage(stage)))
        return typer.main.get_command(holder)


def stage_group(help_text: str) -> typer.Typer:
    """A Typer group whose stage subcommands come from the registry."""
    return typer.Typer(cls=StageGroup, no_args_is_help=True, help=help_text)
