"""The in-memory checkpoint that stages transform."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamify.io.source import Source

if TYPE_CHECKING:
    from streamify.kinds import Kind
    from streamify.model.executor import BlockExecutor


@dataclass
class Checkpoint:
    """A model with its tokenizer (and feature extractor), where it came from, and what was done to it.

    ``history`` holds the stage records of earlier streamify runs (read from the
    input's manifest); ``streaming`` is the streaming spec, if any stage set one.
    ``weights_writer``, when a stage sets it, writes the artifact's config and
    weight files in that stage's format instead of transformers' safetensors.
    ``blocks`` is set when the model was loaded block-wise (larger than memory):
    its blocks stay on the meta device and this executor brings them in one at a time.
    """

    model: Any
    tokenizer: Any
    source: Source
    processor: Any = None  # the feature extractor of a speech model (preprocessor_config.json)
    history: list[dict] = field(default_factory=list)
    streaming: dict | None = None
    weights_writer: Callable[[Path], None] | None = None
    blocks: BlockExecutor | None = None

    @property
    def config(self) -> Any:
        """The model's transformers config."""
        return self.model.config

    @property
    def kind(self) -> Kind:
        """The model's kind (:mod:`streamify.kinds`); :class:`~streamify.errors.InputError` when it has none."""
        from streamify.kinds import kind_of

        return kind_of(self.model, self.source.spec)
