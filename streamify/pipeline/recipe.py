"""The recipe schema, reading recipes from YAML, and the shipped recipes."""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streamify.errors import UsageError
from streamify.eval.report import EvalSpec
from streamify.io.placement import DtypeName
from streamify.pipeline.overrides import apply_overrides
from streamify.pipeline.registry import Stage, get_stage


class RecipeEval(EvalSpec):
    """Eval of the artifact; ``vs_source`` also evaluates the source on the same tokens."""

    vs_source: bool = Field(False, description="also evaluate the source model and report ratios")


class Gates(BaseModel):
    """Quality gates checked after eval; a failed gate exits 5. ``max_`` gates are upper, ``min_`` lower limits."""

    model_config = ConfigDict(extra="forbid")

    max_perplexity: float | None = Field(None, gt=0, description="artifact perplexity at most this")
    max_perplexity_increase_pct: float | None = Field(
        None, description="artifact perplexity at most this % above the source's (evaluates the source too)"
    )
    max_size_bytes: int | None = Field(None, gt=0, description="artifact weight files at most this many bytes")
    min_size_reduction_pct: float | None = Field(
        None,
        le=100,
        description="artifact weight files at least this % smaller than the source's weight files as stored "
        "(a GGUF source: the .gguf file, often 4-bit already)",
    )
    max_stream_perplexity_ratio: float | None = Field(
        None, gt=0, description="artifact stream perplexity at most this times the source's (needs eval.stream_tokens)"
    )
    max_equivalence_abs_diff: float | None = Field(
        None, ge=0, description="streaming runtime vs the StreamingLLM reference, max |logit diff| (eval.equivalence)"
    )


# What each gate needs from the eval section, and how to ask for it.
_GATE_NEEDS = {
    "max_stream_perplexity_ratio": ("stream_tokens", "set eval.stream_tokens (e.g. 2048)"),
    "max_equivalence_abs_diff": ("equivalence", "set eval.equivalence: true"),
}


class Recipe(BaseModel):
    """A run: which model, which stages in order, where the artifact goes, how to judge it."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="folder, .gguf file, builtin alias or hub id")
    output: str | None = Field(None, description="artifact folder to write")
    data: str = Field("builtin:pydoc", description="text for stages that calibrate or train")
    seed: int = 0
    dtype: DtypeName = Field("auto", description="dtype to load the model in")
    device: str = Field("cpu", description="cpu, cuda, cuda:N, mps or auto")
    trust_remote_code: bool = False
    allow_pickle: bool = False
    verify: bool = Field(
        True, description="when the model is a streamify artifact, check its files against its manifest first"
    )
    stages: list[dict[str, Any]] = Field(default_factory=list, description="[{stage-name: params}, ...] in order")
    eval: RecipeEval | None = Field(None, description="evaluate the artifact ({} for the defaults); off when absent")
    gates: Gates | None = None

    @model_validator(mode="after")
    def _gates_have_their_eval(self) -> Recipe:
        if self.gates is None:
            return self
        for gate in self.gates.model_dump(exclude_none=True):
            if self.eval is None:
                raise ValueError(f"gate {gate} needs an eval section (eval: {{}} for the defaults)")
            need = _GATE_NEEDS.get(gate)
            if need and not getattr(self.eval, need[0]):
                raise ValueError(f"gate {gate} needs eval.{need[0]}: {need[1]}")
        return self

    def resolved_stages(self) -> list[tuple[Stage, BaseModel]]:
        """Each stage with its validated params (validated when the recipe is)."""
        return [_resolve_stage(i, entry) for i, entry in enumerate(self.stages)]

    def needs_source_eval(self) -> bool:
        """True when the source must be evaluated too (``vs_source`` or a gate relative to it)."""
        relative = self.gates is not None and (
            self.gates.max_perplexity_increase_pct is not None or self.gates.max_stream_perplexity_ratio is not None
        )
        return self.eval is not None and (self.eval.vs_source or relative)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML, every stage with all its params spelled out."""
        data = self.model_dump(mode="json")
        data["stages"] = [{stage.name: params.model_dump(mode="json")} for stage, params in self.resolved_stages()]
        return yaml.safe_dump(data, sort_keys=False)


@dataclass
class LoadedRecipe:
    """A validated recipe and where it came from."""

    recipe: Recipe
    where: str


def _resolve_stage(index: int, entry: Any, flags: bool = False) -> tuple[Stage, BaseModel]:
    where = f"stages.{index}"
    if not isinstance(entry, dict) or len(entry) != 1:
        raise UsageError(
            f"{where}: a stage is a mapping with one key, the stage name",
            "e.g. - convert.dtype: {dtype: bf16}",
        )
    ((name, params),) = entry.items()
    stage = get_stage(str(name))
    try:
        return stage, stage.params.model_validate(params or {})
    except ValidationError as exc:
        if flags:
            raise UsageError(describe_validation(exc, stage.params, flags=True), "see --help for each option") from exc
        level, keys = _mistyped_level(exc, stage.params)
        raise UsageError(
            f"{where} ({name}): {describe_validation(exc, stage.params)}",
            f"valid keys of {name}{'.' + level if level else ''}: {', '.join(keys)}",
        ) from exc


def _level(schema: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    """The model that holds the keys at ``path`` inside ``schema`` (None when the path leaves the models)."""
    for key in path:
        field = schema.model_fields.get(key)
        inner = getattr(field, "annotation", None)
        inner = next((a for a in typing.get_args(inner) if isinstance(a, type)), inner)  # X | None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return None
        schema = inner
    return schema


def _mistyped_level(exc: ValidationError, schema: type[BaseModel]) -> tuple[str, list[str]]:
    """``(dotted level, its keys)`` of the first unknown key in ``exc``; the top level when none is unknown."""
    for err in exc.errors():
        parts = [str(p) for p in err["loc"] if not isinstance(p, int)]
        level = _level(schema, parts[:-1]) if err["type"] == "extra_forbidden" else None
        if level is not None:
            return ".".join(parts[:-1]), list(level.model_fields)
    return "", list(schema.model_fields)


def describe_validation(exc: ValidationError, schema: type[BaseModel] | None = None, flags: bool = False) -> str:
    """One line per pydantic error, naming the key (or, with ``flags``, the command-line option).

    With ``schema`` (the model validated), an unknown key gets the closest valid key of its level.
    """
    lines = []
    for err in exc.errors():
        parts = [str(p) for p in err["loc"]]
        named = [p for p in parts if not p.isdigit()]  # a list item's index is not part of the option's name
        loc = "--" + "-".join(named).replace("_", "-") if flags and named else ".".join(parts)
        if err["type"] == "extra_forbidden":
            level = _level(schema, named[:-1]) if schema else None
            close = difflib.get_close_matches(named[-1], list(level.model_fields), n=1) if level else []
            if flags and close:
                close = ["--" + "-".join([*named[:-1], close[0]]).replace("_", "-")]
            lines.append(f"unknown key '{loc}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        elif err["type"] == "missing":
            lines.append(f"missing required key '{loc}'")
        elif not loc:  # a check across keys
            lines.append(err["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"'{loc}': {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def shipped_recipes_dir() -> Path:
    """The recipes shipped with streamify (package data in a wheel, ``recipes/`` in a checkout)."""
    packaged = Path(__file__).resolve().parent.parent / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe names -> paths."""
    folder = shipped_recipes_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def find_recipe(name: str) -> Path:
    """A recipe file path, or the shipped recipe called ``name``."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if name in shipped:
        return shipped[name]
    raise UsageError(
        f"recipe '{name}': no such file, and no shipped recipe of that name",
        f"shipped recipes: {', '.join(shipped) or 'none'}",
    )


def read_recipe_file(path: Path) -> dict:
    """Parse a recipe YAML file into a mapping; malformed YAML is a :class:`UsageError` with the line."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UsageError(f"{path}: malformed YAML{at}: {getattr(exc, 'problem', exc)}", "fix the YAML syntax") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the recipe ({exc})", "check the path") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a recipe is a YAML mapping (model:, stages:, ...)", "see recipes/quickstart.yaml")
    return data


def validate_recipe(data: dict, where: str, flags: bool = False) -> Recipe:
    """Validate a recipe mapping (schema and every stage's params); errors name the key.

    ``flags``: the recipe was built from a command line, so errors in stage
    params name the option (``--window``) instead of the recipe key.
    """
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        level, keys = _mistyped_level(exc, Recipe)
        raise UsageError(
            f"{where}: {describe_validation(exc, Recipe)}", f"valid {level or 'top-level'} keys: {', '.join(keys)}"
        ) from exc
    for index, entry in enumerate(recipe.stages):
        try:
            stage, _ = _resolve_stage(index, entry, flags)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc.message}", exc.hint) from exc
        if stage.final and index != len(recipe.stages) - 1:
            raise UsageError(
                f"{where}: stages.{index} ({stage.name}) fixes the weight format, so it must come last",
                f"move {stage.name} to the end of the stages",
            )
    return recipe


def load_recipe(name: str, overrides: list[str] | None = None) -> LoadedRecipe:
    """Read, override and validate a recipe named by path or shipped name."""
    path = find_recipe(name)
    data = apply_overrides(read_recipe_file(path), overrides or [])
    return LoadedRecipe(validate_recipe(data, str(path)), str(path))
